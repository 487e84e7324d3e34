"""ASHA whose STOP asks a trial to end itself, so its Train run shuts down cleanly.

Tune stops a trial by ending its actor at once. A trial that trains through Ray Train owns a Train
controller, which dies with it before it can remove its workers' placement group; Ray's backup
cleaner needs the dashboard's State API and, on a host running several Ray instances, can look in
the wrong one. The leaked CPUs then starve Ray Data in later trials (seen here: the third trial
hung). So ASHA's STOP becomes a stop file (`tune/.stop/<trial id>`) that the VM loop reads before
each epoch (`train_vm(stop_file=...)`); the trial then returns on its own, one epoch later at most.
"""

from __future__ import annotations

import json
import time

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from loopfm.location import as_location
from loopfm.rundir import atomic_write_text


class CooperativeASHA(ASHAScheduler):
    def __init__(self, stop_dir: str, max_epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.stop_dir = str(stop_dir)
        self.max_epochs = int(max_epochs)

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != TrialScheduler.STOP:
            return decision
        if int(result.get("training_iteration", 0)) < self.max_epochs:  # at the last epoch it ends anyway
            stop_dir = as_location(self.stop_dir)  # the run's tune/.stop: a local path or a URI
            stop_dir.mkdir(parents=True, exist_ok=True)
            flag = stop_dir / trial.trial_id
            if not flag.exists():
                atomic_write_text(flag, json.dumps({"training_iteration": result.get("training_iteration"),
                                                    "objective": result.get("objective"), "time": time.time()}))
        return TrialScheduler.CONTINUE
