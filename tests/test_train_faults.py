"""A Ray Train worker SIGKILLed mid-run: `FailureConfig` restarts the group, the VM that had finished
is not trained again, the one that was training resumes from its last epoch's checkpoint, and it
ends with the weights it has when trained alone, uninterrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest

from conftest import copy_features_run
from loopfm.features.stage import features_stage
from loopfm.rundir import RunDir
from loopfm.training.vm import arm_config, train_vm, train_vms


def _train_workers() -> list[dict]:
    import ray

    return [a for a in ray._private.state.actors().values()
            if "RayTrainWorker" in a.get("ActorClassName", "") and a.get("State") == "ALIVE"]


def _checkpoints_registered(run: RunDir) -> int:
    """How many epochs Train's controller has registered (its snapshot's report index): a worker's
    `report` returns before the controller has the checkpoint, so a kill then would lose it."""
    for snapshot in run.ray_storage.glob("vms-*/checkpoint_manager_snapshot.json"):
        try:
            return json.loads(snapshot.read_text())["current_report_index"]
        except (json.JSONDecodeError, KeyError, OSError):  # being rewritten
            return 0
    return 0


@pytest.mark.timeout(400)
def test_killed_worker_skips_the_finished_vm_and_resumes_the_next_from_its_checkpoint(
        smoke_trained, smoke_config, tmp_path):
    base = smoke_config.updated({"train.num_workers": 1, "train.epochs": 3, "train.patience": 3})
    first, second = (arm_config(base, "loopfm", seed=s) for s in (0, 1))
    runs = {name: RunDir(tmp_path / name) for name in ("alone", "killed")}
    copy_features_run(smoke_trained, runs["alone"].root)  # the train.* overrides keep its features current
    features = features_stage(base, runs["alone"])
    shutil.copytree(runs["alone"].root, runs["killed"].root)  # the same features, built once
    alone = train_vm(second, runs["alone"], features)

    run = runs["killed"]
    killed: dict = {}
    earlier = {w["Pid"] for w in _train_workers()}  # the lone fit's worker may still be listed

    def kill_in_the_second_vm():  # the first VM's 3 epochs and one of the second's are checkpointed
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if _checkpoints_registered(run) >= first.train.epochs + 1:
                for worker in (w for w in _train_workers() if w["Pid"] not in earlier):
                    os.kill(worker["Pid"], signal.SIGKILL)
                    killed["pid"] = worker["Pid"]
                    killed["epochs"] = _checkpoints_registered(run)
                    break
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_in_the_second_vm, daemon=True)
    watcher.start()
    done, resumed = train_vms([first, second], run, features)
    watcher.join(timeout=5)

    assert killed, "no Train worker was seen to kill"
    assert killed["epochs"] < 2 * first.train.epochs  # it died inside the second VM, not after it
    assert {h["pid"] for h in done.metrics["history"]} == {killed["pid"]}  # finished before: not trained again
    history = resumed.metrics["history"]
    assert [h["epoch"] for h in history] == list(range(second.train.epochs))  # each epoch once
    assert history[0]["pid"] == killed["pid"] != history[-1]["pid"]  # resumed: the dead worker's epochs were kept
    assert resumed.model_version == alone.model_version  # as if never interrupted, nor trained after another VM
    assert resumed.metrics["test"] == alone.metrics["test"]
