"""W&B through Ray Tune's `WandbLoggerCallback`: one W&B run per trial, offline by default.

Offline means no network at all: `WANDB_MODE=offline` is set in the driver (Ray's callback then
skips its API-key check, which otherwise demands a key even for offline runs) and in the
`runtime_env` of the per-trial logging actors, and `wandb.init(mode="offline")` is passed too.
Runs land in `<run>/tune/wandb/wandb/offline-run-<time>-<trial id>/`; `wandb sync` uploads them
later. `tune.wandb.mode: online` needs `WANDB_API_KEY` (checked before the tune starts).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

import ray
from ray.air.integrations.wandb import WandbLoggerCallback, _force_on_current_node, _WandbLoggingActor

from loopfm.config import WandbConfig
from loopfm.errors import LoopFMError

QUIET = {"WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true",
         "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off"}


class FlushingLoggingActor(_WandbLoggingActor):
    """Ray's per-trial logging actor, which also waits for W&B's service to write the run's file.

    `wandb.finish()` can return while wandb-core is still writing the last records, and the
    callback kills the actor as soon as `run` returns. Under load this lost a trial's whole
    history: the offline file held the config but no epochs. `wandb.teardown()` waits for the
    service to finish.
    """

    def run(self):
        super().run()
        self._wandb.teardown()


class LoopFMWandbCallback(WandbLoggerCallback):
    """Ray's callback whose logging actors get our W&B environment in their `runtime_env` and
    flush before they are killed."""

    _logger_actor_cls = FlushingLoggingActor

    def __init__(self, env: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self.env = dict(env)

    def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
        if not self._remote_logger_class:
            env = dict(self.env)
            if os.environ.get("WANDB_API_KEY"):
                env["WANDB_API_KEY"] = os.environ["WANDB_API_KEY"]
            self._remote_logger_class = ray.remote(
                num_cpus=0, **_force_on_current_node(), runtime_env={"env_vars": env},
                max_restarts=-1, max_task_retries=-1,
            )(self._logger_actor_cls)
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    def on_experiment_end(self, trials, **info):
        # An interrupted experiment ends with trials still running: their logging actors never got
        # the end-of-trial message, and Ray's callback would wait `upload_timeout` for them.
        for trial in list(self._trial_logging_actors):
            if trial in self._trial_queues:
                self._signal_logging_actor_stop(trial=trial)
        super().on_experiment_end(trials, **info)


def wandb_env(cfg: WandbConfig, directory: Path) -> dict[str, str]:
    return {"WANDB_MODE": cfg.mode, "WANDB_DIR": str(directory), **QUIET}


def wandb_callback(cfg: WandbConfig, directory: Path, group: str) -> Optional[LoopFMWandbCallback]:
    """The callback for `tune.wandb` (None when disabled); sets the driver's W&B environment."""
    if cfg.mode == "disabled":
        return None
    if cfg.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise LoopFMError("tune.wandb.mode is online but WANDB_API_KEY is not set: export it "
                          "(or keep mode: offline and `wandb sync` the runs later)")
    directory.mkdir(parents=True, exist_ok=True)
    env = wandb_env(cfg, directory)
    os.environ.update(env)  # the driver: Ray's API-key check is skipped when offline
    return LoopFMWandbCallback(env, project=cfg.project, group=cfg.group or group, mode=cfg.mode,
                               dir=str(directory), excludes=["checkpoint_path"],
                               upload_timeout=60 if cfg.mode == "offline" else 600)


def read_offline_run(run_dir: Path) -> dict:
    """What an offline run recorded, read from its `run-<id>.wandb` file without W&B's service:
    `{"run_id", "project", "group", "config": {...}, "history": [{key: value}, ...]}`.

    The file is W&B's record log (LevelDB log format: a 7-byte header, then 32 KiB blocks of
    chunks `crc32 u32 | length u16 | type u8 | data`, types full/first/middle/last) of protobuf
    `Record`s; wandb 0.31 no longer ships a Python reader for it.
    """
    from wandb.proto import wandb_internal_pb2 as pb  # optional dependency: only reading W&B runs needs it

    [path] = list(Path(run_dir).glob("run-*.wandb"))
    data = path.read_bytes()
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    out: dict = {"config": {}, "history": []}
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        which = r.WhichOneof("record_type")
        if which == "run":
            out.update(run_id=r.run.run_id, project=r.run.project, group=r.run.run_group)
            for item in r.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif which == "config":
            for item in r.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif which == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in r.history.item})
    return out
