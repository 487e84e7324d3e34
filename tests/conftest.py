"""Shared fixtures: one local Ray reused across tests, a two-node cluster on demand, smoke config.

Every test that touches Ray carries a pytest-timeout (pyproject sets a default): on small
machines most Ray failures are silent hangs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def run_loopfm(*args, cwd) -> subprocess.CompletedProcess:
    """`loopfm ARGS --config configs/smoke.yaml` as a subprocess joined to this session's Ray."""
    import ray

    script = Path(sys.executable).parent / "loopfm"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "loopfm.cli"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.run([*command, *args, "--config", str(SMOKE), "--set", "ray.progress_bars=false"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=240)

def loopfm_in_process(*args, capsys) -> tuple[int, str]:
    """`loopfm ARGS --config configs/smoke.yaml` through the CLI's `main` in this process (the
    session's Ray): (exit code, stdout + stderr). The same parser, config and stage code as the
    subprocess, without a Python and Ray start-up per command; `run_loopfm` keeps the process."""
    from loopfm.cli import main

    code = main([*args, "--config", str(SMOKE), "--set", "ray.progress_bars=false"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def waiting_on_a_lock(thread) -> bool:
    """Whether `thread` is blocked in a file lock's acquire (its Python stack says so): how the
    concurrency tests know a second writer has reached a lock the first holds."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "acquire" and "filelock" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def held_process(script: str, *args, gate: Path, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """A Python `script` in a process joined to this session's Ray; returns once it has written
    `gate` (what it wrote there): the point at which a concurrency test kills it."""
    import time

    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env)
    deadline = time.monotonic() + timeout
    while not gate.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the held process never reached {gate.name} (rc {proc.wait()})")
        time.sleep(0.05)
    return proc, gate.read_text()


os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test clusters (docs/DESIGN.md, 'Ray facts')
# Ray Train's controller notices a finished (or dead) worker group only at its next poll, every 2 s by
# default: every Train run of the suite ends that much later. Polls are cheap; a late answer to one
# is not a failure (only one unanswered for RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S is).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

_state = {"local": False}


# A test that takes one of these fixtures (here or in its module) starts Ray or a server; tests that
# start Ray, a subprocess or a server another way carry `pytest.mark.ray` themselves.
RAY_FIXTURES = {"ray_session", "two_node_cluster", "smoke_splits", "smoke_embedded", "smoke_trained",
                "grown_run", "ray_head", "served_run", "server", "replicated_server", "live", "ml_slice",
                "features_run", "embedded", "fm_run", "run_copy", "log_run", "clean_auc", "lenient",
                "s3_server", "s3_bucket"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: one of the long end-to-end tests; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "ray: starts Ray, a subprocess or a server; `make test-fast` runs the rest")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    # A test taking `two_node_cluster` shuts the session's Ray down for a cluster of its own, and the
    # next test needing the session's Ray starts it again: last in the run (a stable sort, the rest
    # keep their order), the session's Ray starts once.
    items.sort(key=lambda item: "two_node_cluster" in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True)
def _pure_tests_start_no_ray(request):
    """Under `make test-fast` (LOOPFM_TEST_FAST=1) a test that starts Ray without its marker fails."""
    yield
    ray = sys.modules.get("ray")
    if os.environ.get("LOOPFM_TEST_FAST") and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray: mark it `ray` (or take a Ray fixture)")


def _data_context_for_tests() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.shuffle_strategy = "sort_shuffle_pull_based"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors on a shared 2-core box: intra-op threads only add contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ensure_local_ray():
    """The shared local Ray (4 logical CPUs on 2 cores; docs/DESIGN.md, 'Ray facts'), started on first use."""
    import ray

    from loopfm.runtime import start_local_ray

    if ray.is_initialized() and not _state["local"]:
        ray.shutdown()
    if not ray.is_initialized():
        session_s3()  # before Ray starts: its raylet, workers and Serve replicas inherit the S3 environment
        # with its dashboard: Ray Train's PlacementGroupCleaner polls the State API (see start_local_ray)
        start_local_ray(4, dashboard=True, log_to_driver=False)
        _state["local"] = True
    _data_context_for_tests()
    return ray


@pytest.fixture
def ray_session():
    yield ensure_local_ray()


@pytest.fixture
def two_node_cluster():
    """A head and one worker node on this machine (`ray.cluster_utils.Cluster`)."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    _state["local"] = False
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    _data_context_for_tests()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end(tmp_path_factory):
    _state["tmp_path_factory"] = tmp_path_factory  # where the session's moto server logs
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _stop_session_s3()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "loopfm-test", "AWS_SECRET_ACCESS_KEY": "loopfm-test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def start_moto(port: int, log: Path) -> subprocess.Popen:
    """moto's standalone S3 server on a loopback port (a real HTTP S3 API in its own process);
    returns once it answers."""
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"moto server did not answer on port {port} (rc {proc.poll()})") from None
            time.sleep(0.1)


_s3: dict = {}  # the session's loopback S3 server: its process and the environment it set


def session_s3() -> str:
    """The session's loopback S3 server (moto's, a real HTTP S3 API in its own process), started on
    first use and kept to the end of the session, and the environment every process resolves
    `s3://` with (dummy credentials, AWS_ENDPOINT_URL), set in this process: what an instance profile
    and a real endpoint give a cluster. `ensure_local_ray` calls it before it starts the session's
    Ray, so the raylet and every worker and Serve replica of that Ray inherit the environment (as a
    cluster's nodes do), and the S3 tests need no Ray of their own. Returns the endpoint URL."""
    if not _s3:
        from loopfm.location import filesystem
        from loopfm.runtime import free_port

        port = free_port()
        factory = _state.get("tmp_path_factory")
        log = factory.mktemp("moto") if factory is not None else Path(tempfile.mkdtemp(prefix="loopfm-moto-"))
        proc = start_moto(port, log / "moto.log")
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        _s3.update(proc=proc, env=env, saved={k: os.environ.get(k) for k in env})
        os.environ.update(env)
        filesystem.cache_clear()  # resolved again against this endpoint
    return _s3["env"]["AWS_ENDPOINT_URL"]


def _stop_session_s3() -> None:
    if not _s3:
        return
    from loopfm.location import filesystem

    _s3["proc"].kill()
    _s3["proc"].wait(timeout=10)
    for k, v in _s3["saved"].items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    filesystem.cache_clear()
    _s3.clear()


@pytest.fixture(scope="module")
def s3_server():
    """The session's loopback S3 server (`session_s3`) and its environment, in this process and in
    the session's Ray. Yields the endpoint URL."""
    yield session_s3()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the loopback server: `s3://<bucket>`."""
    import uuid

    import pyarrow.fs as pafs

    bucket = f"loopfm-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def smoke_config():
    from loopfm.config import load_config

    return load_config(SMOKE, ["ray.progress_bars=false"])


@pytest.fixture(scope="session")
def smoke_splits(tmp_path_factory, smoke_config):
    """A run directory holding the smoke config's generated, validated and split log.

    Read-only for tests: copy it (shutil.copytree) before writing into it.
    """
    from loopfm.datasets.ingest import validate_stage
    from loopfm.datasets.splits import split_stage
    from loopfm.datasets.synthetic import generate_stage
    from loopfm.rundir import RunDir

    ensure_local_ray()
    run = RunDir(tmp_path_factory.mktemp("smoke_run"))
    generate_stage(smoke_config, run)
    validate_stage(smoke_config, run)
    split_stage(smoke_config, run)
    return run


@pytest.fixture(scope="session")
def smoke_embedded(tmp_path_factory, smoke_config, smoke_splits):
    """The smoke run with a trained FM (one real Ray Train worker) and its store.

    Read-only for tests: copy it (shutil.copytree) before writing into it.
    """
    import shutil

    from loopfm.fm.embed import embed_stage
    from loopfm.fm.train import fm_train_stage
    from loopfm.rundir import RunDir

    run = RunDir(tmp_path_factory.mktemp("smoke_embedded") / "run")
    shutil.copytree(smoke_splits.root, run.root)
    fm = fm_train_stage(smoke_config, run)
    store = embed_stage(smoke_config, run)
    return run, fm, store


SERVED_ARM, SERVED_SEED = "kd_loopfm", 0


def copy_features_run(smoke_trained, dest: Path):
    """A copy of the session's smoke run with its features and without its VMs: what a test that
    trains its own VMs on the smoke config's features starts from. The features are the ones the
    test's own `features_stage` call would build (the same config's `features` section), so that
    call finds them current instead of joining them again."""
    import shutil

    from loopfm.rundir import RunDir

    src = smoke_trained[0].root
    shutil.copytree(src, dest, ignore=lambda folder, names: ["vm"] if Path(folder) == src else [])
    return RunDir(dest)


@pytest.fixture(scope="session")
def smoke_trained(tmp_path_factory, smoke_config, smoke_embedded):
    """The smoke run with its features and one trained VM (SERVED_ARM, SERVED_SEED): what the
    serving tests serve, and (without the VM, `copy_features_run`) what the VM-training tests
    start from. Trained once per session.

    Read-only for tests: copy it (shutil.copytree) before writing into it.
    """
    import shutil

    from loopfm.features.stage import features_stage
    from loopfm.rundir import RunDir
    from loopfm.training.vm import arm_config, train_vm

    src, _, _ = smoke_embedded
    run = RunDir(tmp_path_factory.mktemp("smoke_trained") / "run")
    shutil.copytree(src.root, run.root)
    features = features_stage(smoke_config, run)
    vm = train_vm(arm_config(smoke_config, SERVED_ARM, SERVED_SEED), run, features)
    return run, features, vm
