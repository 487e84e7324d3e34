"""What a tune leaves in `<run>/tune/`: the table of trials, the best config, importances, plots.

- `results.csv`, `results.md`: one row per trial (id, status, epochs run, objective, every searched
  parameter, serving bytes, valid/test metrics at the kept epoch, seconds).
- `best_config.yaml`: the best trial's full config (arm channels and seed set); `loopfm train
  --config tune/best_config.yaml` trains that VM.
- `importances.json`, `importances.md`: Optuna's parameter importances (PED-ANOVA: Optuna 5's
  fANOVA needs scikit-learn, which is not a dependency) of the finished trials, replayed into a
  fresh Optuna study (so they do not depend on the searcher's state).
- `objective.png`: objective against trial number with the running best; `pareto.png` (when
  `tune.second_objective` is set): objective against serving bytes, the Pareto front marked.
- `manifest.json`: metric, mode, best trial, counts, the Ray Tune experiment path.

Every file is written beside its final name and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loopfm.config import LoopFMConfig
from loopfm.rundir import atomic_file, atomic_write_text, write_manifest
from loopfm.tune.space import encode_choice, optuna_space
from loopfm.tune.trial import config_for

METRIC_COLUMNS = ("best_valid_auc", "best_valid_ne")  # valid only: trials never see the test split


@dataclass
class TrialRow:
    trial_id: str
    status: str
    epochs: int
    params: dict[str, Any]
    objective: Optional[float]
    serving_bytes: Optional[int] = None
    best_epoch: Optional[int] = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: Optional[float] = None
    error: Optional[str] = None

    @property
    def finished(self) -> bool:
        return (self.status in ("TERMINATED", "STOPPED") and self.objective is not None
                and not math.isnan(self.objective) and self.error is None)


def mode_of(metric: str) -> str:
    return "max" if metric == "auc" else "min"


def best_row(rows: list[TrialRow], metric: str) -> Optional[TrialRow]:
    done = [r for r in rows if r.finished]
    if not done:
        return None
    sign = 1 if mode_of(metric) == "max" else -1
    return max(done, key=lambda r: (sign * r.objective, -_order(r)))  # ties: the earlier trial


def _order(row: TrialRow) -> int:
    """Trials are numbered in the order Tune created them (`<hash>_00003`)."""
    tail = row.trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def pareto_front(rows: list[TrialRow], metric: str) -> list[TrialRow]:
    """Finished trials no other trial beats on both objective and serving bytes."""
    sign = 1 if mode_of(metric) == "max" else -1
    done = [r for r in rows if r.finished and r.serving_bytes is not None]

    def dominates(a: TrialRow, b: TrialRow) -> bool:
        ge = sign * a.objective >= sign * b.objective and a.serving_bytes <= b.serving_bytes
        gt = sign * a.objective > sign * b.objective or a.serving_bytes < b.serving_bytes
        return ge and gt

    return sorted((r for r in done if not any(dominates(o, r) for o in done)), key=lambda r: r.serving_bytes)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def table(rows: list[TrialRow], keys: list[str]) -> tuple[list[str], list[list[Any]]]:
    header = ["trial_id", "status", "epochs", "objective", *keys, "serving_bytes", "best_epoch",
              *METRIC_COLUMNS, "seconds", "error"]
    body = []
    for r in sorted(rows, key=_order):
        body.append([r.trial_id, r.status, r.epochs, r.objective, *[r.params.get(k) for k in keys], r.serving_bytes,
                     r.best_epoch, *[r.metrics.get(m) for m in METRIC_COLUMNS], r.seconds, r.error])
    return header, body


def results_csv(rows: list[TrialRow], keys: list[str]) -> str:
    header, body = table(rows, keys)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for line in body:
        w.writerow(["" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else v) for v in line])
    return buf.getvalue()


def results_markdown(rows: list[TrialRow], keys: list[str], metric: str, best: Optional[TrialRow]) -> str:
    header, body = table(rows, keys)
    header = [h for h in header if h != "error"]
    lines = [f"# loopfm tune: {len(rows)} trials, objective = valid {metric} ({mode_of(metric)})", ""]
    if best is not None:
        lines += [f"Best: `{best.trial_id}` with valid {metric} {best.objective:.4f}: "
                  + ", ".join(f"`{k}={_fmt(best.params.get(k))}`" for k in keys), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in body:
        cells = [_fmt(v) for v in line[:-2]] + ["" if line[-2] is None else f"{line[-2]:.0f}"]  # seconds
        if best is not None and line[0] == best.trial_id:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in rows if r.error]
    if errors:
        lines += ["", "Errors:", *[f"- `{r.trial_id}`: {r.error}" for r in errors]]
    return "\n".join(lines) + "\n"


def importances(rows: list[TrialRow], cfg: LoopFMConfig) -> dict:
    """Optuna's importance (PED-ANOVA) of each searched parameter over the finished trials.

    Replays the trials into a fresh in-memory study with the space's distributions; returns
    `{"importances": {...}, "trials": n}` or `{"importances": {}, "note": why not}`.
    """
    space = cfg.tune.space
    dists = optuna_space(space)
    done = [r for r in rows if r.finished]
    if len(done) < 2:
        return {"importances": {}, "trials": len(done), "note": "needs at least 2 finished trials"}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode_of(cfg.tune.metric) == "max" else "minimize")
    for r in done:
        params = {}
        for key in dists:
            if key not in r.params:
                continue
            value = r.params[key]
            if space[key].type == "categorical":
                value = encode_choice(value)
            params[key] = value
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=float(r.objective)))
    varied = [k for k in dists if len({json.dumps(t.params.get(k), sort_keys=True) for t in study.trials}) > 1]
    if not varied:
        return {"importances": {}, "trials": len(done), "note": "no parameter took two values"}
    try:
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=varied)
    except Exception as err:  # e.g. every objective equal
        return {"importances": {}, "trials": len(done), "note": f"optuna could not rank them: {err}"}
    out = {k: float(v) for k, v in values.items()}
    out.update({k: 0.0 for k in dists if k not in out})
    return {"importances": out, "trials": len(done), "evaluator": "ped-anova"}


def importances_markdown(imp: dict) -> str:
    lines = ["# Parameter importance (Optuna PED-ANOVA over finished trials)", ""]
    if not imp["importances"]:
        return "\n".join(lines + [f"Not computed: {imp.get('note')}", ""])
    lines += ["| parameter | importance |", "|---|---:|"]
    for k, v in sorted(imp["importances"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| `{k}` | {v:.3f} |")
    return "\n".join(lines + ["", f"{imp['trials']} finished trials.", ""])


def _figure() -> tuple[Figure, Any]:
    """A pyplot-free figure and its axes: no global backend state (the Agg canvas is its own)."""
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_objective(rows: list[TrialRow], metric: str, path: Path) -> None:
    done = sorted((r for r in rows if r.finished), key=_order)
    xs = [_order(r) for r in done]
    ys = [r.objective for r in done]
    better = max if mode_of(metric) == "max" else min
    running = [better(ys[: i + 1]) for i in range(len(ys))]
    fig, ax = _figure()
    ax.scatter(xs, ys, label="trial", zorder=3)
    ax.step(xs, running, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"valid {metric}")
    ax.set_title(f"loopfm tune: valid {metric} by trial")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_pareto(rows: list[TrialRow], metric: str, path: Path) -> None:
    done = [r for r in rows if r.finished and r.serving_bytes is not None]
    front = pareto_front(rows, metric)
    fig, ax = _figure()
    ax.scatter([r.serving_bytes for r in done], [r.objective for r in done], color="C0", label="trial")
    ax.plot([r.serving_bytes for r in front], [r.objective for r in front], "o-", color="C3", label="Pareto front")
    ax.set_xlabel("serving bytes per request (L x width)")
    ax.set_ylabel(f"valid {metric}")
    ax.set_title("loopfm tune: quality against serving cost")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def best_config_yaml(cfg: LoopFMConfig, best: TrialRow) -> str:
    chosen = config_for(cfg, {k: v for k, v in best.params.items() if k in cfg.tune.space})
    head = (f"# Best trial of `loopfm tune`: {best.trial_id}, valid {cfg.tune.metric} {best.objective:.4f} "
            f"(epoch {best.best_epoch}).\n# Train it alone: loopfm train --config <this file> --out <run>\n")
    return head + chosen.to_yaml()


def write_outputs(rows: list[TrialRow], cfg: LoopFMConfig, out: Path, extra: Optional[dict] = None) -> dict:
    """Write every output file into `out` (the run's `tune/`); returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    keys = list(cfg.tune.space)
    metric = cfg.tune.metric
    best = best_row(rows, metric)
    atomic_write_text(out / "results.csv", results_csv(rows, keys))
    atomic_write_text(out / "results.md", results_markdown(rows, keys, metric, best))
    imp = importances(rows, cfg)
    atomic_write_text(out / "importances.json", json.dumps(imp, indent=2, sort_keys=True))
    atomic_write_text(out / "importances.md", importances_markdown(imp))
    plot_objective(rows, metric, out / "objective.png")
    files = ["results.csv", "results.md", "importances.json", "importances.md", "objective.png"]
    front = []
    if cfg.tune.second_objective:
        plot_pareto(rows, metric, out / "pareto.png")
        front = [r.trial_id for r in pareto_front(rows, metric)]
        files.append("pareto.png")
    if best is not None:
        atomic_write_text(out / "best_config.yaml", best_config_yaml(cfg, best))
        files.append("best_config.yaml")
    manifest = {
        "metric": metric, "mode": mode_of(metric), "trials": len(rows),
        "finished": sum(r.finished for r in rows), "best": asdict(best) if best else None,
        "pareto_front": front, "files": files, **(extra or {}),
    }
    write_manifest(out, manifest, stamp=False)
    return manifest
