"""`loopfm tune`: a Ray Tune search over KD and LoopFM settings (Optuna TPE + ASHA, W&B offline).

    upstream stages (data .. features; each skipped when current)
    Tuner(with_resources(run_trial, trial_cpus),
          OptunaSearch(tune.space, seeded TPE; two objectives with tune.second_objective),
          CooperativeASHA(epochs), max_concurrent_trials, WandbLoggerCallback offline)
      -> <run>/ray/tune-<fingerprint>/   the Tune experiment (state, per-trial results)
      -> <run>/tune/                     results.{csv,md}, best_config.yaml, importances, plots,
                                         wandb/ (one offline run per trial), trials.jsonl

On a run directory in an object store the experiment lives under `<run>/ray/` there (Tune's own
`storage_path` URI support); W&B writes its offline runs as files while trials run, so they go to
a local folder of the driver's machine (`wandb_folder`) and are copied into `<run>/tune/wandb/`
once the search returns.

The experiment's name is a hash of the config it searches (everything but `ray`, `serve`, `name`,
`experiment` and `tune.wandb`), so the same command run again after an interruption (Ctrl-C,
a crash, a lost node) finds it with `Tuner.can_restore` and resumes it with `Tuner.restore`:
finished trials keep their results and are not run again, unfinished ones start over (their
Train run resumes from its last epoch checkpoint when it has workers), and the search goes on to
`tune.num_samples`. A finished experiment is restored too: its outputs are written again.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Optional

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from loopfm.cli import COMMANDS
from loopfm.config import LoopFMConfig, stable_hash
from loopfm.errors import LoopFMError
from loopfm.location import AnyPath, copy_tree
from loopfm.rundir import RunDir
from loopfm.runtime import init_ray, log
from loopfm.tune.results import METRIC_COLUMNS, TrialRow, mode_of, write_outputs
from loopfm.tune.scheduler import CooperativeASHA
from loopfm.tune.space import decode, optuna_space, validate_space
from loopfm.tune.trial import STOPS, read_events, run_trial
from loopfm.tune.wandb import wandb_callback

UPSTREAM = ("data generate", "data validate", "data split", "fm train", "embed", "features")


def tune_fingerprint(cfg: LoopFMConfig) -> str:
    raw = cfg.model_dump(mode="json", exclude={"ray", "serve", "name", "experiment"})
    raw["tune"].pop("wandb", None)
    return stable_hash(raw)


def experiment_path(cfg: LoopFMConfig, run: RunDir) -> AnyPath:
    return run.ray_storage / f"tune-{tune_fingerprint(cfg)}"


def wandb_folder(run: RunDir) -> Path:
    """Where the trials' W&B runs are written: `<run>/tune/wandb`; on an object store a local folder
    named by the run's URI, the same on every call, so a restored experiment's callback (pickled
    with the folder it was given) writes where the first run did (`upload_wandb` copies it up)."""
    if not run.remote:
        return run.tune / "wandb"
    key = hashlib.sha256(str(run.tune).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "loopfm-wandb" / key


def upload_wandb(run: RunDir) -> None:
    """On an object store: the trials' W&B runs, from the local `wandb_folder` into `<run>/tune/wandb/`."""
    local = wandb_folder(run)
    if run.remote and local.is_dir():
        copy_tree(local, run.tune / "wandb")


def _upstream(cfg: LoopFMConfig, run: RunDir) -> None:
    """The stages a trial reads from, for the base config (each skipped when current)."""
    by_name = {c.name: c for c in COMMANDS}
    for name in UPSTREAM:
        if name == "data generate" and cfg.data.source != "synthetic":
            continue
        by_name[name].load()(cfg, run)


def trainable(cfg: LoopFMConfig, run: RunDir):
    fn = tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), run_root=str(run.root))
    return tune.with_resources(fn, {"CPU": cfg.tune.trial_cpus})


def build_tuner(cfg: LoopFMConfig, run: RunDir):
    """A new Tuner for this config."""
    t = cfg.tune
    mode = mode_of(t.metric)
    if t.second_objective:
        searcher = OptunaSearch(space=optuna_space(t.space), metric=["objective", t.second_objective],
                                mode=[mode, "min"], seed=t.seed)
    else:
        searcher = OptunaSearch(space=optuna_space(t.space), metric="objective", mode=mode, seed=t.seed)
    epochs = cfg.train.epochs
    scheduler = CooperativeASHA(str(run.tune / STOPS), epochs, time_attr="training_iteration", metric="objective",
                                 mode=mode, max_t=epochs, grace_period=min(t.grace_period, epochs),
                                 reduction_factor=t.reduction_factor)
    path = experiment_path(cfg, run)
    callbacks = [cb for cb in [wandb_callback(t.wandb, wandb_folder(run), group=path.name)] if cb]
    return tune.Tuner(
        trainable(cfg, run),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=t.num_samples,
                                    max_concurrent_trials=t.max_concurrent_trials),
        run_config=tune.RunConfig(name=path.name, storage_path=str(run.ray_storage), callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=1),
    )


def tune_stage(cfg: LoopFMConfig, run: RunDir) -> dict:
    """`loopfm tune`: search, or resume the interrupted search of this config; write `tune/`."""
    cfg.data.one_vertical("loopfm tune")
    try:
        validate_space(cfg)
    except ValueError as err:
        raise LoopFMError(str(err)) from None
    run.ensure()
    _upstream(cfg, run)
    init_ray(cfg.ray)
    path = experiment_path(cfg, run)
    started = time.time()
    if tune.Tuner.can_restore(str(path)):
        wandb_callback(cfg.tune.wandb, wandb_folder(run), group=path.name)  # the driver's W&B env again
        log.info("tune: resuming the search in %s", path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable(cfg, run), resume_unfinished=True,
                                   resume_errored=True)
        restored = True
    else:
        log.info("tune: %d trials of %s (Optuna TPE seed %d, ASHA over %d epochs, %d at a time) -> %s",
                 cfg.tune.num_samples, ", ".join(cfg.tune.space), cfg.tune.seed, cfg.train.epochs,
                 cfg.tune.max_concurrent_trials, path)
        tuner = build_tuner(cfg, run)
        restored = False
    try:
        grid = tuner.fit()
    finally:
        upload_wandb(run)
    rows = trial_rows(grid, cfg, run.tune / STOPS)
    terminal = sum(r.status in ("TERMINATED", "STOPPED", "ERROR") for r in rows)
    manifest = write_outputs(rows, cfg, run.tune, extra={
        "experiment": str(path), "restored": restored, "num_samples": cfg.tune.num_samples,
        "seconds": round(time.time() - started, 1), "fingerprint": tune_fingerprint(cfg),
    })
    best = manifest["best"]
    if best:
        log.info("tune: best %s valid %s %.4f %s -> %s", best["trial_id"], cfg.tune.metric, best["objective"],
                 best["params"], run.tune / "best_config.yaml")
    log.info("tune: %d trials (%d finished) in %.0fs; table %s", len(rows), manifest["finished"],
             time.time() - started, run.tune / "results.md")
    if terminal < cfg.tune.num_samples:
        raise LoopFMError(f"tune interrupted after {terminal} of {cfg.tune.num_samples} trials; run the same "
                          "command again to resume it")
    return manifest


def trial_rows(grid, cfg: LoopFMConfig, stops: AnyPath) -> list:
    """One TrialRow per Tune trial of the result grid (`stops`: ASHA's stop files)."""
    ended = {e["trial_id"] for e in read_events(stops.parent) if e["event"] in ("done", "stopped")}
    rows = []
    for trial in _trials(grid):
        last = dict(trial.last_result or {})
        status = trial.status
        epochs = int(last.get("training_iteration", 0) or 0)
        if status == "TERMINATED" and trial.trial_id not in ended:
            status = "INTERRUPTED"  # Tune ends running trials so when it is interrupted; resumed later
        elif status == "TERMINATED" and (stops / trial.trial_id).is_file() and epochs < cfg.train.epochs:
            status = "STOPPED"  # ended by ASHA before its last epoch (not by early stopping)
        params = {k: v for k, v in (trial.config or {}).items() if k in cfg.tune.space}
        try:
            params = decode(params, cfg.tune.space)
        except ValueError:
            pass
        error = None
        if status == "ERROR":
            error = _error_text(trial)
        objective = last.get("objective")
        rows.append(TrialRow(
            trial_id=trial.trial_id, status=status, epochs=epochs, params=params,
            objective=None if objective is None else float(objective),
            serving_bytes=last.get("serving_bytes"), best_epoch=last.get("best_epoch"),
            metrics={m: last[m] for m in METRIC_COLUMNS if m in last},
            seconds=round(float(last["time_total_s"]), 1) if "time_total_s" in last else None, error=error,
        ))
    return rows


def _trials(grid):
    return list(grid._experiment_analysis.trials)


def _error_text(trial) -> Optional[str]:
    f = getattr(trial, "error_file", None)
    try:
        if f and Path(f).is_file():
            lines = [ln for ln in Path(f).read_text().splitlines() if ln.strip()]
            return lines[-1][:300] if lines else "error"
    except OSError:
        pass
    return "error"
