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
    """Neither the credentials nor the endpoint (they come from the environment of every node)."""
    for secret in (S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], endpoint):
        assert secret not in text


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
    """The session's Ray, started after the S3 environment was set (conftest's `ensure_local_ray`
    starts the loopback server first), so its raylet and every worker and Serve replica resolve
    `s3://` against the loopback server (as a cluster's nodes resolve it with their instance
    profile): checked here on a worker."""
    import os

    import ray

    ray_ = conftest.ensure_local_ray()

    @ray.remote(num_cpus=0)
    def endpoint_of_a_worker():
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray.get(endpoint_of_a_worker.remote(), timeout=120) == s3_server
    return ray_


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


@pytest.fixture(scope="module")
def local_trained(tmp_path_factory, smoke_trained):
    """A local copy of the same run, free to write into: what a command on the bucket is compared with."""
    import shutil

    src, _, _ = smoke_trained
    dest = tmp_path_factory.mktemp("uri_local") / "run"
    shutil.copytree(src.root, dest, ignore=lambda folder, names: sorted(NOT_UPLOADED) if Path(folder) == src.root
                    else [])
    return RunDir(dest)


def test_drift_on_an_s3_run_writes_the_local_runs_table_to_the_bucket(s3_trained, local_trained, tmp_path,
                                                                     monkeypatch, capsys):
    import json

    from loopfm.cli import main

    run, _, _ = s3_trained
    monkeypatch.chdir(tmp_path)
    for where in (run.root, local_trained.root):
        assert main(["drift", "--config", str(SMOKE), "--out", str(where), "--slices", "3"]) == 0, \
            capsys.readouterr().err
    assert json.loads((run.report / "drift.json").read_text()) == json.loads(
        (local_trained.report / "drift.json").read_text())
    assert (run.report / "drift.md").read_text() == (local_trained.report / "drift.md").read_text()
    assert (run.report / "drift.png").is_file() and list(tmp_path.iterdir()) == []


def test_ablate_on_an_s3_run_trains_into_the_bucket_and_writes_its_table_there(s3_ray, s3_trained, tmp_path,
                                                                              monkeypatch, capsys):
    """One value, one seed, the served arm: its VM (read from the bucket's features) and the table."""
    import json

    from loopfm.cli import main
    from loopfm.rundir import ATTEMPT_KEY, read_manifest

    run, _, _ = s3_trained
    monkeypatch.chdir(tmp_path)
    before = {p.name for p in (run.root / "vm" / SERVED_ARM).iterdir()}
    assert main(["ablate", "--config", str(SMOKE), "--out", str(run.root), "--param", "train.epochs", "--values", "1",
                 "--arm", SERVED_ARM, "--set", "experiment.seeds=1", "--set", "ray.progress_bars=false"]) == 0, \
        capsys.readouterr().err
    table = json.loads((run.report / "ablation_train_epochs.json").read_text())
    assert [row["train.epochs"] for row in table["rows"]] == [1] and table["rows"][0]["auc"]["n"] == 1
    assert (run.report / "ablation_train_epochs.png").is_file()
    [new] = {p.name for p in (run.root / "vm" / SERVED_ARM).iterdir()} - before
    assert read_manifest(run.root / "vm" / SERVED_ARM / new)[ATTEMPT_KEY]  # committed by its manifest
    assert list(tmp_path.iterdir()) == []


def test_tune_on_an_s3_run_keeps_its_experiment_and_outputs_in_the_bucket_and_resumes_from_there(
        s3_ray, s3_trained, tmp_path, monkeypatch):
    """One trial (a VM trained by Ray Train inside it, on the bucket's features): Tune's experiment
    under <run>/ray, the tables, the trial events and the offline W&B run under <run>/tune; the same
    command again restores the experiment from the bucket without running the trial again."""
    import shutil

    from loopfm.config import load_config
    from loopfm.tune.stage import experiment_path, tune_stage, wandb_folder
    from loopfm.tune.trial import read_events

    run, _, _ = s3_trained
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SMOKE, ["ray.progress_bars=false", "tune.num_samples=1", "tune.max_concurrent_trials=1",
                              "tune.space={train.kd_lambda: {type: float, low: 0.0, high: 1.0}}"])
    try:
        manifest = tune_stage(cfg, run)
        assert manifest["trials"] == manifest["finished"] == 1 and manifest["restored"] is False
        assert experiment_path(cfg, run).is_dir() and str(manifest["experiment"]).startswith("s3://")
        for name in ("results.csv", "results.md", "best_config.yaml", "importances.json", "objective.png"):
            assert (run.tune / name).is_file(), name
        events = read_events(run.tune)
        assert [e["event"] for e in events] == ["start", "done"] and events[1]["vm"].startswith(f"{run.root}/vm/")
        assert list((run.tune / "wandb").rglob("run-*.wandb"))  # the trial's offline W&B run, copied up
        again = tune_stage(cfg, run)
        assert again["restored"] is True and again["best"]["trial_id"] == manifest["best"]["trial_id"]
        assert [e["event"] for e in read_events(run.tune)] == ["start", "done"]  # not run again
    finally:
        shutil.rmtree(wandb_folder(run), ignore_errors=True)
    assert list(tmp_path.iterdir()) == []


def test_freshness_writes_its_aligned_and_drifting_stores_into_the_bucket_as_it_does_locally(
        s3_trained, local_trained, smoke_config):
    """The stores `loopfm freshness` builds (no FM trained: the run's store aligned onto itself):
    committed in the bucket by their manifests, each data file the bytes the local run writes."""
    from loopfm.datasets.schema import SPLITS
    from loopfm.datasets.splits import SplitInfo
    from loopfm.fm.freshness import ALIGNMENT_FILE, aligned_store, drifting_store, slice_bounds, window_drift
    from loopfm.rundir import ATTEMPT_KEY, committed, read_manifest
    from loopfm.store.parquet import open_store
    from loopfm.store.resolve import resolve_store

    built = {}
    for run in (s3_trained[0], local_trained):
        info = SplitInfo.load(run)
        _, store = resolve_store(smoke_config, run)
        mapped, fit = aligned_store(run, smoke_config, store, store, info)
        bounds = slice_bounds(run, info, 2)
        drifting = drifting_store(run, smoke_config, [mapped, store], bounds, sum(info.rows[s] for s in SPLITS))
        assert fit > 0.99 and drifting.rows == store.rows
        built[run.remote] = [mapped, drifting, window_drift(run, drifting, bounds),
                             (committed(run.store(mapped.store_version)) / ALIGNMENT_FILE).read_bytes()]
        for m in (mapped, drifting):
            assert open_store(run.store(m.store_version)).store_version == m.store_version  # files verified
    remote, local = built[True], built[False]
    run = s3_trained[0]
    assert read_manifest(run.store(remote[0].store_version))[ATTEMPT_KEY]  # committed by its manifest
    for r, m in zip(remote[:2], local[:2]):
        assert r.store_version == m.store_version and sorted(r.files.values()) == sorted(m.files.values())
    assert remote[2] == local[2] and remote[3] == local[3]


def test_scale_reads_fms_and_features_of_an_s3_run_as_of_the_local_one(s3_trained, local_trained, smoke_config):
    from loopfm.datasets.splits import SplitInfo
    from loopfm.fm.checkpoint import FMManifest
    from loopfm.fm.train import fm_fingerprint
    from loopfm.training.scale import fm_parameters, vm_inputs_digest

    run, features, _ = s3_trained
    fm = FMManifest.read(run.fm(fm_fingerprint(smoke_config, SplitInfo.load(run))))
    assert fm_parameters(run, fm) == fm_parameters(local_trained, fm)
    assert vm_inputs_digest(run, features) == vm_inputs_digest(local_trained, features)
