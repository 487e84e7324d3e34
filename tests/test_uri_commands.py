"""Commands on a run directory given as a URI (`--out s3://bucket/prefix`), against moto's S3
server on loopback: what they read comes from the bucket, what they write lands there, and
nothing is written to the local working directory.

Nothing is trained from scratch here: the session's smoke run (conftest's `smoke_trained`) is
uploaded to a bucket once per module. A local run's manifests name no attempt, which `committed`
reads as the folder itself, so the uploaded run is a valid run directory on the object store.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

import conftest
from conftest import S3_CREDENTIALS, SERVED_ARM, SMOKE
from loopfm.location import as_location
from loopfm.rundir import RunDir
from loopfm.runtime import free_port

pytestmark = pytest.mark.timeout(600)

NOT_UPLOADED = {"ray"}  # Ray Train's checkpoints of finished runs: nothing a command reads


def upload(local: Path, uri: str) -> RunDir:
    """The local run directory `local`, copied to `uri` (as `aws s3 sync` would)."""
    where = as_location(uri)
    for child in sorted(local.iterdir()):
        if child.name in NOT_UPLOADED:
            continue
        if child.is_dir():
            pafs.copy_files(str(child), f"{where.key}/{child.name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=where.fs)
        else:
            (where / child.name).write_bytes(child.read_bytes())
    return RunDir(uri)


def no_secret_in(text: str, endpoint: str) -> None:
    assert S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in text and S3_CREDENTIALS["AWS_ACCESS_KEY_ID"] not in text
    assert endpoint not in text and "?" not in text.replace("?)", "")


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    """One bucket for the module (the runs uploaded to it are read by several tests)."""
    name = f"loopfm-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_trained(bucket, smoke_trained):
    """The session's smoke run with features and one VM, in the bucket: (run, features, vm)."""
    run, features, vm = smoke_trained
    return upload(run.root, f"{bucket}/trained"), features, vm


@pytest.fixture(scope="module")
def s3_ray(s3_server, s3_trained):
    """The session's Ray started again after the S3 environment is set, so its raylet and every
    worker and Serve replica resolve `s3://` against the loopback server (as a cluster's nodes
    resolve it with their instance profile)."""
    import ray

    ray.shutdown()
    conftest._state["local"] = False
    yield conftest.ensure_local_ray()
    ray.shutdown()  # the next user of the session's Ray starts one without the loopback endpoint
    conftest._state["local"] = False


def test_serve_build_on_an_s3_run_writes_its_config_to_the_bucket(s3_server, s3_trained, tmp_path, monkeypatch,
                                                                 capsys):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from loopfm.cli import main
    from loopfm.serve_apps.app import AppArgs

    run, _, vm = s3_trained
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "build", "--config", str(SMOKE), "--out", str(run.root)]) == 0, capsys.readouterr().err
    text = (run.root / "serve" / "serve.yaml").read_text()
    args = AppArgs.model_validate(ServeDeploySchema.model_validate(yaml.safe_load(text)).applications[0].args)
    assert args.run_dir == str(run.root)
    assert args.vm_dir == str(run.vm(SERVED_ARM, 0, vm.fingerprint))
    no_secret_in(text, s3_server)
    assert list(tmp_path.iterdir()) == []  # nothing local


def test_the_app_serves_an_s3_run_over_http_with_the_offline_scores(s3_ray, s3_trained, smoke_trained, smoke_config):
    """`serve run`'s deploy on a run in the bucket: every replica opens its bundle (VM checkpoint,
    store, splits, feature manifest) from the URI and scores as the offline VM does."""
    import httpx
    import ray
    from ray import serve
    from test_serve import offline, request_of

    from loopfm.serve_apps.stage import ADDRESS_FILE, deploy, serve_dir, serve_refresh_stage, serve_reload_stage

    run, _, vm = s3_trained
    local, _, _ = smoke_trained
    rows, logits, _ = offline(local, local.vm(SERVED_ARM, 0, vm.fingerprint), n=20)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = deploy(smoke_config, run)
        assert args["vm_dir"].startswith(f"{run.root}/vm/")
        # what `serve run` leaves for `serve reload` / `serve refresh`: the Ray address, in the bucket
        (serve_dir(run) / ADDRESS_FILE).write_text(ray.get_runtime_context().gcs_address)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            bodies = [client.post("/v1/score", json=request_of(rows, i)).json() for i in range(len(logits))]
            models = client.get("/v1/models").json()
            state = serve_refresh_stage(smoke_config, run)  # the lookup looks at the bucket's deltas and batches
            serve_reload_stage(smoke_config, run)  # redeployed from the bucket's newest VM: the same one
            again = client.post("/v1/score", json=request_of(rows, 0)).json()
    finally:
        serve.shutdown()
    served = np.array([b["logits"][0] for b in bodies])
    assert np.abs(served - logits).max() < 1e-5
    assert {b["model_version"] for b in bodies} == {vm.model_version}
    assert {b["store_version"] for b in bodies} == {vm.store_version}
    assert str(models["models"][0]["vm_dir"]).startswith("s3://")
    assert state["store_version"] == vm.store_version and state["store_deltas"] == 0 and not state["refresh_error"]
    assert again["model_version"] == vm.model_version and abs(again["logits"][0] - logits[0]) < 1e-5

