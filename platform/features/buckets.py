"""Key-range buckets on disk: a shuffle whose memory does not grow with the data.

Ray Data's sort is a barrier: every row of its input sits in the object store (spilled to disk
once the store is full) before the first sorted block comes out, so its memory grows with the
log, and for the join's output, which carries L stored embeddings per example, L times faster.
Here a pass writes each batch's rows into `<root>/bucket=<i>/` by the range of their key
(`write_buckets`, one streaming pass), and the next pass reads one bucket whole per task
(`over_buckets`). At any time only the batches in flight and one bucket per task are in
memory; a bucket holds about one sort partition's rows (`ordering.sort_boundaries`).

The files go under the stage's temp output, in the run directory, where every node of a cluster
reads and writes alike (a local folder or an object-store prefix), and go with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray

from loopfm.location import AnyPath, as_location, parquet_dataset

BUCKET = "bucket"
# Rows per batch when bucketing: files per pass are (batches x buckets), so batches far larger than
# a read block keep the files few; memory is one such batch per task, whatever the log's size.
BUCKET_BATCH_ROWS = 1 << 20


def bucket_of(keys: np.ndarray, boundaries: list[int]) -> np.ndarray:
    """The key range of each key: bucket i holds boundaries[i-1] <= key < boundaries[i], the
    partitions `Dataset.sort(key, boundaries=...)` makes."""
    return np.searchsorted(np.asarray(boundaries, dtype=np.int64), np.asarray(keys, dtype=np.int64), side="right")


def write_buckets(ds: ray.data.Dataset, key: str, boundaries: list[int], root: AnyPath,
                  batch_rows: Optional[int] = BUCKET_BATCH_ROWS) -> None:
    """Every row of `ds` into `root/bucket=<i>/` by the range of its `key` (one streaming pass).

    `batch_rows=None` buckets each block as it comes: for the output of `over_buckets`, whose
    blocks are one bucket's rows each. A batch size there would make Ray Data bundle the pass's
    one-row input blocks (bucket numbers) up to that many rows: every bucket in one task.
    """
    ds.map_batches(_tag, batch_size=batch_rows, batch_format="pyarrow", fn_args=(key, boundaries)).write_parquet(
        str(root), partition_cols=[BUCKET])


def _tag(batch: pa.Table, key: str, boundaries: list[int]) -> pa.Table:
    return batch.append_column(BUCKET, pa.array(bucket_of(batch[key].to_numpy(), boundaries)))


def buckets_under(roots: list[AnyPath]) -> list[int]:
    """Every bucket some root holds a file of, ascending (a bucket no row fell into has no folder)."""
    found = set()
    for root in map(as_location, roots):
        if root.is_dir():
            found.update(int(p.name.split("=", 1)[1]) for p in root.iterdir() if p.name.startswith(f"{BUCKET}="))
    return sorted(found)


def over_buckets(roots: list[AnyPath], fn: Callable[..., pa.Table], *args: Any) -> ray.data.Dataset:
    """Lazy Dataset of `fn(rows of bucket i under every root, *args)` for each bucket, in bucket
    order, one task per bucket."""
    buckets = buckets_under(roots)
    return ray.data.from_items([{BUCKET: i} for i in buckets], override_num_blocks=max(len(buckets), 1)).map_batches(
        _read_bucket, batch_size=None, batch_format="pyarrow", fn_args=([str(r) for r in roots], fn, *args))


def _read_bucket(batch: pa.Table, roots: list[str], fn: Callable[..., pa.Table], *args: Any) -> pa.Table:
    """map_batches fn over one block of bucket numbers (one, with a block per bucket)."""
    return pa.concat_tables([fn(read_bucket(roots, i), *args) for i in batch[BUCKET].to_pylist()])


def read_bucket(roots: list[AnyPath], i: int) -> pa.Table:
    """Bucket i's rows from every root, files in name order."""
    files = [f for root in map(as_location, roots) if (root / f"{BUCKET}={i}").is_dir()
             for f in sorted((root / f"{BUCKET}={i}").glob("*.parquet"), key=str)]
    return parquet_dataset(files).to_table()
