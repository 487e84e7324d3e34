"""`loopfm features`: the join equals a brute-force reference, and the stage delivers it end to end.

Stored z are tagged (features_reference.tagged_z) so every decoded sequence names the store
rows it came from and can be compared with the plain rule, row for row.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from features_reference import (
    join_frames,
    reference_counts,
    reference_sequences,
    reference_window,
    sequence_tags,
    tagged_z,
    tags_of,
    unpad,
)
from ray.data.expressions import col

from conftest import SMOKE, held_process, waiting_on_a_lock
from loopfm.cli import main
from loopfm.datasets.schema import SPLITS
from loopfm.errors import VersionMismatchError
from loopfm.features import FeaturesManifest, JoinSpec, decode_batch, read_features, stage
from loopfm.features.buckets import buckets_under, over_buckets, read_bucket, write_buckets
from loopfm.features.collate import VMBatchCollate
from loopfm.rundir import RunDir
from loopfm.store import codec
from loopfm.store.parquet import seal
from loopfm.store.resolve import store_version
from loopfm.store.schema import ROW_SCHEMA, StoreManifest

FM_VERSION = "fm-fabricated"


def random_log(seed: int, users: int = 15, n: int = 900) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(vertical events, store, every event): random multi-surface events with many ties; the
    store misses a few of them."""
    rng = np.random.default_rng(seed)
    log = pd.DataFrame({
        "event_id": rng.permutation(n) + 1,
        "user_id": rng.integers(0, users, n),
        "ts": rng.integers(0, 40, n) * 25,
        "surface": rng.integers(0, 3, n),
        "label": (rng.random(n) < 0.4).astype(np.int8),
        "item_id_idx": rng.integers(1, 50, n),
        "category_idx": rng.integers(1, 6, n),
    })
    log["item_id"] = log["item_id_idx"] * 7
    store = log.sample(frac=0.97, random_state=seed)[["event_id", "user_id", "ts", "surface"]].copy()
    store["fm_logit"] = rng.normal(size=len(store)).astype(np.float32)
    return log[log["surface"] == 0].reset_index(drop=True), store, log


def history_columns(frame: pd.DataFrame, columns: tuple[str, ...]) -> list[list[tuple]]:
    """Left-padded list columns (label column last, 0 = padding) -> per row, the real entries as tuples."""
    matrices = [np.stack(frame[c].to_numpy()) if frame[c].dtype == object else frame[c] for c in columns]
    n = (matrices[-1] > 0).sum(axis=1)
    return [list(zip(*rows)) for rows in zip(*(unpad(m, n) for m in matrices))]


def expected_history(examples: pd.DataFrame, log: pd.DataFrame, spec) -> tuple[list, list]:
    """The vertical's label-aware history and the rawseq slots, by the brute-force rule."""
    vertical = log[log["surface"] == 0].assign(label=lambda d: d["label"] + 1)
    tokens = log.assign(surface1=log["surface"] + 1, label=log["label"] + 1)
    hist = reference_window(examples, vertical, spec.raw_seq_len, ["item_id_idx", "category_idx", "label"], spec.lag)
    raw = reference_window(examples, tokens, spec.seq_len, ["item_id_idx", "category_idx", "surface1", "label"],
                           spec.lag, spec.retention, spec.surfaces)
    return hist, raw


@pytest.mark.parametrize(
    "seq_len, raw_seq_len, lag, retention, surfaces, dtype",
    [
        (3, 2, 0, None, None, "int4"),  # truncation to L, every surface
        (5, 4, 150, None, (1, 2), "fp16"),  # lag, other surfaces only
        (4, 3, 50, 300, (0,), "int4"),  # lag and retention, the vertical alone
        (24, 12, 0, 200, None, "int4"),  # mostly padding
    ],
)
def test_join_matches_reference(seq_len, raw_seq_len, lag, retention, surfaces, dtype):
    width = 8
    events, store, log = random_log(seed=seq_len)
    store["tag"] = store["event_id"]
    store["z"] = list(tagged_z(store["tag"].to_numpy(), width, dtype))
    spec = JoinSpec(seq_len, raw_seq_len, lag, retention, surfaces, codec.bytes_per_row(width, dtype))

    out = join_frames(events, store, spec, log)

    expected = reference_sequences(events, store, seq_len, lag, retention, surfaces)
    assert sequence_tags(out["seq_z"], out["seq_len_valid"], spec, width, dtype) == expected
    hist, raw = expected_history(events, log, spec)
    assert history_columns(pd.DataFrame({c: list(out[c]) for c in ("hist_items", "hist_cats", "hist_labels")}),
                           ("hist_items", "hist_cats", "hist_labels")) == hist
    raw_cols = ("raw_items", "raw_cats", "raw_surfaces", "raw_labels")
    assert history_columns(pd.DataFrame({c: list(out[c]) for c in raw_cols}), raw_cols) == raw
    assert (out["seq_len_valid"] < seq_len).any()  # some windows are padded
    if seq_len < 20:
        assert (out["seq_len_valid"] == seq_len).any()  # and short ones fill up
    logit = dict(zip(store["event_id"], store["fm_logit"]))
    want = np.array([logit.get(e, np.nan) for e in events["event_id"]], dtype=np.float32)
    np.testing.assert_array_equal(out["kd_logit"], want)
    assert np.isnan(want).sum() > 0  # the store misses some events: NaN, never a neighbour's logit


# -- the stage, end to end --------------------------------------------------------------------


def read_splits(run: RunDir) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(run.splits / s).assign(split=s) for s in SPLITS], ignore_index=True)


def fabricate_store(cfg, run: RunDir, log: pd.DataFrame) -> pd.DataFrame:
    """A store in the contract (rows + manifest) with tagged z for every event of every surface."""
    c = cfg.embed.compress
    rng = np.random.default_rng(0)
    store = log[["event_id", "user_id", "ts", "surface"]].copy()
    store["fm_logit"] = rng.normal(size=len(store)).astype(np.float32)
    store["tag"] = np.arange(1, len(store) + 1)
    z = tagged_z(store["tag"].to_numpy(), c.width, c.dtype)
    version = store_version(FM_VERSION, cfg.embed, "")  # no compressor: z are fabricated
    path = run.store(version)
    path.mkdir(parents=True)
    table = pa.table({**{k: store[k].to_numpy() for k in ROW_SCHEMA.names[:-1]}, "z": codec.to_binary_column(z)})
    pq.write_table(table.cast(ROW_SCHEMA), path / "part-0.parquet")
    manifest = StoreManifest(
        store_version=version, fm_version=FM_VERSION, checkpoint_hash="none", layers=list(cfg.embed.layers),
        raw_width=64, width=c.width, prefix_widths=list(c.prefix_widths), dtype=c.dtype,
    )
    seal(path, manifest, expected_rows=len(store))
    return store


def copy_with_store(smoke_splits, smoke_config, root) -> tuple[RunDir, pd.DataFrame, pd.DataFrame]:
    run = RunDir(root)
    shutil.copytree(smoke_splits.root, run.root)
    log = read_splits(run)
    return run, log, fabricate_store(smoke_config, run, log)


@pytest.fixture
def run_with_store(smoke_splits, smoke_config, tmp_path):
    return copy_with_store(smoke_splits, smoke_config, tmp_path / "run")


OVERRIDES = ["--set", "ray.progress_bars=false", "--set", "features.lag=1800", "--set", "features.retention=172800"]


@pytest.fixture(scope="module")
def built(smoke_splits, smoke_config, tmp_path_factory):
    """The smoke splits and a fabricated store, joined once through the CLI (lag 30 min, retention 2 days)."""
    run, log, store = copy_with_store(smoke_splits, smoke_config, tmp_path_factory.mktemp("features") / "run")
    argv = ["features", "--config", str(SMOKE), "--out", str(run.root), *OVERRIDES]
    assert main(argv) == 0
    [out] = list((run.root / "features").iterdir())
    manifest = FeaturesManifest.read(out)
    return SimpleNamespace(
        run=run, log=log, store=store, argv=argv, out=out, manifest=manifest,
        spec=JoinSpec.from_manifest(manifest),
        examples=pd.concat([pd.read_parquet(out / s).assign(split=s) for s in SPLITS], ignore_index=True),
    )


@pytest.mark.timeout(240)
def test_every_vertical_event_once_in_its_split_with_its_logit(built):
    examples, vertical = built.examples, built.log[built.log["surface"] == 0]
    assert sorted(examples["event_id"]) == sorted(vertical["event_id"])
    assert (built.manifest.rows == examples["split"].value_counts().to_dict()
            == vertical["split"].value_counts().to_dict())
    merged = examples.merge(vertical[["event_id", "split"]], on="event_id", suffixes=("", "_source"))
    assert (merged["split"] == merged["split_source"]).all()
    logit = dict(zip(built.store["event_id"], built.store["fm_logit"]))
    np.testing.assert_array_equal(examples["kd_logit"], examples["event_id"].map(logit).to_numpy(np.float32))


@pytest.mark.timeout(240)
def test_stage_sequences_follow_the_rule_across_splits(built):
    examples, spec, m = built.examples, built.spec, built.manifest
    seq_z = np.stack([np.frombuffer(b, np.uint8) for b in examples["seq_z"]])
    got = sequence_tags(seq_z, examples["seq_len_valid"].to_numpy(), spec, m.width, m.dtype)
    assert got == reference_sequences(examples, built.store, spec.seq_len, spec.lag, spec.retention)
    hist, raw = expected_history(examples, built.log, spec)
    assert history_columns(examples, ("hist_items", "hist_cats", "hist_labels")) == hist
    assert history_columns(examples, ("raw_items", "raw_cats", "raw_surfaces", "raw_labels")) == raw
    vertical = built.log[built.log["surface"] == 0].reset_index(drop=True)
    dense = np.stack(examples.set_index("event_id").loc[vertical["event_id"], "dense"].to_numpy())
    prior = vertical.loc[vertical["split"] == "train", "label"].mean()

    def rate(counts):
        return (counts[:, 1] + m.prior_strength * prior) / (counts[:, 0] + m.prior_strength)

    user, item = reference_counts(vertical, "user_id", spec.lag), reference_counts(vertical, "item_id", spec.lag)
    recent = reference_counts(vertical, "user_id", spec.lag, m.counter_window)
    want = np.stack([np.log1p(user[:, 0]), rate(user), rate(recent), np.log1p(item[:, 0]), rate(item)], axis=1)
    np.testing.assert_allclose(dense, want, rtol=1e-5)
    assert m.prior == pytest.approx(prior) and item[:, 0].max() > 1  # items repeat: the counters count
    valid = examples["seq_len_valid"]
    assert valid.between(1, spec.seq_len - 1).any() and (valid == spec.seq_len).any()


@pytest.mark.timeout(240)
def test_reader_gives_the_vm_batch(built):
    m, spec = built.manifest, built.spec
    batch = next(iter(read_features(built.run, m, "valid").iter_batches(batch_size=64, batch_format="numpy")))
    vm = decode_batch(batch, m)
    assert vm["seq"].shape == (64, spec.seq_len, m.width) and vm["seq"].dtype == np.float32
    assert vm["hist_items"].shape == (64, spec.raw_seq_len) and vm["context"].shape == (64, len(m.context_columns))
    assert vm["dense"].shape == (64, len(m.dense_names)) and vm["dense"].dtype == np.float32
    assert (vm["seq_mask"].sum(axis=1) == batch["seq_len_valid"]).all()
    assert not vm["seq"][~vm["seq_mask"]].any()
    events = pd.DataFrame({"user_id": batch["user_id"], "ts": batch["ts"]})
    expected = reference_sequences(events, built.store, spec.seq_len, spec.lag, spec.retention)
    assert [list(t[mask]) for t, mask in zip(tags_of(vm["seq"]), vm["seq_mask"])] == expected
    np.testing.assert_array_equal(decode_batch(batch, m, width=4)["seq"], vm["seq"][:, :, :4])

    torch_batches = read_features(built.run, m, "valid").iter_torch_batches(
        batch_size=64, collate_fn=VMBatchCollate(m, width=4))
    tensors = next(iter(torch_batches))
    np.testing.assert_array_equal(tensors["seq"].numpy(), vm["seq"][:, :, :4])
    assert tensors["seq_mask"].dtype == torch.bool and tensors["user"].dtype == torch.int64


@pytest.mark.timeout(240)
def test_current_features_are_skipped(built):
    stamp = (built.out / "manifest.json").stat().st_mtime_ns
    assert main(built.argv) == 0
    assert (built.out / "manifest.json").stat().st_mtime_ns == stamp
    assert list((built.run.root / "features").iterdir()) == [built.out]


@pytest.mark.timeout(240)
def test_buckets_hold_their_key_range_and_a_pass_reads_one_bucket_per_task(ray_session, tmp_path):
    """`write_buckets` puts every row once into the bucket of its key's range; `over_buckets` hands
    each task one bucket, so bucketing its output again writes a file per (source, target) bucket
    pair (a pass that bundled every bucket into one task, as a batch size there once made it,
    writes one file per target and holds the whole log in one process)."""
    rng = np.random.default_rng(0)
    table = pa.table({"a": rng.integers(0, 1000, 5000), "b": rng.integers(0, 1000, 5000), "row": np.arange(5000)})
    a_bounds, b_bounds = [250, 500, 750], [300, 600]
    write_buckets(ray.data.from_arrow(table), "a", a_bounds, tmp_path / "a")
    assert buckets_under([tmp_path / "a"]) == [0, 1, 2, 3]
    edges = [-1, *a_bounds, 1000]
    for i in range(4):
        a = read_bucket([tmp_path / "a"], i)["a"].to_numpy()
        assert len(a) and ((a >= edges[i]) & (a < edges[i + 1])).all(), i
    write_buckets(over_buckets([tmp_path / "a"], pa.Table.sort_by, "row"), "b", b_bounds, tmp_path / "b",
                  batch_rows=None)
    again = [read_bucket([tmp_path / "b"], j) for j in buckets_under([tmp_path / "b"])]
    assert sorted(pa.concat_tables(again)["row"].to_pylist()) == list(range(5000))
    assert [len(list((tmp_path / "b" / f"bucket={j}").glob("*.parquet"))) for j in range(3)] == [4, 4, 4]


@pytest.mark.timeout(300)
def test_many_buckets_give_the_examples_of_one(built, monkeypatch, tmp_path):
    """The join's three bucketed passes with buckets of 1,000 rows (about a dozen user buckets and
    several item and example buckets on the smoke log, where the default size makes one of each)
    write the same examples, every column, as the one-bucket build; the files, taken in name order,
    hold event ids ascending; the bucket files are gone from the published feature set."""
    monkeypatch.setattr(stage, "ROWS_PER_PARTITION", 1000)
    shutil.copytree(built.run.root, tmp_path / "run", ignore=shutil.ignore_patterns("features"))
    assert main(["features", "--config", str(SMOKE), "--out", str(tmp_path / "run"), *OVERRIDES]) == 0
    out = tmp_path / "run" / "features" / built.out.name
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *sorted(SPLITS)]
    for split in SPLITS:
        files = sorted((out / split).glob("*.parquet"))
        ids = np.concatenate([pq.read_table(f, columns=["event_id"])["event_id"].to_numpy() for f in files])
        assert len(files) > 1 and (np.diff(ids) > 0).all(), split
        assert pq.read_table(out / split).equals(pq.read_table(built.out / split).sort_by("event_id")), split


@pytest.mark.timeout(120)
def test_store_that_does_not_match_is_refused(run_with_store, capsys):
    run, _, _ = run_with_store
    [path] = list((run.root / "store").iterdir())
    raw = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**raw, "width": raw["width"] * 2}))

    assert main(["features", "--config", str(SMOKE), "--out", str(run.root)]) == 1
    err = capsys.readouterr().err
    assert "width: store has 32, expected 16" in err
    assert not (run.root / "features").exists()


@pytest.mark.timeout(120)
def test_events_missing_from_the_store_are_refused(ray_session, run_with_store, capsys):
    """A store built from other events would give NaN KD targets: the stage names the count instead."""
    run, log, _ = run_with_store
    [path] = list((run.root / "store").iterdir())
    rows = pq.read_table(path / "part-0.parquet")
    lost = set(log.loc[(log["surface"] == 0) & (log["split"] == "test"), "event_id"].head(5))
    pq.write_table(rows.filter(pa.array(~np.isin(rows["event_id"].to_numpy(), list(lost)))), path / "part-0.parquet")
    seal(path, StoreManifest.read(path))  # a whole store, just built from other events

    assert main(["features", "--config", str(SMOKE), "--out", str(run.root), *OVERRIDES]) == 1
    assert "has no FM logit for 5 of" in capsys.readouterr().err
    assert list((run.root / "features").iterdir()) == []  # no half-written feature set


# A writer of the features output that stops at the worst point: it holds the output's lock and
# has part of the output in its temp dir (where the join's parquet files go), and never finishes.
HELD_WRITER = """
import sys, time
from pathlib import Path
from loopfm.config import load_config
from loopfm.features import stage
from loopfm.rundir import RunDir
run, gate = RunDir(sys.argv[1]), Path(sys.argv[2])

def held(*args):
    [tmp] = [p for p in (run.root / "features").iterdir() if ".tmp-" in p.name]  # the only writer so far
    (tmp / "split=train").mkdir()
    (tmp / "split=train" / "part-0.parquet").write_bytes(b"PAR1 half a file")
    (gate / "held.ready").write_text(str(tmp))
    while True:
        time.sleep(1)

stage.init_ray = lambda cfg: None  # it never gets to the join: no Ray needed
stage.build_examples = held
stage.features_stage(load_config(sys.argv[3], ["ray.progress_bars=false"]), run)
"""


@pytest.mark.timeout(360)  # with the module's fixtures when run alone
def test_a_second_features_writer_waits_and_a_killed_one_leaves_nothing(ray_session, run_with_store, smoke_config,
                                                                        tmp_path):
    """Two `features` writers of one output: the first holds it half-written; the second (the real
    stage) must wait without touching the first's temp dir, publish nothing meanwhile, and, once
    the first is SIGKILLed there, build the whole feature set and reap the dead writer's temp dir.
    A reader looking all along sees no output or a whole one (before issue 20: the second deleted
    the live writer's temp dir and both wrote at once)."""
    run, log, _ = run_with_store
    held, where = held_process(HELD_WRITER, run.root, tmp_path, SMOKE, gate=tmp_path / "held.ready")
    held_tmp = Path(where)
    out = held_tmp.parent / held_tmp.name[1:].split(".tmp-")[0]

    result, stop, seen = {}, threading.Event(), []

    def look():  # a reader of the output: absent, or manifest and every split; a last look once told to stop
        while True:
            last = stop.is_set()
            result["looks"] = result.get("looks", 0) + 1
            if out.exists():
                seen.append((out / "manifest.json").is_file() and all((out / s).is_dir() for s in SPLITS))
            if last:
                return
            time.sleep(0.005)

    def second():
        try:
            result["manifest"] = stage.features_stage(smoke_config, run)
        except BaseException as err:  # noqa: BLE001 -- re-raised below
            result["error"] = err

    reader, writer = threading.Thread(target=look), threading.Thread(target=second)
    reader.start()
    writer.start()
    try:
        deadline = time.monotonic() + 90
        while writer.is_alive() and not waiting_on_a_lock(writer) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held_tmp.is_dir(), "the second writer removed a live writer's temp dir"
        assert not out.exists(), "something was published while the first writer held the output"
        assert writer.is_alive() and waiting_on_a_lock(writer), f"the second writer did not wait: {result}"
        os.kill(held.pid, signal.SIGKILL)  # at the worst point: lock held, half the output written
        held.wait(30)
        writer.join(150)
    finally:
        if held.poll() is None:
            held.kill()
            held.wait(30)
        stop.set()
        reader.join()
    assert not writer.is_alive(), "the second writer never finished after the first was killed"
    if "error" in result:
        raise result["error"]
    vertical = log[log["surface"] == 0]
    assert result["manifest"].rows == vertical["split"].value_counts().to_dict()
    examples = pd.concat([pd.read_parquet(out / s) for s in SPLITS])
    assert sorted(examples["event_id"]) == sorted(vertical["event_id"])  # every example once, none of the half file
    assert not held_tmp.exists() and not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} looks found a partial output"
    print(f"two features writers: {len(examples)} examples once each; {result['looks']} looks, "
          f"{len(seen)} found the output, none partial")


@pytest.mark.timeout(360)  # with the module's fixtures when run alone
def test_a_lost_example_is_refused_before_the_feature_set_is_published(ray_session, run_with_store, smoke_config,
                                                                       monkeypatch):
    """The join loses one valid example (a dropped row in the shuffle): the stage refuses to publish,
    naming itself, the split's counts and both files (before: a short feature set, published)."""
    run, log, _ = run_with_store
    valid = log[(log["surface"] == 0) & (log["split"] == "valid")]
    victim = int(valid["event_id"].iloc[0])
    build = stage.build_examples
    monkeypatch.setattr(stage, "build_examples", lambda *args: build(*args).filter(expr=col("event_id") != victim))
    with pytest.raises(VersionMismatchError, match=rf"features: .*valid holds {len(valid) - 1} rows, expected "
                                                   rf"{len(valid)} \(one example per surface-0 event of "
                                                   rf".*data/splits/valid\); not published"):
        stage.features_stage(smoke_config, run)
    assert list((run.root / "features").iterdir()) == []
