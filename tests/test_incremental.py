"""The loop's increment: append new events, embed only them, and get what a full re-embed gives.

One run whose log holds the smoke data minus its last day; that day is appended with
`logs append`, embedded with `embed --incremental`, and compared with a full pass of the FM
(same checkpoint, same compressor) over the union of both.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data.expressions import col

from conftest import SMOKE, ensure_local_ray, held_process, waiting_on_a_lock
from loopfm.store import codec
from loopfm.store.deltas import chain_max_ts


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory, smoke_config):
    """(cfg, run, day-6 file): the smoke log without its last day, FM + full store, then the day appended."""
    from loopfm.datasets.ingest import validate_stage
    from loopfm.datasets.splits import split_stage
    from loopfm.datasets.synthetic import generate_stage
    from loopfm.fm.embed import embed_stage
    from loopfm.fm.train import fm_train_stage
    from loopfm.pipeline import cycle_stage
    from loopfm.rundir import RunDir

    ensure_local_ray()
    cfg = smoke_config.updated({"fm.num_workers": 0})
    root = tmp_path_factory.mktemp("grown")
    run = RunDir(root / "run")
    generate_stage(cfg, run)
    files = sorted(run.source.glob("*.parquet"))
    log = pa.concat_tables([pq.read_table(f) for f in files])
    cut = int(log["ts"].to_numpy().max()) - 86_400  # the last day
    for f in files:
        f.unlink()
    old = log.filter(pa.compute.less_equal(log["ts"], cut))
    pq.write_table(old, run.source / "part-00000.parquet")
    day = root / "day6.parquet"
    pq.write_table(log.filter(pa.compute.greater(log["ts"], cut)), day)
    validate_stage(cfg, run)
    split_stage(cfg, run)
    fm_train_stage(cfg, run)
    base = embed_stage(cfg, run)
    assert base.rows == old.num_rows and base.max_ts <= cut
    cycle_stage(cfg, run, [str(day)], "auto")  # append + embed --incremental
    return cfg, run, day, cut


def _rows(paths) -> dict[str, np.ndarray]:
    import pyarrow.dataset as pads

    from loopfm.store.parquet import data_files

    files = [str(f) for p in paths for f in data_files(p)]
    table = pads.dataset(files, format="parquet").to_table().sort_by("event_id")
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


def _full_reembed(cfg, run, context: int):
    """Every log event (log + appended) through one full pass of the base store's FM and compressor."""
    from loopfm.fm.incremental import union_rows

    table = pa.concat_tables([pa.Table.from_pandas(b) for b in union_rows(cfg, run, context).iter_batches(
        batch_format="pandas")]).sort_by("event_id")
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


@pytest.mark.timeout(300)
def test_incremental_delta_equals_a_full_reembed_of_the_union(grown_run):
    from loopfm.store.deltas import open_chain
    from loopfm.store.resolve import resolve_store

    cfg, run, day, cut = grown_run
    chain = open_chain(run, resolve_store(cfg, run)[0])  # `cycle` appended the day and embedded it as a delta
    assert len(chain) == 2
    delta = chain[1][1]
    new_ids = np.sort(pq.read_table(day, columns=["event_id"])["event_id"].to_numpy())
    got = _rows([chain[1][0]])
    assert delta.rows == len(new_ids) and delta.since is not None and delta.since <= cut
    np.testing.assert_array_equal(got["event_id"], new_ids)  # every new event once: no gaps, no duplicates

    full = _full_reembed(cfg, run, cfg.fm.context)
    mine = np.isin(full["event_id"], new_ids)
    np.testing.assert_array_equal(full["event_id"][mine], got["event_id"])
    np.testing.assert_allclose(got["fm_logit"], full["fm_logit"][mine], atol=1e-5, rtol=0)
    dim, dtype = cfg.embed.compress.width, cfg.embed.compress.dtype
    z_inc, z_full = (codec.decode(codec.from_binary_column(list(z), codec.bytes_per_row(dim, dtype)), dtype, dim)
                     for z in (got["z"], full["z"][mine]))
    step = 1 / 8 if dtype == "int4" else 1e-3  # a value on a rounding edge may flip one step
    assert np.abs(z_inc - z_full).max() <= step + 1e-6
    assert (z_inc == z_full).mean() > 0.999

    # The old events' rows in the base store are the full pass's too.
    base = _rows([chain[0][0]])
    old = np.isin(full["event_id"], base["event_id"])
    np.testing.assert_allclose(base["fm_logit"], full["fm_logit"][old], atol=1e-5, rtol=0)

    # The comparison can fail: a prefix shorter than the receptive field changes new events' outputs.
    short = _full_reembed(cfg, run, context=1)
    assert np.abs(short["fm_logit"][np.isin(short["event_id"], new_ids)] - got["fm_logit"]).max() > 1e-3


@pytest.mark.timeout(120)
def test_append_refuses_events_that_are_not_newer(grown_run):
    from loopfm.datasets.append import appended_batches, logs_append_stage
    from loopfm.errors import DataValidationError

    cfg, run, day, _ = grown_run
    before = appended_batches(run)
    with pytest.raises(DataValidationError, match=r"at or before the log's newest event.*nothing was appended"):
        logs_append_stage(cfg, run, [str(day)], "auto")
    assert appended_batches(run) == before


@pytest.mark.timeout(300)
def test_second_increment_needs_new_events_and_compaction_folds_the_chain(grown_run):
    from loopfm.errors import MissingInputError
    from loopfm.fm.embed import embed_stage
    from loopfm.store.deltas import compact_stage, open_chain
    from loopfm.store.resolve import resolve_store

    cfg, run, day, _ = grown_run
    chain = open_chain(run, resolve_store(cfg, run)[0])
    with pytest.raises(MissingInputError, match="no events after ts"):
        embed_stage(cfg, run, incremental=True, since="last")
    rows = {int(i) for p, _ in chain for i in _rows([p])["event_id"]}
    kept = chain[1][0].parent.parent / "kept-delta"
    shutil.copytree(chain[1][0], kept)
    compacted = compact_stage(cfg, run)
    after = open_chain(run, resolve_store(cfg, run)[0])
    assert len(after) == 1 and compacted.rows == len(rows) == after[0][1].rows
    assert set(_rows([after[0][0]])["event_id"].tolist()) == rows
    # A compaction killed after folding but before removing the delta: the delta is not read twice.
    shutil.copytree(kept, chain[1][0])
    assert len(open_chain(run, resolve_store(cfg, run)[0])) == 1
    shutil.rmtree(chain[1][0])


def test_block_trim_keeps_each_users_last_old_events_and_every_new_one():
    """Trimming each block to its users' last `tail` old rows loses none of the global last `tail`."""
    from loopfm.fm.incremental import tail_of_users

    rng = np.random.default_rng(0)
    n = 3000
    batch = {"event_id": rng.permutation(n).astype(np.int64), "user_id": rng.integers(0, 40, n),
             "ts": rng.integers(0, 500, n)}  # many ts ties: the order is (ts, event_id)
    users, since, tail = np.arange(0, 40, 2), 400, 7
    blocks = np.array_split(np.arange(n), 3)
    kept = np.concatenate([tail_of_users({k: v[b] for k, v in batch.items()}, users, since, tail)["event_id"]
                           for b in blocks])
    want = []
    for u in users:
        mine = np.flatnonzero(batch["user_id"] == u)
        mine = mine[np.lexsort((batch["event_id"][mine], batch["ts"][mine]))]
        old = mine[batch["ts"][mine] <= since]
        want += list(batch["event_id"][old[-tail:]]) + list(batch["event_id"][mine[batch["ts"][mine] > since]])
    final = []
    for u in users:  # what continued_chunks keeps of the trimmed rows: the last `tail` old ones + the new ones
        rows = np.flatnonzero(np.isin(batch["event_id"], kept) & (batch["user_id"] == u))
        rows = rows[np.lexsort((batch["event_id"][rows], batch["ts"][rows]))]
        old = rows[batch["ts"][rows] <= since]
        final += list(batch["event_id"][old[-tail:]]) + list(batch["event_id"][rows[batch["ts"][rows] > since]])
    assert sorted(final) == sorted(want)
    assert len(kept) < n / 2  # the trim does drop rows


def _receptive_fields(chunks: dict, context: int) -> dict[int, tuple]:
    """event id -> the tokens its FM output depends on: its own and its `context` predecessors'."""
    from loopfm.fm.chunks import TOKENS

    fields = {}
    for row, j in zip(*np.nonzero(chunks["out"])):
        lo = max(0, j - context)
        fields[int(chunks["event_id"][row, j])] = tuple(tuple(chunks[t][row, lo:j + 1]) for t in TOKENS)
    return fields


def test_continued_chunks_give_new_events_the_full_pass_tokens_despite_timestamp_ties():
    """Trim per block, shuffle, continue: each new event's receptive field, `prev_label` tokens
    included, is the full pass's, even when the oldest position it needs sits in a run of tied
    timestamps (its label comes from before the whole run)."""
    from loopfm.datasets.schema import CATEGORY, ITEM_ID, LABEL, SURFACE, idx
    from loopfm.fm.chunks import block_chunks
    from loopfm.fm.incremental import continued_chunks, tail_of_users

    rng = np.random.default_rng(4)
    n, context, chunk_len, since = 4000, 5, 12, 170
    batch = {"event_id": rng.permutation(n).astype(np.int64), "user_id": rng.integers(0, 30, n),
             "ts": rng.integers(0, 200, n) // 4 * 4, LABEL: rng.integers(0, 2, n), SURFACE: rng.integers(0, 3, n),
             idx(ITEM_ID): rng.integers(2, 50, n), idx(CATEGORY): rng.integers(2, 9, n)}  # ts in steps of 4: ties
    users = np.arange(0, 30, 2)
    full = _receptive_fields(block_chunks(batch, chunk_len, context, 10_000, 20_000), context)
    trimmed = [tail_of_users({k: v[b] for k, v in batch.items()}, users, since, context + 1)
               for b in np.array_split(np.arange(n), 3)]
    union = {k: np.concatenate([t[k] for t in trimmed]) for k in batch}
    got = _receptive_fields(continued_chunks(union, chunk_len, context, since, (10_000, 20_000)), context)
    new = batch["event_id"][np.isin(batch["user_id"], users) & (batch["ts"] > since)]
    assert sorted(got) == sorted(new.tolist())
    assert all(got[e] == full[e] for e in got)
    assert len(union["event_id"]) < n / 2


@pytest.mark.timeout(120)
def test_a_changed_compressor_is_refused(grown_run):
    from loopfm.errors import VersionMismatchError
    from loopfm.fm.embed import embed_stage
    from loopfm.store.resolve import resolve_store

    cfg, run, _, _ = grown_run
    path = resolve_store(cfg, run)[0] / "compressor.pt"
    saved = path.read_bytes()
    try:
        path.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        with pytest.raises(VersionMismatchError, match="compressor.pt does not match the hash"):
            embed_stage(cfg, run, incremental=True, since="last")
    finally:
        path.write_bytes(saved)


# `embed --incremental` stopped at the worst point: the chain read and its lock held, the delta
# half written into its temp dir (the FM pass itself is skipped: it adds only time), nothing published.
HELD_INCREMENT = """
import sys, time
from pathlib import Path
from loopfm.config import load_config
from loopfm.fm import incremental
from loopfm.rundir import RunDir
run, gate = RunDir(sys.argv[1]), Path(sys.argv[2])

class HalfWritten:
    def write_parquet(self, path):
        (Path(path) / "0000.parquet").write_bytes(b"PAR1 half a file")
        gate.write_text(path)
        while True:
            time.sleep(1)

incremental.extract_rows = lambda *args: HalfWritten()
incremental.incremental_embed(load_config(sys.argv[3], ["ray.progress_bars=false", "fm.num_workers=0"]), run)
"""


def _later_batch(run, day, k: int, path) -> int:
    """The day-6 events moved k days later with new ids (a batch `logs append` takes); returns its rows."""
    table = pq.read_table(day)
    ts, ids = table["ts"], table["event_id"]
    table = table.set_column(table.schema.get_field_index("ts"), "ts",
                             pa.compute.add(ts, pa.scalar(k * 86_400, ts.type)))
    table = table.set_column(table.schema.get_field_index("event_id"), "event_id",
                             pa.compute.add(ids, pa.scalar(k << 40, ids.type)))
    pq.write_table(table, path)
    return table.num_rows


@pytest.mark.timeout(360)  # with the module's fixtures when run alone
def test_a_delta_short_of_a_row_is_refused_before_it_is_published(grown_run, tmp_path, monkeypatch):
    """The increment's extraction loses one new event: `embed --incremental` refuses to publish the
    delta, naming itself, the counts and the delta's directory; the chain is as it was."""
    from loopfm.datasets.append import logs_append_stage
    from loopfm.errors import VersionMismatchError
    from loopfm.fm import incremental
    from loopfm.store.deltas import open_chain
    from loopfm.store.resolve import resolve_store

    cfg, run, day, _ = grown_run
    n = _later_batch(run, day, 10, tmp_path / "batch.parquet")
    logs_append_stage(cfg, run, [str(tmp_path / "batch.parquet")], "auto")
    base_path, base = resolve_store(cfg, run)
    before = [p for p, _ in open_chain(run, base_path)]
    pending = incremental._new_events(run, chain_max_ts(open_chain(run, base_path)))[1]
    victim = int(pq.read_table(tmp_path / "batch.parquet", columns=["event_id"])["event_id"][0].as_py())
    extract = incremental.extract_rows
    monkeypatch.setattr(incremental, "extract_rows",
                        lambda *args: extract(*args).filter(expr=col("event_id") != victim))
    with pytest.raises(VersionMismatchError,
                       match=rf"embed --incremental: store at .*store_deltas/{base.store_version}/"
                             rf"\..* holds {pending - 1} rows, expected {pending} "
                             rf"\(one per event embedded\); not published"):
        incremental.incremental_embed(cfg, run)
    assert pending >= n and [p for p, _ in open_chain(run, base_path)] == before
    assert not [p.name for p in run.store_deltas(base.store_version).iterdir() if p.name.startswith(".")]


@pytest.mark.timeout(360)  # with the module's fixtures when run alone
def test_compaction_waits_for_a_running_increment_and_a_killed_one_loses_nothing(grown_run, tmp_path):
    """`store compact` while `embed --incremental` holds the chain with its delta written but not
    published: compaction waits (before: it folded and removed the delta the increment extends, so
    the increment then published a delta whose parent was gone and every reader refused the chain).
    The increment is SIGKILLed there: compaction then folds the chain, every event once, the dead
    increment's temp dir is reaped, and its events are still to embed (the next increment's count)."""
    from loopfm.datasets.append import logs_append_stage
    from loopfm.fm.incremental import _new_events, incremental_embed
    from loopfm.store.deltas import compact_stage, open_chain
    from loopfm.store.resolve import resolve_store

    cfg, run, day, _ = grown_run
    _later_batch(run, day, 20, tmp_path / "first.parquet")
    logs_append_stage(cfg, run, [str(tmp_path / "first.parquet")], "auto")
    base_path = resolve_store(cfg, run)[0]
    pending = _new_events(run, chain_max_ts(open_chain(run, base_path)))[1]
    incremental_embed(cfg, run)  # the chain: base <- ... <- d0
    before = open_chain(run, base_path)
    stored = {int(i) for p, _ in before for i in _rows([p])["event_id"]}
    assert len(before) >= 2 and before[-1][1].rows == pending
    second = _later_batch(run, day, 30, tmp_path / "second.parquet")
    logs_append_stage(cfg, run, [str(tmp_path / "second.parquet")], "auto")

    held, where = held_process(HELD_INCREMENT, run.root, tmp_path / "held.ready", SMOKE, gate=tmp_path / "held.ready")
    held_tmp = Path(where)
    result = {}

    def compact():
        try:
            result["manifest"] = compact_stage(cfg, run)
        except BaseException as err:  # noqa: BLE001 -- re-raised below
            result["error"] = err

    compaction = threading.Thread(target=compact)
    compaction.start()
    try:
        deadline = time.monotonic() + 60
        while compaction.is_alive() and not waiting_on_a_lock(compaction) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert compaction.is_alive() and waiting_on_a_lock(compaction), f"compaction did not wait: {result}"
        assert [p for p, _ in open_chain(run, base_path)] == [p for p, _ in before]  # d0 still there, unfolded
        os.kill(held.pid, signal.SIGKILL)  # the worst point: the delta half written, the chain held, nothing published
        held.wait(30)
        compaction.join(120)
    finally:
        if held.poll() is None:
            held.kill()
            held.wait(30)
    assert not compaction.is_alive(), "compaction never finished after the increment was killed"
    if "error" in result:
        raise result["error"]

    chain = open_chain(run, base_path)
    assert len(chain) == 1 and result["manifest"].rows == len(stored)
    assert sorted(_rows([base_path])["event_id"].tolist()) == sorted(stored)  # base + d0, every event once
    assert not held_tmp.exists() and not list(run.store_deltas(chain[0][1].store_version).iterdir())
    assert _new_events(run, chain_max_ts(chain))[1] == second  # the killed increment's events: still to embed
    print(f"compact beside a killed increment: {len(before) - 1} deltas folded, {len(stored)} rows once each, "
          f"{second} events left to embed")
