"""`ray job submit` on a Ray cluster started as a real one is (`ray start`), whose only shared storage is S3.

Two `ray start` nodes on this machine, each with its own temp directory and working directory
(what two machines have: nothing on local disk in common that a run could rely on), a loopback S3
server (moto) that both reach through the environment, as nodes reach a bucket through their
instance profile. Nodes are separate process groups, started here and torn down here by signal
(never `ray stop`, which would also stop every other Ray on the machine). The job ships the code
as README's cluster recipe does (`--working-dir .` for the configs, `py_modules` for the package
`make ship` lays out) and runs `loopfm run --out s3://...`; the report is read back from the
bucket, and nothing of the run is on either node's disk. Before run directories took URIs this
wrote a local folder `s3:`.

The bucket starts with the session's embedded smoke run (its split log, FM and store: a local
run's outputs, uploaded): those stages must find their outputs current through manifests read
from S3. The features (a Ray Data join on both nodes), the VMs (Ray Train, its storage path in the
bucket) and the report are computed and written by the job. Every output's own commit on S3 is
checked directly in test_rundir_location and the store's in test_store_backends.
"""


from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs
import pytest

from conftest import REPO
from loopfm.location import as_location, copy_tree

BIN = Path(sys.executable).parent
EXCLUDES = ["runs", "wandb", "**/__pycache__", "*.egg-info", ".ruff_cache", ".pytest_cache"]


def _free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM the head's process group, SIGKILL it if it lingers; a group already gone is fine."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _submit_and_wait(address: str, entrypoint: str, timeout: float = 540, runtime_env: Optional[dict] = None):
    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env = runtime_env or {"working_dir": str(REPO), "excludes": EXCLUDES}
    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while True:  # the head answers before its job agent is up ("No available agent"): retry that only
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(0.5)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job} still {status} after {timeout}s:\n{client.get_job_logs(job)[-4000:]}"
        time.sleep(0.5)
    return status, client.get_job_logs(job)

ARMS = ["base", "kd_loopfm"]
# the job under test is the storage path of every stage, not the experiment: one seed, two arms, short fits
SMALL = ["experiment.seeds=1", f"experiment.arms=[{','.join(ARMS)}]", "train.epochs=1", "ray.progress_bars=false"]
CURRENT = ("data generate", "data validate", "data split", "fm train", "embed")
WRITTEN_BY_THE_JOB = ("features", "vm")
AGENT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
               "metrics-export-port")


def _node(args: list[str], node_dir: Path, temp_dir: Path, env: dict) -> subprocess.Popen:
    """One `ray start --block` node with its own temp dir and working dir, in its own process group."""
    (node_dir / "cwd").mkdir(parents=True)
    ports = _free_ports(len(AGENT_FLAGS))
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}", *args, *(f"--{flag}={port}" for flag, port in zip(AGENT_FLAGS, ports))],
        cwd=node_dir / "cwd", env=env, start_new_session=True,
        stdout=(node_dir / "node.log").open("w"), stderr=subprocess.STDOUT)


def _alive_nodes(address: str) -> int:
    from ray.util.state import list_nodes

    try:
        return sum(n.state == "ALIVE" for n in list_nodes(address=address, timeout=5))
    except Exception:
        return 0


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    """A head and a worker node (3 logical CPUs each: docs/DESIGN.md, 'Ray facts'), both given the
    S3 environment; yields (job address, head dir, worker dir, worker temp dir). The temp dirs are
    short paths of their own: Ray's sockets live there, and a socket path is at most 107 bytes."""
    tmp_path = tmp_path_factory.mktemp("nodes")
    temp = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))
    gcs, dashboard, client = _free_ports(3)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",  # a loaded CI box can take over the default minute
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    head = _node(["--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=3",
                  "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}"],
                 tmp_path / "head", temp / "h", env)
    nodes = [head]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        nodes.append(_node([f"--address=127.0.0.1:{gcs}", "--num-cpus=3"], tmp_path / "worker", temp / "w", env))
        deadline = time.time() + 120
        while _alive_nodes(address) < 2:
            assert all(n.poll() is None for n in nodes), (tmp_path / "head" / "node.log").read_text()[-3000:]
            assert time.time() < deadline, "two nodes not alive after 120 s"
            time.sleep(1)
        yield address, tmp_path / "head", tmp_path / "worker", temp / "w"
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp, ignore_errors=True)


def _ship(dist: Path) -> Path:
    """`make ship`: this checkout's package laid out as an install (README, 'On a Ray cluster')."""
    venv = BIN.parent  # installed already: `-o` keeps make from reinstalling it
    subprocess.run(["make", "-s", "ship", f"DIST={dist}", f"VENV={venv}", "-o", f"{venv}/.installed"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return dist / "loopfm"


def _local_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.timeout(600)
def test_the_smoke_run_on_two_nodes_writes_only_to_s3(two_nodes, s3_bucket, smoke_embedded, tmp_path):
    address, head, worker, worker_temp = two_nodes
    out = f"{s3_bucket}/runs/smoke"
    copy_tree(smoke_embedded[0].root, as_location(out))
    shipped = _ship(tmp_path / "dist")
    overrides = " ".join(f"--set '{s}'" for s in SMALL)
    entrypoint = ("python -c 'import loopfm.cli; print(\"loopfm from\", loopfm.cli.__file__)' && "
                  f"loopfm run --config configs/smoke.yaml --out {out} {overrides}")
    status, logs = _submit_and_wait(address, entrypoint, timeout=420, runtime_env={
        "working_dir": str(REPO), "excludes": EXCLUDES, "py_modules": [str(shipped)]})
    assert status == "SUCCEEDED", logs[-4000:]
    for stage in CURRENT:
        assert f"run: stage `{stage}` done" in logs, stage
    assert logs.count("is current, skipped") >= len(CURRENT)
    shipped_from = next(line for line in logs.splitlines() if line.startswith("loopfm from"))
    assert str(REPO) not in shipped_from and "runtime_resources" in shipped_from, shipped_from

    fs, root = pafs.FileSystem.from_uri(out)
    with fs.open_input_stream(f"{root}/report/report.json") as f:
        report = json.loads(f.read())
    assert set(report["arms"]) == set(ARMS)
    for arm in ARMS:
        assert 0.0 < report["arms"][arm]["auc"]["mean"] < 1.0
    assert report["meta"]["run"] == out
    names = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))]
    assert f"{root}/report/report.md" in names and f"{root}/report/arms.png" in names
    for output in WRITTEN_BY_THE_JOB:  # each committed by its manifest, its data under the attempt it names
        manifests = [n for n in names if n.startswith(f"{root}/{output}/") and n.endswith("/manifest.json")
                     and "/.attempt-" not in n]
        assert manifests, output
        for manifest in manifests:
            with fs.open_input_stream(manifest) as f:
                attempt = json.loads(f.read()).get("attempt")
            folder = manifest.rsplit("/", 1)[0]
            assert attempt and any(n.startswith(f"{folder}/{attempt}/") for n in names), manifest
    assert any("/ray/" in n for n in names)  # Ray Train's storage path is in the bucket too

    worker_logs = list(worker_temp.glob("session_*/logs/worker-*"))
    assert worker_logs, "the worker node ran no task"
    for node in (head, worker):
        assert _local_files(node / "cwd") == [], node  # the run wrote nothing beside either node's processes
    assert not (REPO / "s3:").exists() and not any(Path.cwd().glob("s3:*"))


@pytest.mark.timeout(120)
def test_failed_job_names_the_missing_file(two_nodes, tmp_path):
    entrypoint = f"loopfm run --config configs/no_such.yaml --out {tmp_path / 'x'}"
    status, logs = _submit_and_wait(two_nodes[0], entrypoint, 100)
    assert status == "FAILED"
    assert "configs/no_such.yaml" in logs
    assert not (tmp_path / "x").exists()
