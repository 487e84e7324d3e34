"""A Train worker's VM batches of one split, epoch after epoch (`train.data_cache`).

The first epoch streams the worker's shard through Ray Data (`iter_torch_batches` with the Arrow
collate). With `keep=True` the Arrow batches it streamed are kept, and every later epoch shuffles
and decodes them in this process, as a bare PyTorch loop would: no Ray Data executor, prefetch
thread or object-store read per epoch, which on a small machine cost more than the model's step.
The shard a worker keeps is the one `streaming_split` gave it in the first epoch (equal row counts
per worker, so every DDP worker still takes the same number of steps).
"""

from __future__ import annotations

import threading
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
from ray.data.collate_fn import ArrowBatchCollateFn

from loopfm.features.collate import VMBatchCollate
from loopfm.features.reader import arrow_columns
from loopfm.training.loop import shuffle_seed


class ShardBatches:
    """Batches of `shard` (a `DataIterator`): streamed every epoch, or streamed once and kept.

    `shuffle_seed`: None keeps the shard's order (evaluation); otherwise epoch k is shuffled with
    `loop.shuffle_seed(shuffle_seed, k)` (Ray Data's local shuffle buffer while streaming, a
    permutation after): `shuffle_seed + k` gave VM seed s in epoch k+1 the order of seed s+1 in
    epoch k, so "independent" seeds shared their data orders. The shard's own order must be the
    same every run for the shuffle to be (`loop.ordered_data` around reading and training).
    """

    def __init__(self, shard, collate: VMBatchCollate, batch_size: int, keep: bool,
                 shuffle_seed: Optional[int] = None):
        self.shard, self.collate, self.batch_size, self.keep = shard, collate, batch_size, keep
        self.shuffle_seed = shuffle_seed
        self.columns: Optional[dict[str, np.ndarray]] = None  # the kept shard, once streamed whole

    def epoch(self, epoch: int = 0) -> Iterator[dict]:
        if self.columns is not None:
            return self._from_memory(epoch)
        return self._streamed(epoch)

    def _streamed(self, epoch: int) -> Iterator[dict]:
        keeper = _Keeping(self.collate) if self.keep else self.collate
        shuffle = {} if self.shuffle_seed is None else {
            "local_shuffle_buffer_size": 4 * self.batch_size,
            "local_shuffle_seed": shuffle_seed(self.shuffle_seed, epoch)}
        # the collate's device, or Ray's "auto" moves the batch back to the CPU where Train assigned no
        # GPU (local mode, num_workers 0, on a GPU the stage asked for)
        yield from self.shard.iter_torch_batches(batch_size=self.batch_size, collate_fn=keeper,
                                                 device=self.collate.device or "auto", **shuffle)
        if self.keep:  # reached only when the epoch ran to its end: a partial shard is never kept
            tables = keeper.tables
            self.columns = arrow_columns(pa.concat_tables(tables), self.collate.manifest) if tables else {}

    def _from_memory(self, epoch: int) -> Iterator[dict]:
        rows = len(next(iter(self.columns.values()))) if self.columns else 0
        order = (np.arange(rows) if self.shuffle_seed is None
                 else np.random.default_rng(shuffle_seed(self.shuffle_seed, epoch)).permutation(rows))
        for start in range(0, rows, self.batch_size):
            take = order[start : start + self.batch_size]
            yield self.collate.tensors({name: column[take] for name, column in self.columns.items()})


class _Keeping(ArrowBatchCollateFn):
    """The collate, also keeping each Arrow batch it saw (it runs on Ray Data's prefetch thread)."""

    def __init__(self, collate: VMBatchCollate):
        self.collate, self.tables, self._lock = collate, [], threading.Lock()

    def __call__(self, table):
        with self._lock:
            self.tables.append(table)
        return self.collate(table)
