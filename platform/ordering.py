"""Data order as a function of the data: Ray Datasets that keep their blocks in order, and sort
boundaries taken from the keys instead of sampled.

Same config and data, same bytes: a stage that reads or trains inside `ordered_data()` sees its
rows in one order on every run (the FM's weights, the compressor's sample and a store's files
depend on it; tests/test_determinism.py). Used by the FM and VM trainings and by the data stages
alike (chunks, embed, features), so it lives apart from the Train plumbing (`training.loop`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from ray.data import DataContext


@contextlib.contextmanager
def ordered_data() -> Iterator[None]:
    """Ray Datasets created, and Train runs started, inside keep their blocks in order.

    Ray Data otherwise hands on blocks as their tasks finish, so the order of examples (hence
    the batches, a seeded local shuffle's output, a kept shard's permutation, the compressor's
    sample) would change from run to run, and the weights with it.

    Each Dataset copies the current DataContext when it is read, and Ray Train copies it when
    the trainer is made, so setting it for the stage's duration reaches both without changing
    other stages of the same process.
    """
    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before


def sort_boundaries(keys: np.ndarray, rows_per_partition: int) -> list[int]:
    """`Dataset.sort(key, boundaries=...)` for integer `keys` (the key of every row to be sorted):
    key values at equal-row quantiles, so partitions hold about `rows_per_partition` rows each and
    the partitioning is a function of the data alone.

    Ray Data samples its own boundaries at random, and partitions decide blocks: which rows share
    a batch, what a local shuffle buffer holds when it shuffles, where a kept shard's order comes
    from. One boundary above every key when one partition holds everything (with none, Ray samples).
    """
    keys = np.asarray(keys)
    if not len(keys):
        return [0]
    parts = -(-len(keys) // rows_per_partition)
    inner = np.quantile(keys, np.arange(1, parts) / parts, method="higher") if parts > 1 else []
    return sorted({int(b) for b in inner} - {int(keys.min())}) or [int(keys.max()) + 1]
