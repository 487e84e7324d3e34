"""Ray Train plumbing shared by the FM and the VM loops: start, resume, report, stop early.

A loop written with these pieces is an ordinary epoch loop: `resume` gives back the state of the
last reported epoch (Ray Train V2 restores it after a worker failure or when a run with the same
`storage_path` + `name` is started again), `report_epoch` checkpoints every epoch (V2's `report`
is a barrier every worker calls; rank 0 alone writes the files), and `EarlyStopping` decides on
numbers every worker has gathered, so all workers stop on the same epoch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from loopfm.precision import gpu_precision

STATE_FILE = "state.pt"


@dataclass
class EarlyStopping:
    """Best value so far (higher is better) and how many epochs since it improved."""

    patience: int
    best: float = -float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    best_metrics: dict = field(default_factory=dict)

    def update(self, epoch: int, value: float, metrics: dict) -> bool:
        """Record an epoch; True when it is the best so far."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs, self.best_metrics = value, epoch, 0, dict(metrics)
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class LoopState:
    """Everything a resumed loop needs: the next epoch, the stopper, the best weights so far."""

    epoch: int
    stopper: EarlyStopping
    best_state: dict
    model_state: dict
    optim_state: dict
    history: list = field(default_factory=list)


class LoopTimer:
    """Wall-clock stamps of one worker's loop, one JSON line per event appended to `path`, which
    benchmarks/bench_train.py turns into where the time went (start-up, waiting on data, compute,
    evaluation, report). Without a path it records nothing and `batches` hands the iterable back.
    """

    def __init__(self, path: Optional[str]):
        self.path, self.started = path, time.time()

    def _write(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **entry}) + "\n")

    def setup_done(self) -> None:
        if self.path:
            self._write({"kind": "setup", "start": self.started, "end": time.time(),
                         "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")})

    def batches(self, iterable):
        """`iterable`, timing the wait for each batch and the work done between batches."""
        if not self.path:
            return iterable
        return self._timed(iterable)

    def _timed(self, iterable):
        self.epoch_start, self.wait, self.compute, self.rows, self.first = time.time(), 0.0, 0.0, 0, None
        batches = iter(iterable)
        while True:
            a = time.perf_counter()
            batch = next(batches, None)
            b = time.perf_counter()
            self.wait += b - a
            self.first = b - a if self.first is None else self.first
            if batch is None:
                self.train_end = time.time()
                return
            yield batch
            self.compute += time.perf_counter() - b
            self.rows += len(batch["label"])

    def evaluated(self) -> None:
        if self.path:
            self.eval_end = time.time()

    def epoch_done(self, epoch: int) -> None:
        if self.path:
            self._write({"kind": "epoch", "epoch": epoch, "start": self.epoch_start, "train_end": self.train_end,
                         "eval_end": self.eval_end, "end": time.time(), "rows": self.rows, "wait_s": self.wait,
                         "first_batch_s": self.first, "compute_s": self.compute})


def say(line: str) -> None:
    """One progress line from a Train worker. Not `print`: Train V2 patches it, and each line
    then reaches the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, patience: int, loop: int = 0) -> LoopState:
    """The state of the last reported epoch, or a fresh one.

    `loop`: which of a run's successive loops this is (`train_vms` trains several VMs in one run);
    the run's checkpoint restores only the loop that reported it.
    """
    checkpoint = ray.train.get_checkpoint()
    saved = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, STATE_FILE), weights_only=True)
    if saved is None or saved.get("loop", 0) != loop:
        return LoopState(0, EarlyStopping(patience), cpu_state(model), {}, {})
    unwrap(model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optim"])
    stopper = EarlyStopping(**saved["stopper"])
    return LoopState(int(saved["epoch"]) + 1, stopper, saved["best"], saved["model"], saved["optim"], saved["history"])


def report_epoch(epoch: int, metrics: dict, model, optimizer, state: LoopState, loop: int = 0) -> None:
    """Checkpoint this epoch (rank 0 writes, everyone calls) and report its metrics; `loop` as in `resume`."""
    state.history.append({"epoch": epoch, "pid": os.getpid(), **metrics})  # pid: which worker trained it
    d = tempfile.mkdtemp(prefix="loopfm-ckpt-")
    checkpoint = None
    if ray.train.get_context().get_world_rank() == 0:
        torch.save({"loop": loop, "epoch": epoch, "model": cpu_state(model), "optim": optimizer.state_dict(),
                    "stopper": asdict(state.stopper), "best": state.best_state, "history": state.history},
                   os.path.join(d, STATE_FILE))
        checkpoint = ray.train.Checkpoint.from_directory(d)
    ray.train.report({"epoch": epoch, **scalar_metrics(metrics)}, checkpoint=checkpoint,
                     delete_local_checkpoint_after_upload=True)
    if checkpoint is None:
        shutil.rmtree(d, ignore_errors=True)
    elif os.path.isdir(d):  # local mode (num_workers=0) keeps the directory itself as the checkpoint
        _LOCAL_CHECKPOINTS.append(d)


_LOCAL_CHECKPOINTS: list[str] = []


def final_state(result) -> dict:
    """The saved state of a finished run's last checkpoint (driver side)."""
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), weights_only=True)
    drop_local_checkpoints()
    return state


def drop_local_checkpoints() -> None:
    """Delete the checkpoint directories local mode kept (once the run's result has been read)."""
    while _LOCAL_CHECKPOINTS:
        shutil.rmtree(_LOCAL_CHECKPOINTS.pop(), ignore_errors=True)


def train_device(gpu: bool) -> torch.device:
    """The device of this Train worker's loop, with `loopfm.precision`'s GPU settings made on it.

    Ray Train's own choice (the GPU it assigned this worker, else the CPU), except in local mode
    (`num_workers: 0`, the loop runs in the driver), where Train assigns nothing and says CPU:
    there a stage that asked for a GPU (`ray.use_gpu`) gets this process's CUDA device."""
    device = ray.train.torch.get_device()
    if gpu and device.type == "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return gpu_precision(device)


def gather(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each worker's arrays on every worker (evaluation over all shards)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def run_trainer(loop: Callable, loop_config: dict, datasets: dict, *, name: str, storage: str,
                num_workers: int, use_gpu: bool, max_failures: int = 2, cpus_per_worker: float = 1.0,
                callbacks: Optional[list] = None):
    """Fit a TorchTrainer; num_workers 0 runs the loop in this process (Train's local mode).

    `callbacks` (Train callbacks, e.g. Tune's `TuneReportCallback`) go to `RunConfig`; Train's local
    mode calls none of them.
    """
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources if num_workers else None),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or []),
        ),
    )
    return trainer.fit()


class Background:
    """`fn()` in a daemon thread, so the caller can act while it runs (`train_vms` publishes each VM as
    it finishes) and Ctrl-C still ends the process: the thread never holds up the interpreter's exit."""

    def __init__(self, fn: Callable[[], object], name: str = "loopfm-fit"):
        self._box: dict = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self._box["value"] = fn()
        except BaseException as err:  # re-raised by result()
            self._box["error"] = err

    def wait(self, timeout: float) -> bool:
        """True once `fn` has returned or raised."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self):
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


def scalar_metrics(metrics: dict) -> dict:
    """Nested metrics flattened to `{"valid/auc": float, ...}`: the numbers Train and Tune report."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in scalar_metrics(v).items()})
        elif isinstance(v, (int, float, np.floating, np.integer)):
            out[k] = float(v)
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for its deterministic kernels: the same config
    and data then give the same weights (the FM version is their hash). `warn_only`: an op
    without a deterministic kernel warns instead of failing the run. cuBLAS needs its workspace
    setting before its first call to be deterministic; set here unless the environment chose one."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def shuffle_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one worker's local shuffle in one epoch: its own stream per (seed, epoch, rank),
    so a resumed run shuffles epoch k as the uninterrupted one did, and seeds never collide as
    `seed + epoch` would (seed 0's epoch 1 is not seed 1's epoch 0)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
