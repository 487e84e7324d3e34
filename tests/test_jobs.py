"""`ray job submit` runs the pipeline on a Ray head started like a real cluster's (`ray start --head`).

The head is a separate process group, started here and torn down here by signal (never `ray stop`,
which would also stop every other Ray on the machine). The job ships the repo as its
`working_dir`, exactly as `ray job submit --working-dir . -- loopfm run ...` does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import REPO
from loopfm.config import DEFAULT_ARMS

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


def _start_head(log: Path) -> tuple[subprocess.Popen, str]:
    """One `ray start --head --block` on fresh ports; returns the process and its dashboard address
    once the job API answers. Raises with the head's output when it exits first."""
    from ray.job_submission import JobSubmissionClient

    gcs, dashboard, *agents = _free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # the cluster's nodes run this project's venv
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
         "--disable-usage-stats",
         # Every Ray node binds the ports below; the defaults (52365, 10001, ...) are taken by any other
         # Ray on this machine (the test session's own, a developer's), and a head without its job
         # agent answers every submission with "No available agent".
         *(f"--{flag}={port}" for flag, port in zip(
             ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "ray-client-server-port"), agents))],
        env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return head, address
        except Exception:
            if head.poll() is not None or time.time() > deadline:
                _stop(head)
                raise RuntimeError(
                    f"ray head (exit {head.poll()}) did not come up:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.25)


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


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head --block` process on loopback; yields its job-submission address.

    A head that dies while starting (a port another process took between our probe and its bind)
    is started again on fresh ports, up to three times; the last failure carries the head's log.
    """
    logs = tmp_path_factory.mktemp("head")
    for attempt in range(3):
        try:
            head, address = _start_head(logs / f"head{attempt}.log")
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield address
    finally:
        _stop(head)


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


@pytest.mark.timeout(600)
def test_job_submit_runs_the_smoke_pipeline(ray_head, smoke_trained, tmp_path):
    """The job ships the code and runs every stage of `loopfm run` on the cluster. The run directory
    starts as the session's trained smoke run (what a user resubmitting after a finished `loopfm
    run` has): the job must find data, FM, store and features current through the job path and
    train only the VMs the report still lacks. The stages' own work is tested in test_pipeline."""
    out = tmp_path / "run"
    shutil.copytree(smoke_trained[0].root, out)
    # one seed per arm: the job mechanism is under test here, the experiment has its own tests
    status, logs = _submit_and_wait(ray_head, f"loopfm run --config configs/smoke.yaml --out {out} "
                                              "--set experiment.seeds=1 --set ray.progress_bars=false")
    assert status == "SUCCEEDED", logs[-3000:]
    for stage in ("data split", "fm train", "embed", "features"):
        assert f"{stage}: " in logs and f"run: stage `{stage}` done" in logs, stage
    assert logs.count("is current, skipped") >= 4
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["arms"]) == set(DEFAULT_ARMS)
    assert (out / "report" / "report.md").is_file() and (out / "report" / "arms.png").is_file()
    assert len(list((out / "vm").glob("*/seed0-*"))) == len(DEFAULT_ARMS)  # the missing arms trained by the job
    assert "run: finished" in logs


@pytest.mark.timeout(120)
def test_failed_job_names_the_missing_file(ray_head, tmp_path):
    status, logs = _submit_and_wait(ray_head, f"loopfm run --config configs/no_such.yaml --out {tmp_path / 'x'}", 100)
    assert status == "FAILED"
    assert "configs/no_such.yaml" in logs
    assert not (tmp_path / "x").exists()
