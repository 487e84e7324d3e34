"""Fault tolerance of `loopfm embed` (docs/DESIGN.md, 'Run directory and stage outputs': no half store after a crash).

1. An extractor actor SIGKILLed during the store pass: Ray Data restarts the actor and retries its
   batch (it sets max_restarts=-1, max_task_retries=-1 on actor pools by default), and the sealed
   store still holds every event exactly once.
2. The driver SIGKILLed while the store's parquet files are being written: nothing appears under
   the store's final name (`rundir.atomic_output`), and a re-run completes the store.
3. A two-node cluster: the extractor pool runs with a worker node present and the store is whole.

The FM is built once per module. These tests are about extraction plumbing, not FM quality, so
the module fixture writes an untrained FM in exactly the form `fm_train_stage` leaves it
(`fm/<fingerprint>/model.pt` + `FMManifest`, version = hash of the weights) instead of paying
for a Ray Train run; set LOOPFM_TEST_TRAIN_FM=1 to go through `fm_train_stage` instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from loopfm.datasets.splits import SplitInfo
from loopfm.rundir import MANIFEST, RunDir

REPO = Path(__file__).resolve().parents[1]

# Many small batches, a two-actor pool that leaves CPUs to Ray Data's own tasks (docs/DESIGN.md, 'Ray facts'),
# a cheap compressor. The same overrides go to the subprocess in test 2 (the store version
# hashes the embed section, so the re-run must use the same ones).
OVERRIDES = {
    "ray.progress_bars": False,
    "fm.num_workers": 0,
    "fm.epochs": 1,
    "embed.batch_size": 2,
    "embed.num_actors": 2,
    "embed.actor_num_cpus": 0.5,
    "embed.compress.epochs": 1,
    "embed.compress.sample_events": 500,
}


def _extractor_actors(state: str | None = None) -> list[dict]:
    """ChunkExtractor actors of the connected cluster, from the GCS actor table.

    Ray Data names them 'MapWorker(MapBatches(ChunkExtractor))'. `ray.util.state.list_actors`
    needs the dashboard (off in tests) and refuses when several local Ray instances run on the
    machine, so this reads the GCS table the driver is already connected to.
    """
    import ray

    table = ray._private.state.actors(actor_state_name=state) if state else ray._private.state.actors()
    return [a for a in table.values() if "ChunkExtractor" in a["ActorClassName"]]


def _events_of_splits(run: RunDir) -> np.ndarray:
    from loopfm.datasets.schema import SPLITS
    from loopfm.datasets.splits import split_paths

    ids = [pq.read_table(str(split_paths(run, name)), columns=["event_id"])["event_id"].to_numpy() for name in SPLITS]
    return np.concatenate(ids)


def _assert_complete_store(run: RunDir, store: Path) -> None:
    """Manifest present, rows == events of the splits, ids unique and exactly the splits' ids."""
    from loopfm.store.parquet import data_files, open_store

    assert (store / MANIFEST).is_file(), f"no manifest in {store}"
    manifest = open_store(store)  # also re-hashes every file against the manifest
    expected = sum(SplitInfo.load(run).rows.values())
    ids = np.concatenate([pq.read_table(f, columns=["event_id"])["event_id"].to_numpy() for f in data_files(store)])
    assert manifest.rows == expected == len(ids)
    assert len(np.unique(ids)) == len(ids), "duplicate event ids in the store"
    want = _events_of_splits(run)
    assert len(want) == expected
    assert set(ids.tolist()) == set(want.tolist()), "store and splits hold different events"


def _store_pass_started(stores: Path) -> bool:
    """True once `embed_stage` has opened the store's output (its temp dir, or whatever it writes)."""
    return stores.is_dir() and any(stores.iterdir())


def _published(stores: Path) -> list[Path]:
    """Stores under a final name (the name is the version, known only once the compressor is trained)."""
    return [p for p in stores.iterdir() if not p.name.startswith(".")] if stores.is_dir() else []


def _store_path(cfg, run: RunDir) -> Path:
    from loopfm.store.resolve import resolve_store

    return resolve_store(cfg, run)[0]


def _write_untrained_fm(cfg, run: RunDir) -> None:
    """What `fm_train_stage` leaves behind, with seeded random weights."""
    import torch

    from loopfm.fm.checkpoint import FMManifest, save_fm
    from loopfm.fm.train import fm_fingerprint
    from loopfm.models.fm import CausalFM
    from loopfm.rundir import atomic_output
    from loopfm.weights import state_bytes

    info = SplitInfo.load(run)
    fingerprint = fm_fingerprint(cfg, info)
    vocab_sizes = {k: info.vocab_sizes[k] for k in ("item_id", "category")}
    torch.manual_seed(0)
    model = CausalFM(cfg.fm, vocab_sizes, info.num_surfaces)
    with atomic_output(run.fm(fingerprint)) as tmp:
        save_fm(tmp, state_bytes(model), FMManifest(
            fingerprint=fingerprint, fm_version="", fm=cfg.fm.model_dump(mode="json"), vocab_sizes=vocab_sizes,
            num_surfaces=info.num_surfaces, splits_fingerprint=info.fingerprint,
        ))


@pytest.fixture(scope="module")
def embed_cfg(smoke_config):
    return smoke_config.updated(OVERRIDES)


@pytest.fixture(scope="module")
def fm_run(smoke_splits, embed_cfg, tmp_path_factory):
    """A copy of the smoke run with an FM for `embed_cfg` (read-only: copy it per test)."""
    run = RunDir(shutil.copytree(smoke_splits.root, tmp_path_factory.mktemp("embed_faults") / "run"))
    if os.environ.get("LOOPFM_TEST_TRAIN_FM") == "1":
        from loopfm.fm.train import fm_train_stage

        fm_train_stage(embed_cfg, run)
    else:
        _write_untrained_fm(embed_cfg, run)
    return run


@pytest.fixture
def run_copy(fm_run, tmp_path):
    return RunDir(shutil.copytree(fm_run.root, tmp_path / "run"))


@pytest.mark.timeout(240)
def test_extractor_actor_killed_mid_store_pass(ray_session, embed_cfg, run_copy):
    from loopfm.fm.embed import embed_stage

    run = run_copy
    stores = run.root / "store"
    result: dict = {}

    def job():
        try:
            result["manifest"] = embed_stage(embed_cfg, run)
        except BaseException as err:  # noqa: BLE001 -- re-raised in the main thread below
            result["error"] = err

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    killed: dict = {}
    deadline = time.time() + 200
    while thread.is_alive() and time.time() < deadline and not killed:
        if _store_pass_started(stores):  # the actor pool exists only for the store pass
            for actor in _extractor_actors("ALIVE"):
                if actor["Pid"]:
                    os.kill(actor["Pid"], signal.SIGKILL)
                    killed = {"actor_id": actor["ActorID"], "pid": actor["Pid"], "job_running": thread.is_alive(),
                              "unsealed": not _published(stores)}
                    break
        time.sleep(0.05)
    thread.join(timeout=max(1.0, deadline - time.time()))
    assert not thread.is_alive(), "embed did not finish after the extractor was killed"
    if "error" in result:
        raise result["error"]

    # The kill really happened, to a store-pass actor, while the store was still being written.
    assert killed, "no store-pass ChunkExtractor actor was seen alive to kill"
    assert killed["job_running"] and killed["unsealed"], killed
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    import ray

    restarted = ray._private.state.actors(actor_id=killed["actor_id"])
    assert restarted["NumRestarts"] >= 1, restarted  # Ray Data brought the killed actor back

    final = _store_path(embed_cfg, run)
    assert final.is_dir() and not list(final.parent.glob(f".{final.name}.tmp-*"))
    assert result["manifest"].rows == sum(SplitInfo.load(run).rows.values())
    _assert_complete_store(run, final)


def _cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    env.update(RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.mark.timeout(300)
def test_driver_killed_while_writing_leaves_no_store(ray_session, embed_cfg, run_copy, tmp_path):
    from loopfm.fm.embed import embed_stage

    run = run_copy
    stores = run.root / "store"
    cmd = [sys.executable, "-m", "loopfm.cli", "embed", "--config", str(REPO / "configs" / "smoke.yaml"),
           "--out", str(run.root)]
    for key, value in OVERRIDES.items():
        cmd += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    # its embedded Ray without a dashboard (only Ray Train's State API calls need one, and embed trains
    # nothing): the kill comes sooner, nothing it checks changes (no `ray.*` key is in the store version)
    cmd += ["--set", "ray.dashboard=false"]
    log_path = tmp_path / "embed.log"
    with open(log_path, "wb") as log:
        # A new session, so the embedded Ray it starts can be cleaned up by its process group.
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=_cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    partial: list[Path] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            # Any parquet file under store/ (temp dir or not): the store pass is writing.
            partial = list(stores.rglob("*.parquet")) if stores.is_dir() else []
            if partial:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        try:  # the Ray processes the killed driver had started (same process group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log_text = log_path.read_text(errors="replace")
    output = log_text[-3000:]
    assert partial, f"the CLI never wrote store files (rc {proc.returncode}):\n{output}"
    assert proc.returncode == -signal.SIGKILL, f"the CLI was not killed mid-job (rc {proc.returncode}):\n{output}"
    assert "Started a local Ray instance" in log_text, "the CLI should start its own Ray, not join the test's"

    # No half store under the final name; the partial files sit in a hidden temp dir only.
    assert not _published(stores), f"a killed embed left {_published(stores)}"
    stale = list(stores.glob(".*.tmp-*"))
    assert stale and all(t.name.startswith(".") for t in stale)

    # A re-run completes the store under its final name; the stale temp is not part of it.
    manifest = embed_stage(embed_cfg, run)
    final = _store_path(embed_cfg, run)
    assert final.is_dir()
    assert manifest.rows == sum(SplitInfo.load(run).rows.values())
    _assert_complete_store(run, final)
    assert not list(final.parent.glob(f".{final.name}.tmp-*"))  # the killed run's temp is gone too


@pytest.mark.timeout(300)
def test_embed_on_two_node_cluster(two_node_cluster, embed_cfg, run_copy):
    """Last in the file: the fixture shuts the shared local Ray down (`ray_session` restarts it)."""
    import ray

    from loopfm.fm.embed import embed_stage

    run = run_copy
    cfg = embed_cfg.updated({"embed.batch_size": 16})  # same FM; bigger batches, a quicker job
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    manifest = embed_stage(cfg, run)
    final = _store_path(cfg, run)
    assert manifest.rows > 0
    _assert_complete_store(run, final)

    # Both nodes were still up when the job ended, and the extractor actors (two, placed with Ray
    # Data's default SPREAD strategy) ran on both of them: the worker node really did
    # extraction, with weights that reached it through the object store. This is what the
    # scheduler did in every run here; it is not a guarantee Ray makes, so if it ever packs both
    # passes onto one node this assertion, not the store, is what fails.
    assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == nodes
    placed = {a["Address"]["NodeID"] for a in _extractor_actors() if a["Address"]["NodeID"]}
    assert placed <= nodes
    assert len(placed) == 2, f"extractor actors ran on {len(placed)} of the cluster's 2 nodes"
