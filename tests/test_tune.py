"""`loopfm tune` for real on the smoke run: Optuna + ASHA trials training VMs through Ray Train,
interrupted by SIGINT (Ctrl-C) and resumed, then its outputs and W&B offline runs. One search does
both: each trial trains VMs, and a second search would double the suite's longest test."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time

import pytest

from conftest import SMOKE, copy_features_run
from loopfm.config import load_config
from loopfm.errors import LoopFMError
from loopfm.rundir import RunDir
from loopfm.tune.trial import read_events
from loopfm.tune.wandb import read_offline_run

SPACE = ("tune.space={train.kd_lambda: {type: float, low: 0.0, high: 1.0}, "
         "vm.pooling: {type: categorical, choices: [mean, attention]}, "
         "features.seq_len: {type: categorical, choices: [4, 8]}}")


@pytest.fixture(scope="module")
def features_run(smoke_trained, smoke_config, tmp_path_factory):
    """The smoke run with its features built (the session's, no VM; read-only: copy it)."""
    from loopfm.features.stage import features_stage

    run = copy_features_run(smoke_trained, tmp_path_factory.mktemp("tune") / "base")
    features_stage(smoke_config, run)
    return run


def _copy(run: RunDir, dest) -> RunDir:
    shutil.copytree(run.root, dest)
    return RunDir(dest)


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _leftover_placement_groups(before: set) -> None:
    """Remove the placement groups of Train runs killed with an interrupted tune, so later tests get
    every CPU (Ray's own PlacementGroupCleaner removes them too, but on its own schedule)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    for pg_id, info in placement_group_table().items():
        if info["state"] == "CREATED" and pg_id not in before:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))


@pytest.mark.timeout(900)
def test_tune_interrupted_resumes_then_writes_every_output_with_each_trial_logged_to_wandb_offline(
        features_run, tmp_path, ray_session):
    """Optuna + ASHA trials training VMs, interrupted by SIGINT (what Ctrl-C sends) once a trial
    has finished; the same call again restores the search without rerunning that trial, and the
    finished search writes its table, W&B offline runs, best config, importances and plots."""
    import ray
    from ray.tune import Tuner
    from ray.util.placement_group import placement_group_table

    from loopfm.training.vm import train_stage
    from loopfm.tune.stage import experiment_path, tune_stage

    run = _copy(features_run, tmp_path / "run")
    cfg = load_config(SMOKE, ["ray.progress_bars=false", "tune.num_samples=2", "tune.max_concurrent_trials=1",
                              "tune.second_objective=serving_bytes", SPACE])
    pgs_before = set(placement_group_table())

    def interrupt_after_first_trial():
        deadline = time.time() + 400
        while time.time() < deadline:
            events = read_events(run.tune)
            if any(e["event"] == "done" for e in events) and len([e for e in events if e["event"] == "start"]) >= 2:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=interrupt_after_first_trial, daemon=True)
    watcher.start()
    with pytest.raises(LoopFMError, match="interrupted after"):
        tune_stage(cfg, run)
    watcher.join(timeout=5)
    _leftover_placement_groups(pgs_before)
    first = {r["trial_id"]: r for r in _csv(run.tune / "results.csv")}
    finished = [t for t, r in first.items() if r["status"] in ("TERMINATED", "STOPPED")]
    assert len(finished) == 1 and len(first) <= 2  # interrupted for real: one trial done, not both
    assert all(r["status"] in ("TERMINATED", "STOPPED", "INTERRUPTED", "PENDING") for r in first.values())
    assert Tuner.can_restore(str(experiment_path(cfg, run)))

    manifest = tune_stage(cfg, run)  # the same command again: restored, not started over
    assert manifest["restored"] is True
    rows = _csv(run.tune / "results.csv")
    by_id = {r["trial_id"]: r for r in rows}
    assert len(rows) == len(by_id) == 2 == manifest["trials"]  # one row per trial
    assert all(r["status"] in ("TERMINATED", "STOPPED") for r in rows)
    starts = [e["trial_id"] for e in read_events(run.tune) if e["event"] == "start"]
    assert sorted(set(starts)) == sorted(by_id)
    for trial_id in finished:
        assert starts.count(trial_id) == 1, f"finished trial {trial_id} ran again"
        assert by_id[trial_id]["objective"] == first[trial_id]["objective"]
        assert by_id[trial_id]["epochs"] == first[trial_id]["epochs"]
    assert ray.is_initialized()

    # every trial has an offline W&B run holding its config and per-epoch metrics (the trial cut
    # short by the interrupt has one per attempt: its newest is the one that finished)
    wandb_root = run.tune / "wandb" / "wandb"
    for row in rows:
        attempts = sorted(wandb_root.glob(f"offline-run-*-{row['trial_id']}"))
        assert len(attempts) == 1 if row["trial_id"] in finished else len(attempts) >= 1
        logged = read_offline_run(attempts[-1])
        assert logged["run_id"] == row["trial_id"] and logged["project"] == cfg.tune.wandb.project
        assert logged["config"]["vm.pooling"] == row["vm.pooling"]
        epochs = [h for h in logged["history"] if "valid/auc" in h]
        if row["trial_id"] in finished:
            assert len(epochs) == int(row["epochs"]) >= 1
        else:  # a restored attempt may start from the cut-short attempt's last checkpoint
            assert 1 <= len(epochs) <= int(row["epochs"])
        assert epochs[-1]["objective"] == pytest.approx(float(row["objective"]))
        assert {"valid/ne", "best_valid_auc", "serving_bytes"} <= set(epochs[-1])
        assert not any(k.startswith("test/") for k in epochs[-1])  # trials never score test
    assert not list(wandb_root.glob("run-*"))  # nothing online

    # the best config loads, validates, and is the best row's settings
    best = load_config(run.tune / "best_config.yaml")
    top = max(rows, key=lambda r: float(r["objective"]))
    assert manifest["best"]["trial_id"] == top["trial_id"]
    assert best.vm.pooling == top["vm.pooling"] and best.features.seq_len == int(top["features.seq_len"])
    assert best.train.kd_lambda == pytest.approx(float(top["train.kd_lambda"]))
    assert best.train.use_kd and best.train.use_loopfm
    imp = json.loads((run.tune / "importances.json").read_text())
    assert set(imp["importances"]) == set(cfg.tune.space) or imp.get("note")
    for png in ("objective.png", "pareto.png"):
        assert (run.tune / png).read_bytes()[:4] == b"\x89PNG"
    assert manifest["pareto_front"]
    md = (run.tune / "results.md").read_text()
    assert all(i in md for i in by_id)

    # trials that ran to the end saved their VM: `loopfm train --config best_config.yaml` finds it,
    # and trained afresh (Train's local mode, same loop) it lands within noise of the trial's number
    done = {e["trial_id"] for e in read_events(run.tune) if e["event"] == "done"}
    if top["trial_id"] in done:
        again = train_stage(best.updated({"train.num_workers": 0}), run)
        assert abs(again.metrics["valid"]["auc"] - float(top["objective"])) < 0.03, (again.metrics["valid"], top)
