"""A Ray Train worker SIGKILLed mid-run: `FailureConfig` restarts the group, the loop resumes from
the last epoch's checkpoint, and the VM ends where an uninterrupted run ends (within noise)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest

from loopfm.features.stage import features_stage
from loopfm.rundir import RunDir
from loopfm.training.vm import arm_config, train_vm


def _train_workers() -> list[dict]:
    import ray

    return [a for a in ray._private.state.actors().values()
            if "RayTrainWorker" in a.get("ActorClassName", "") and a.get("State") == "ALIVE"]


@pytest.mark.timeout(400)
def test_killed_worker_resumes_from_its_last_checkpoint(smoke_embedded, smoke_config, tmp_path):
    cfg = arm_config(smoke_config, "loopfm", seed=0).updated(
        {"train.num_workers": 1, "train.epochs": 3, "train.patience": 3})
    runs = {name: RunDir(tmp_path / name) for name in ("clean", "killed")}
    shutil.copytree(smoke_embedded[0].root, runs["clean"].root)
    features = features_stage(cfg, runs["clean"])
    shutil.copytree(runs["clean"].root, runs["killed"].root)  # the same features, built once
    clean = train_vm(cfg, runs["clean"], features)

    run = runs["killed"]
    killed: dict = {}
    earlier = {w["Pid"] for w in _train_workers()}  # the clean fit's worker may still be listed

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if list(run.ray_storage.glob("vm-*/checkpoint_manager_snapshot.json")):  # one is registered
                for worker in (w for w in _train_workers() if w["Pid"] not in earlier):
                    os.kill(worker["Pid"], signal.SIGKILL)
                    killed["pid"] = worker["Pid"]
                    killed["checkpoints"] = len(list(run.ray_storage.glob("vm-*/checkpoint_*/state.pt")))
                    break
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    resumed = train_vm(cfg, run, features)
    watcher.join(timeout=5)

    assert killed, "no Train worker was seen to kill"
    assert killed["checkpoints"] < cfg.train.epochs  # it died mid-run, not after the last epoch
    history = resumed.metrics["history"]
    assert [h["epoch"] for h in history] == list(range(cfg.train.epochs))  # each epoch once
    assert history[0]["pid"] == killed["pid"] != history[-1]["pid"]  # resumed: the dead worker's epochs were kept
    assert abs(resumed.metrics["test"]["auc"] - clean.metrics["test"]["auc"]) < 0.05
