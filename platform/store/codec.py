"""Storage codecs for z in [-1, 1]: INT4 (two per byte) or fp16, as raw bytes per row.

INT4: q = clamp(floor(8 z), -8, 7), stored as the nibble q + 8, decoded as (q + 0.5) / 8: sixteen
levels at the centres of equal bins over [-1, 1], so the round-trip error is at most 1/16 per
coordinate everywhere (docs/DESIGN.md, 'Compression'). (A round(8 z) clamped to [-8, 7] has no level above 7/8
and errs by up to 1/8 near z = 1, where saturated tanh units put many values.)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa

Dtype = Literal["int4", "fp16"]


def bytes_per_row(width: int, dtype: Dtype) -> int:
    if dtype == "int4":
        if width % 2:
            raise ValueError(f"int4 needs an even width, got {width}")
        return width // 2
    if dtype == "fp16":
        return width * 2
    raise ValueError(f"dtype must be 'int4' or 'fp16', got {dtype!r}")


def encode(z: np.ndarray, dtype: Dtype) -> np.ndarray:
    """(N, width) float in [-1, 1] -> (N, bytes_per_row) uint8."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D (rows, width), got shape {z.shape}")
    if dtype == "fp16":
        return np.ascontiguousarray(z.astype(np.float16)).view(np.uint8).reshape(len(z), -1)
    bytes_per_row(z.shape[1], dtype)
    nibbles = (np.clip(np.floor(z * 8), -8, 7) + 8).astype(np.uint8)
    return (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]


def decode(data: np.ndarray, dtype: Dtype, width: int) -> np.ndarray:
    """(N, bytes_per_row) uint8 -> (N, width) float32."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != bytes_per_row(width, dtype):
        raise ValueError(f"expected (rows, {bytes_per_row(width, dtype)}) bytes for {dtype} width {width}, "
                         f"got {data.shape}")
    if dtype == "fp16":
        return data.view(np.float16).astype(np.float32)
    out = np.empty((len(data), width), dtype=np.float32)
    out[:, 0::2] = (data >> 4).astype(np.float32) - 7.5
    out[:, 1::2] = (data & 0x0F).astype(np.float32) - 7.5
    return out / 8.0


def to_binary_column(rows: np.ndarray) -> list[bytes]:
    """(N, B) uint8 -> N bytes objects, the parquet `z` column."""
    return [r.tobytes() for r in np.ascontiguousarray(rows)]


def from_binary_column(values, row_bytes: int) -> np.ndarray:
    """Sequence of bytes (one per row) -> (N, row_bytes) uint8; an (N, row_bytes) uint8 array
    (what `binary_to_rows` made of an Arrow column) passes through."""
    if isinstance(values, np.ndarray) and values.ndim == 2:
        if values.shape[1] != row_bytes:
            raise ValueError(f"z rows are {values.shape[1]} bytes, not {row_bytes}")
        return values
    if len(values) == 0:
        return np.empty((0, row_bytes), dtype=np.uint8)
    flat = np.frombuffer(b"".join(values), dtype=np.uint8)
    if flat.size != len(values) * row_bytes:
        raise ValueError(f"z rows are not all {row_bytes} bytes long")
    return flat.reshape(len(values), row_bytes)


def binary_to_rows(column: pa.ChunkedArray, row_bytes: int) -> np.ndarray:
    """A binary column whose values are all `row_bytes` long -> (n, row_bytes) uint8, no Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.empty((0, row_bytes), dtype=np.uint8)
    if arr.null_count:
        raise ValueError(f"{arr.null_count} rows have no z")
    offset_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset : arr.offset + len(arr) + 1]
    if not np.all(np.diff(offsets) == row_bytes):
        raise ValueError(f"z values are not all {row_bytes} bytes (width/dtype of the manifest)")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(len(arr), row_bytes)


def rows_to_binary(rows: np.ndarray) -> pa.Array:
    """(n, k) uint8 -> a binary column of n values of k bytes each, no Python loop."""
    n, k = rows.shape
    offsets = np.arange(n + 1, dtype=np.int32) * k
    data = pa.py_buffer(np.ascontiguousarray(rows))
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), data])
