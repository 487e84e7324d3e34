"""`loopfm train`: one VM through Ray Train on the features; its checkpoint scores like it did."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SMOKE, copy_features_run
from loopfm.cli import main
from loopfm.errors import VersionMismatchError
from loopfm.features.collate import VMBatchCollate
from loopfm.features.reader import read_features
from loopfm.features.stage import features_stage
from loopfm.training.checkpoint import load_vm
from loopfm.training.vm import arm_config, predict, train_vm
from loopfm.weights import MODEL_FILE


@pytest.fixture(scope="module")
def features_run(smoke_trained, smoke_config, tmp_path_factory):
    """The session's smoke features, no VM yet (`features_stage` finds them current)."""
    run = copy_features_run(smoke_trained, tmp_path_factory.mktemp("vm") / "run")
    return run, features_stage(smoke_config, run)


@pytest.mark.timeout(300)
def test_loopfm_vm_trains_on_a_worker_and_its_checkpoint_reproduces_its_test_auc(features_run, smoke_config):
    run, features = features_run
    cfg = arm_config(smoke_config, "kd_loopfm", seed=0).updated({"train.num_workers": 1, "vm.loopfm_width": 8})
    manifest = train_vm(cfg, run, features)
    assert manifest.arm == "kd_loopfm" and manifest.seq_width == 8 and manifest.store_version == features.store_version
    assert 1 <= manifest.metrics["best_epoch"] <= cfg.train.epochs
    assert len(manifest.metrics["history"]) >= manifest.metrics["best_epoch"]

    [vm_dir] = list((run.root / "vm" / "kd_loopfm").iterdir())
    model, loaded = load_vm(vm_dir)
    collate = VMBatchCollate(features, width=8)
    batches = read_features(run, features, "test").iter_torch_batches(batch_size=10_000, collate_fn=collate)
    scored = predict(model, batches)
    from loopfm.evaluation.metrics import evaluate

    again = evaluate(label=scored["label"], logit=scored["logit"], user=scored["user"])
    assert again["n"] == features.rows["test"]
    assert abs(again["auc"] - manifest.metrics["test"]["auc"]) < 1e-6  # the best epoch's weights were kept

    (vm_dir / MODEL_FILE).write_bytes((vm_dir / MODEL_FILE).read_bytes()[:-8] + b"tampered")
    with pytest.raises(VersionMismatchError, match="does not match its manifest"):
        load_vm(vm_dir)


@pytest.mark.timeout(300)
def test_train_command_picks_arm_and_seed_and_skips_a_current_vm(features_run, capsys):
    run, _ = features_run
    argv = ["train", "--config", str(SMOKE), "--out", str(run.root), "--arm", "base", "--seed", "3",
            "--set", "ray.progress_bars=false"]
    assert main(argv) == 0
    [vm_dir] = list((run.root / "vm" / "base").iterdir())
    assert vm_dir.name.startswith("seed3-")
    stamp = (vm_dir / "manifest.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (vm_dir / "manifest.json").stat().st_mtime_ns == stamp
    _, loaded = load_vm(vm_dir)
    assert loaded.seq_width is None and loaded.store_version is None  # the base arm never reads the store
    assert np.isfinite(loaded.metrics["test"]["auc"])
