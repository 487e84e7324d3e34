"""Same config, same data: the same FM bytes and the same store, from two fresh run directories.

Ray Data's sampled sort boundaries, its completion-order blocks and an unseeded local shuffle
made every `fm train` a different FM (so a different store, KD targets and report). One of the
slow tests (`-m "not slow"` skips it): the session's smoke FM and store against a second FM
trained on one real Train worker and a second embed, from another fresh run directory.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest

from loopfm.datasets.schema import USER_ID
from loopfm.datasets.splits import SplitInfo
from loopfm.fm.chunks import block_chunks, chunk_users
from loopfm.fm.embed import embed_stage
from loopfm.fm.train import fm_fingerprint, fm_train_stage
from loopfm.ordering import ordered_data, sort_boundaries
from loopfm.rundir import RunDir
from loopfm.store.parquet import data_files
from loopfm.training.loop import shuffle_seed
from loopfm.weights import MODEL_FILE


def _store_rows(run: RunDir, version: str) -> dict[str, np.ndarray]:
    table = pads.dataset([str(f) for f in data_files(run.store(version))], format="parquet").to_table()
    table = table.sort_by("event_id")
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


@pytest.mark.slow
@pytest.mark.timeout(900)  # a Train worker group and an extractor pool, on a shared small machine
def test_two_fresh_runs_train_the_same_fm_bytes_and_embed_the_same_store(tmp_path, smoke_config, smoke_splits,
                                                                         smoke_embedded):
    """The session's smoke FM and store (built in their own fresh run directory) against a second
    fresh run directory's: byte for byte."""
    run_a, fm_a, store_a = smoke_embedded
    run_b = RunDir(tmp_path / "b")
    shutil.copytree(smoke_splits.root, run_b.root)
    fm_b, store_b = fm_train_stage(smoke_config, run_b), embed_stage(smoke_config, run_b)
    fingerprint = fm_fingerprint(smoke_config, SplitInfo.load(run_a))
    assert fm_a.fm_version == fm_b.fm_version
    assert (run_a.fm(fingerprint) / MODEL_FILE).read_bytes() == (run_b.fm(fingerprint) / MODEL_FILE).read_bytes()
    assert fm_a.metrics == fm_b.metrics
    assert store_a.store_version == store_b.store_version
    assert store_a.recon_error == store_b.recon_error and store_a.quant_error == store_b.quant_error
    assert (run_a.store(store_a.store_version) / "compressor.pt").read_bytes() == \
        (run_b.store(store_b.store_version) / "compressor.pt").read_bytes()
    rows_a, rows_b = _store_rows(run_a, store_a.store_version), _store_rows(run_b, store_b.store_version)
    assert rows_a.keys() == rows_b.keys() and len(rows_a["event_id"]) == store_a.rows
    for column in rows_a:
        np.testing.assert_array_equal(rows_a[column], rows_b[column], err_msg=column)


def test_sort_boundaries_depend_on_the_data_alone_and_balance_partitions():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 5000, 300_000)
    bounds = sort_boundaries(users, rows_per_partition=50_000)
    assert bounds == sort_boundaries(rng.permutation(users), rows_per_partition=50_000)  # not the row order
    assert bounds == sorted(set(bounds)) and all(isinstance(b, int) for b in bounds)
    sizes = np.bincount(np.searchsorted(bounds, users, side="right"))
    assert len(sizes) == 6 and sizes.max() < 60_000  # about rows_per_partition each
    # One partition: a boundary above every id, since none at all would make Ray sample its own.
    assert sort_boundaries(np.array([4, 9, 9]), rows_per_partition=10) == [10]
    assert sort_boundaries(np.zeros(0, np.int64), 10) == [0]


@pytest.mark.timeout(120)
def test_chunk_users_gives_the_same_blocks_in_the_same_order_every_time(ray_session):
    """Blocks decide which chunks share a batch: with fixed boundaries and ordered execution, two
    executions of the same events give identical block lists."""
    import pandas as pd
    import ray
    from test_fm_chunks import SIZES, block_of_users

    events = block_of_users(SIZES * 4, seed=9)
    bounds = sort_boundaries(events[USER_ID], rows_per_partition=300)
    assert len(bounds) > 2

    def blocks():
        with ordered_data():
            ds = ray.data.from_pandas(pd.DataFrame(events)).repartition(5)
            chunks = chunk_users(ds, block_chunks, bounds, chunk_len=8, context=3, valid_start=30, test_start=40)
            return [b["event_id"].tolist() for b in chunks.iter_batches(batch_size=None, batch_format="numpy")]

    first = blocks()
    assert len(first) == len(bounds) + 1
    assert blocks() == first


def test_shuffle_seeds_differ_per_seed_epoch_and_rank():
    seeds = {shuffle_seed(s, e, r) for s in range(4) for e in range(4) for r in range(2)}
    assert len(seeds) == 32 and shuffle_seed(0, 1) == shuffle_seed(0, 1, 0)
