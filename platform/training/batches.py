"""A Train worker's VM batches of one split, epoch after epoch (`train.data_cache`).

With `keep=True` the worker reads its whole shard into memory once, before its first batch, and
decodes it once (the packed `seq_z` to floats, lists to matrices: `VMBatchCollate.decode`); every
epoch (the first included) is a seeded permutation of those rows, each batch a gather of them, as
a bare PyTorch loop would do: no Ray Data executor, prefetch thread or object-store read per
epoch, which on a small machine cost more than the model's step, and no decode per batch, a
large part of a small VM's step (docs/PERFORMANCE.md, "Decisions"). The VMs of one run share what
was read and decoded (`HeldShard`). Because the first epoch is a full permutation too, training
depends on the shard's rows and the seed, not on how Ray Data cut them into files and blocks (a
local shuffle buffer of a few batches leaves epoch 0 in near time order). With `keep=False` every
epoch streams through Ray Data with its local shuffle buffer: the path for splits larger than a
worker's memory. The shard a worker keeps is the one `streaming_split` gave it (equal row counts
per worker, so every DDP worker still takes the same number of steps).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from loopfm.features.collate import VMBatchCollate
from loopfm.features.reader import arrow_columns
from loopfm.training.loop import shuffle_seed


@dataclass
class HeldShard:
    """A kept shard, shared by the VMs of one run that read it: its columns, read once, and its
    rows decoded once per kind of collate (`VMBatchCollate.key`)."""

    columns: Optional[dict[str, np.ndarray]] = None
    decoded: dict[tuple, dict[str, np.ndarray]] = field(default_factory=dict)


class ShardBatches:
    """Batches of `shard` (a `DataIterator` or a Dataset): kept in memory and permuted, or streamed
    every epoch.

    `shuffle_seed`: None keeps the shard's order (evaluation); otherwise epoch k is shuffled with
    `loop.shuffle_seed(shuffle_seed, k)`: `shuffle_seed + k` gave VM seed s in epoch k+1 the order
    of seed s+1 in epoch k, so "independent" seeds shared their data orders. The shard's own order
    must be the same every run for the shuffle to be (`ordering.ordered_data` around reading and
    training). `held`: what other VMs of the run already read and decoded of this shard.
    """

    def __init__(self, shard, collate: VMBatchCollate, batch_size: int, keep: bool,
                 shuffle_seed: Optional[int] = None, held: Optional[HeldShard] = None):
        self.shard, self.collate, self.batch_size, self.keep = shard, collate, batch_size, keep
        self.shuffle_seed = shuffle_seed
        self.held = held if held is not None else HeldShard()

    @property
    def columns(self) -> Optional[dict[str, np.ndarray]]:
        """The kept shard's columns, once read (None while streaming)."""
        return self.held.columns if self.keep else None

    def epoch(self, epoch: int = 0) -> Iterator[dict]:
        if self.keep:
            if self.held.columns is None:
                self.held.columns = self._read_whole()
            return self._from_memory(epoch)
        return self._streamed(epoch)

    def _read_whole(self) -> dict[str, np.ndarray]:
        tables = list(self.shard.iter_batches(batch_size=None, batch_format="pyarrow"))
        return arrow_columns(pa.concat_tables(tables), self.collate.manifest) if tables else {}

    def _streamed(self, epoch: int) -> Iterator[dict]:
        shuffle = {} if self.shuffle_seed is None else {
            "local_shuffle_buffer_size": 4 * self.batch_size,
            "local_shuffle_seed": shuffle_seed(self.shuffle_seed, epoch)}
        # the collate's device, or Ray's "auto" moves the batch back to the CPU where Train assigned no
        # GPU (local mode, num_workers 0, on a GPU the stage asked for)
        yield from self.shard.iter_torch_batches(batch_size=self.batch_size, collate_fn=self.collate,
                                                 device=self.collate.device or "auto", **shuffle)

    def _from_memory(self, epoch: int) -> Iterator[dict]:
        rows = len(next(iter(self.columns.values()))) if self.columns else 0
        order = (np.arange(rows) if self.shuffle_seed is None
                 else np.random.default_rng(shuffle_seed(self.shuffle_seed, epoch)).permutation(rows))
        decoded = self.held.decoded
        if rows and self.collate.key not in decoded:
            decoded[self.collate.key] = self.collate.decode(self.columns)
        for start in range(0, rows, self.batch_size):
            yield self.collate.take(decoded[self.collate.key], order[start : start + self.batch_size])
