"""Reading VM examples back: the features manifest, a Ray Dataset per split, and the batch decoder.

`decode_batch` turns feature rows into the VM batch contract of docs/ARCHITECTURE.md ("VM
batch"); the training loop calls it (over `arrow_columns`) as the collate step of
`iter_torch_batches`, so the packed `seq_z` bytes are decoded per batch and the (examples, L,
width) floats never exist all at once. Serving calls it on the rows of a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import pyarrow as pa
import ray

from loopfm.datasets.schema import LABEL, SPLITS, idx
from loopfm.errors import VersionMismatchError
from loopfm.rundir import Manifest, RunDir, committed
from loopfm.store import codec

HIST_ITEMS, HIST_CATS, HIST_LABELS = "hist_items", "hist_cats", "hist_labels"
DENSE = "dense"
RAW_ITEMS, RAW_CATS, RAW_SURFACES, RAW_LABELS = "raw_items", "raw_cats", "raw_surfaces", "raw_labels"
SEQ_Z = "seq_z"
SEQ_LEN_VALID = "seq_len_valid"
KD_LOGIT = "kd_logit"
HISTORY_COLUMNS = (HIST_ITEMS, HIST_CATS, HIST_LABELS)  # the vertical's own last raw_seq_len events
RAW_COLUMNS = (RAW_ITEMS, RAW_CATS, RAW_SURFACES, RAW_LABELS)  # the rawseq control's slots
LIST_COLUMNS = (*HISTORY_COLUMNS, DENSE, *RAW_COLUMNS)  # fixed-size list columns of a feature split


@dataclass
class FeaturesManifest(Manifest):
    """What a VM needs to know about its examples (`features/<fingerprint>/manifest.json`)."""

    MISSING = "no features at {path}: run `loopfm features` first"
    STAMP = True

    fingerprint: str
    store_version: str
    splits_fingerprint: str
    vertical: int
    rows: dict[str, int]
    seq_len: int
    raw_seq_len: int
    width: int
    dtype: str
    bytes_per_row: int
    context_columns: list[str] = field(default_factory=list)
    dense_names: list[str] = field(default_factory=list)
    counter_window: int = 20
    prior: float = 0.5
    prior_strength: float = 10.0
    lag: int = 0
    retention: Optional[int] = None
    surfaces: Union[str, list[int]] = "all"
    seconds: float = 0.0


def read_features(run: RunDir, features: Union[str, FeaturesManifest], split: str, columns: Optional[list[str]] = None):
    """One split of a feature set (by fingerprint or manifest) as a Ray Dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fingerprint = features if isinstance(features, str) else features.fingerprint
    manifest = FeaturesManifest.read(run.features(fingerprint))
    if manifest.fingerprint != fingerprint:
        raise VersionMismatchError(f"{run.features(fingerprint)} holds features {manifest.fingerprint}")
    return ray.data.read_parquet(str(committed(run.features(fingerprint)) / split), columns=columns)


def arrow_columns(table, manifest: FeaturesManifest) -> dict[str, np.ndarray]:
    """An Arrow batch of feature rows -> numpy columns for `decode_batch`, without a Python object
    per row: `seq_z` becomes (rows, L x bytes_per_row) uint8 over the Arrow buffer, `hist_items`
    (rows, raw_seq_len) from the list's flat values, scalars zero-copy where Arrow allows."""
    out = {}
    for name in table.column_names:
        column = table.column(name)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if name == SEQ_Z:
            out[name] = codec.binary_to_rows(column, manifest.seq_len * manifest.bytes_per_row)
        elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            out[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def decode_batch(batch: dict[str, np.ndarray], manifest: FeaturesManifest, width: Optional[int] = None,
                 with_seq: bool = True, with_raw: bool = False) -> dict:
    """Feature rows (numpy columns: as Ray Data's numpy batches or `arrow_columns` give them) -> the VM batch.

    `width` keeps a prefix of each stored z (Matryoshka: any prefix is usable alone); None keeps
    all `manifest.width` coordinates. Padded slots of `seq` are zeros and False in `seq_mask`.
    `with_seq=False` (VMs without the LoopFM feature) skips the sequence: `seq` is (n, 0, width).
    `with_raw=True` (the rawseq arms) adds the raw-token slots `raw_items`, `raw_cats`,
    `raw_surfaces`, `raw_labels` (n, seq_len) and `raw_mask`.
    """
    width = manifest.width if width is None else width
    if not 0 < width <= manifest.width:
        raise ValueError(f"width must be in 1..{manifest.width} (the stored z width), got {width}")
    n, length = len(batch[LABEL]), manifest.seq_len if with_seq else 0
    if with_seq:
        packed = codec.from_binary_column(batch[SEQ_Z], length * manifest.bytes_per_row)
        seq = codec.decode(packed.reshape(n * length, manifest.bytes_per_row), manifest.dtype, manifest.width)
        mask = np.arange(length)[None, :] >= (length - np.asarray(batch[SEQ_LEN_VALID]))[:, None]
        seq = seq.reshape(n, length, manifest.width)[:, :, :width] * mask[:, :, None]
    else:
        seq, mask = np.zeros((n, 0, width), dtype=np.float32), np.zeros((n, 0), dtype=bool)
    context = [np.asarray(batch[c], dtype=np.int64) for c in manifest.context_columns]
    out = {
        "user": np.asarray(batch[idx("user_id")], dtype=np.int64),
        "uid": np.asarray(batch["user_id"], dtype=np.int64),
        "item": np.asarray(batch[idx("item_id")], dtype=np.int64),
        "category": np.asarray(batch[idx("category")], dtype=np.int64),
        "context": np.stack(context, axis=1) if context else np.zeros((n, 0), dtype=np.int64),
        **{c: _matrix(batch[c], manifest.raw_seq_len) for c in HISTORY_COLUMNS},
        DENSE: _matrix(batch[DENSE], len(manifest.dense_names), np.float32),
        "seq": seq.astype(np.float32, copy=False),
        "seq_mask": mask,
        "kd_logit": np.asarray(batch[KD_LOGIT], dtype=np.float32),
        "label": np.asarray(batch[LABEL], dtype=np.float32),
    }
    if with_raw:
        out.update({c: _matrix(batch[c], manifest.seq_len) for c in RAW_COLUMNS})
        out["raw_mask"] = out[RAW_LABELS] != 0
    return out


def _matrix(column: np.ndarray, length: int, dtype=np.int64) -> np.ndarray:
    """A list column (object array of arrays from parquet, or already 2-D) as (rows, length)."""
    if column.dtype == object:
        return np.stack(column).astype(dtype) if len(column) else np.zeros((0, length), dtype=dtype)
    return np.asarray(column, dtype=dtype).reshape(len(column), length)
