"""`ray job submit` runs the pipeline on a Ray head started like a real cluster's (`ray start --head`).

The head is a separate process group, started here and torn down here by signal (never `ray stop`,
which would also stop every other Ray on the machine). The job ships the repo as its
`working_dir`, exactly as `ray job submit --working-dir . -- loopfm run ...` does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

BIN = Path(sys.executable).parent
EXCLUDES = ["runs", "wandb", "**/__pycache__", "*.egg-info", ".ruff_cache", ".pytest_cache"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head --block` process on loopback; yields its job-submission address."""
    from ray.job_submission import JobSubmissionClient

    dashboard = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # the cluster's nodes run this project's venv
    log = tmp_path_factory.mktemp("head") / "head.log"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}", f"--dashboard-port={dashboard}",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
         "--disable-usage-stats",
         # Every Ray node binds the agent ports below; the defaults (52365, ...) are taken by any other
         # Ray on this machine (the test session's own, a developer's), and a head without its job
         # agent answers every submission with "No available agent".
         *(f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "runtime-env-agent-port", "metrics-export-port"))],
        env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not come up:\n{log.read_text()[-2000:]}")
                time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _submit_and_wait(address: str, entrypoint: str, timeout: float = 540):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while True:  # the head answers before its job agent is up ("No available agent"): retry that only
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job} still {status} after {timeout}s"
        time.sleep(2)
    return status, client.get_job_logs(job)


@pytest.mark.timeout(600)
def test_job_submit_runs_the_smoke_pipeline(ray_head, tmp_path):
    out = tmp_path / "run"
    # one seed per arm: the job mechanism is under test here, the experiment has its own tests
    status, logs = _submit_and_wait(ray_head, f"loopfm run --config configs/smoke.yaml --out {out} "
                                              "--set experiment.seeds=1")
    assert status == "SUCCEEDED", logs[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["arms"]) == {"base", "kd", "loopfm", "kd_loopfm"}
    assert (out / "report" / "report.md").is_file() and (out / "report" / "arms.png").is_file()
    assert "run: finished" in logs


@pytest.mark.timeout(120)
def test_failed_job_names_the_missing_file(ray_head, tmp_path):
    status, logs = _submit_and_wait(ray_head, f"loopfm run --config configs/no_such.yaml --out {tmp_path / 'x'}", 100)
    assert status == "FAILED"
    assert "configs/no_such.yaml" in logs
    assert not (tmp_path / "x").exists()
