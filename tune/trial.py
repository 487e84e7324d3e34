"""One Tune trial: the sampled params as config overrides, then `loopfm train`'s own code path.

    params -> cfg.updated(overrides) -> arm_config(arm, train.seed)
           -> embed_stage / features_stage   (skipped when current; a new layer set or sequence
                                              length builds its store / features once, under a lock)
           -> train_vm(callbacks=[TrialReport])  (Ray Train TorchTrainer inside the Tune trial)

`TrialReport` is a Train callback that passes each epoch's metrics to Tune, plus the trial's
objective: the validation metric at the epoch early stopping keeps (chosen by `train.select_by`
exactly as `train_vm` keeps it), so the best trial's number is what `loopfm train --config
best.yaml` gets. A VM already
trained with the same fingerprint (a repeated config) is not trained again: its per-epoch
history is replayed to Tune.

ASHA does not kill a trial's actor (that would kill its Train controller before it removes its
workers' placement group); it writes `tune/.stop/<trial id>` and the VM loop leaves before its
next epoch, so Train shuts down as after any run (see `loopfm.tune.scheduler`).

Every trial appends `start` and `done` (or `stopped`) lines to `tune/trials.jsonl` (trial id,
pid, time): the audit trail that shows a restored tune did not re-run finished trials. An object
store cannot append: there each line is one object of `tune/trials/`, named by its time.

On a run directory in an object store the trials' locks (`trial_lock`) are this machine's only:
trials on two nodes may both build a store, features or a VM, each a whole attempt committed by
its manifest (the last wins), which costs time, never a half-read output.
"""

from __future__ import annotations

import json
import math
import os
import queue as std_queue
import time
import uuid
from typing import Any, Optional

import ray.tune
from filelock import FileLock
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from loopfm.config import LoopFMConfig, validate_config
from loopfm.features.stage import features_stage
from loopfm.fm.embed import embed_stage
from loopfm.location import AnyPath, as_location, is_remote
from loopfm.rundir import RunDir, output_lock
from loopfm.runtime import setup_logging
from loopfm.skeleton import current
from loopfm.training.checkpoint import VMManifest
from loopfm.training.loop import Background, scalar_metrics
from loopfm.training.vm import arm_config, arm_of, selection_value, train_vm, vm_fingerprint
from loopfm.tune.space import decode, serving_bytes

EVENTS = "trials.jsonl"
EVENT_OBJECTS = "trials"  # on an object store: one object per line of trials.jsonl
LOCKS = ".locks"
STOPS = ".stop"


class Objective:
    """Per-epoch metrics (flat keys `valid/auc`, ...) -> the same plus the trial's objective."""

    def __init__(self, metric: str, serving_bytes: int, select_by: str):
        self.metric = metric
        self.serving_bytes = serving_bytes
        self.select_by = select_by
        self.best = -math.inf
        self.at_best: Optional[dict] = None

    def __call__(self, metrics: dict) -> dict:
        valid = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("valid/")}
        value = selection_value({"auc": float("nan"), "logloss": float("nan"), **valid}, self.select_by)
        if self.at_best is None or (value == value and value > self.best):  # NaN never wins
            self.best, self.at_best = value, dict(metrics)
        b = self.at_best
        out = dict(metrics)
        out.update({
            "objective": float(b.get(f"valid/{self.metric}", float("nan"))),
            "best_epoch": int(b.get("epoch", 0)) + 1,
            "best_valid_auc": float(b.get("valid/auc", float("nan"))),
            "best_valid_ne": float(b.get("valid/ne", float("nan"))),
            "serving_bytes": self.serving_bytes,
        })
        return out


class TrialReport(UserCallback):
    """Train V2 -> Tune: each epoch's metrics (rank 0's) plus the objective, sent from wherever Train
    reports (its controller actor) through a Ray queue to the trial, which `ray.tune.report`s them.

    Ray's `TuneReportCallback` does the same through the Tune session's own inter-actor queue; with
    it a trial whose last two epochs reported close together stayed RUNNING after its function had
    returned, its last result never delivered (seen on this 2-core box). Here the trial's own
    thread drains the queue before it returns.
    """

    def __init__(self, queue, metric: str, serving_bytes: int, select_by: str):
        self.queue = queue
        self.objective = Objective(metric, serving_bytes, select_by)

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(self.objective(metrics[0]))


def train_reporting_to_tune(train, queue) -> Any:
    """Run `train()` in a thread; meanwhile pass every queued result to `ray.tune.report`."""
    fit = Background(train, name="loopfm-train")
    while True:
        done = fit.wait(0)
        try:
            ray.tune.report(queue.get(block=True, timeout=1.0))
            continue
        except std_queue.Empty:  # ray.util.queue.Empty is one
            pass
        if done:  # finished, and the queue was empty after it finished
            break
    return fit.result()


def log_event(tune_dir: AnyPath, event: str, **fields: Any) -> None:
    """One JSON line, appended in a single write (O_APPEND: concurrent trials do not interleave);
    on an object store, which cannot append, one object named by its time."""
    tune_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    line = json.dumps({"event": event, "time": round(now, 3), "pid": os.getpid(), **fields}) + "\n"
    if is_remote(tune_dir):
        (tune_dir / EVENT_OBJECTS / f"{int(now * 1000):013d}-{uuid.uuid4().hex[:8]}.json").write_text(line)
        return
    fd = os.open(tune_dir / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(tune_dir: AnyPath) -> list[dict]:
    tune_dir = as_location(tune_dir)
    if is_remote(tune_dir):
        return [json.loads(f.read_text()) for f in sorted((tune_dir / EVENT_OBJECTS).glob("*.json"), key=str)]
    f = tune_dir / EVENTS
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def trial_lock(run: RunDir, name: str) -> FileLock:
    """A lock the trials take around shared work: a file of `tune/.locks/`, or on an object store
    (no locks there) one in this machine's temp dir named by the URI (module docstring)."""
    if run.remote:
        return output_lock(run.tune / LOCKS / name)
    locks = run.tune / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / name))


def config_for(base: LoopFMConfig, overrides: dict) -> LoopFMConfig:
    """The full config a trial trains: base + its values, with the arm's channels and seed set
    (and at least one Train worker)."""

    cfg = arm_config(base.updated(overrides), base.tune.arm, base.train.seed)
    if cfg.train.num_workers == 0:
        # Train's local mode refuses to run inside a Tune trial (ray.train.report & co. raise
        # there), and it calls no Train callbacks: a trial always trains on a Train worker group.
        cfg = cfg.updated({"train.num_workers": 1})
    return cfg


def trial_config(base: LoopFMConfig, params: dict) -> LoopFMConfig:
    """`config_for` of params as Optuna samples them (JSON labels for list choices)."""
    return config_for(base, decode(params, base.tune.space))


def run_trial(params: dict, base: dict, run_root: str) -> None:
    """The Tune function trainable (wrapped with `tune.with_parameters`)."""
    setup_logging()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    run = RunDir(run_root)
    cfg = trial_config(validate_config(base, "tune base config"), params)
    trial_id = ray.tune.get_context().get_trial_id()
    log_event(run.tune, "start", trial_id=trial_id)
    # Stage outputs are shared by trials: one trial builds a store / features, the others find them current.
    with trial_lock(run, "stages.lock"):
        embed_stage(cfg, run)
        features = features_stage(cfg, run)
    fingerprint = vm_fingerprint(cfg, features)
    queue = Queue(actor_options={"num_cpus": 0})
    report = TrialReport(queue, cfg.tune.metric, serving_bytes(cfg), cfg.train.select_by)
    with trial_lock(run, f"vm-{fingerprint}.lock"):  # the same config twice: trained once
        done = run.vm(arm_of(cfg.train), cfg.train.seed, fingerprint)
        manifest = current("tune: trial", done, fingerprint, VMManifest.read)
        if manifest is not None:
            for entry in manifest.metrics["history"]:
                ray.tune.report(report.objective({"epoch": entry["epoch"], **scalar_metrics(entry)}))
            replayed = True
        else:
            stop = stop_file(run.tune, trial_id)
            try:
                manifest = train_reporting_to_tune(
                    lambda: train_vm(cfg, run, features, callbacks=[report], stop_file=stop), queue)
            finally:
                queue.shutdown()
            replayed = False
    log_event(run.tune, "stopped" if manifest.metrics.get("stopped") else "done", trial_id=trial_id,
              vm=str(done), replayed=replayed, epochs=len(manifest.metrics["history"]),
              valid_auc=manifest.metrics["valid"]["auc"], valid_ne=manifest.metrics["valid"]["ne"])


def stop_file(tune_dir: AnyPath, trial_id: str) -> AnyPath:
    """The file that asks a trial's Train loop to end before its next epoch (see EarlyStop)."""
    return as_location(tune_dir) / STOPS / trial_id
