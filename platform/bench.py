"""`loopfm bench <name>`: run one of the performance harnesses in benchmarks/ (or all of them).

The harnesses are plain scripts (`benchmarks/bench_<name>.py`); this command runs each in a
subprocess of the same Python, from the repository root, passing everything after `--` through:

    loopfm bench extract -- --users 2000 --no-sweep
    loopfm bench scaling --config configs/bench.yaml -- --users 600 2000 6000
    loopfm bench all

Each harness writes `benchmarks/results/<name>_<device>.json` and appends one row to
docs/BENCHMARKS.md (device, Ray and torch versions, config hash); `extract`, `extract_scale`,
`scaling` and `memory` also draw a PNG in docs/. With `--config`, the sizes of the config (users,
events per user, FM shape, batch sizes, actors) become the harness's flags, placed before the ones
after `--` (which therefore win): configs/bench.yaml is the GPU scale, CPU runs shrink it with
flags. `extract_scale` always runs the default settings; it takes only the events per user.

The benchmarks/ folder is not installed with the package: it is looked up in $LOOPFM_REPO, then
the current directory and its parents, then next to this source file (an editable install).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from loopfm.config import LoopFMConfig
from loopfm.errors import LoopFMError
from loopfm.logs import log

SCRIPTS = {
    "extract": "bench_extract.py",
    "extract_scale": "bench_extract_scale.py",
    "train": "bench_train.py",
    "serve": "bench_serve.py",
    "scaling": "bench_scaling.py",
    "memory": "bench_memory.py",
    "features": "bench_features.py",
    "incremental": "bench_incremental.py",
    "run": "bench_run.py",
}
ALL = ("extract", "train", "serve", "scaling", "memory")  # what `loopfm bench all` runs, in this order
NAMES = (*SCRIPTS, "all")


class BenchmarkError(LoopFMError):
    """A harness is missing, refused its arguments, or failed."""


def find_repo(start: Optional[Path] = None) -> Path:
    """The repository root holding benchmarks/common.py; a clear error naming the folder if none."""
    candidates = []
    if os.environ.get("LOOPFM_REPO"):
        candidates.append(Path(os.environ["LOOPFM_REPO"]))
    here = Path(start or Path.cwd()).resolve()
    candidates += [here, *here.parents, Path(__file__).resolve().parents[1]]
    for root in candidates:
        if (root / "benchmarks" / "common.py").is_file():
            return root
    raise BenchmarkError(
        f"benchmarks folder not found: no benchmarks/common.py under $LOOPFM_REPO, {here} or its parents, "
        f"or {Path(__file__).resolve().parents[1]}. The harnesses are not installed with the package: run "
        f"`loopfm bench` from a checkout of the repository, or set LOOPFM_REPO to its root"
    )


def config_flags(name: str, cfg: LoopFMConfig) -> list[str]:
    """The flags a harness takes for the sizes of `cfg` (its synthetic log, FM, batch sizes)."""
    s, fm, embed, train = cfg.data.synthetic, cfg.fm, cfg.embed, cfg.train
    log = ["--users", str(s.num_users), "--events-per-user", str(s.events_per_user)]
    if name == "extract_scale":
        return ["--events-per-user", str(s.events_per_user)]  # it runs the default settings at several sizes
    if name == "extract":
        return [*log, "--d-model", str(fm.d_model), "--layers", str(fm.n_layers), "--heads", str(fm.n_heads),
                "--d-ff", str(fm.d_ff), "--chunk-len", str(fm.chunk_len), "--window", str(fm.window),
                "--batch-size", str(embed.batch_size), "--actors", str(embed.num_actors),
                "--actor-cpus", str(embed.actor_num_cpus)]
    if name == "train":
        return [*log, "--epochs", str(train.epochs), "--batch-size", str(train.batch_size)]
    if name == "serve":
        return log
    if name == "features":
        return ["--users", str(s.num_users), "--events-per-user", str(s.events_per_user)]
    if name == "incremental":
        return [*log, "--days", str(s.num_days)]
    return []  # scaling and memory read the config itself (--config)


def command(name: str, repo: Path, extra: Sequence[str] = (), config: Optional[str] = None,
            cfg: Optional[LoopFMConfig] = None, overrides: Sequence[str] = ()) -> list[str]:
    """The subprocess command line of one harness."""
    script = repo / "benchmarks" / SCRIPTS[name]
    if not script.is_file():
        raise BenchmarkError(f"benchmark `{name}`: {script} not found")
    flags: list[str] = []
    if name in ("scaling", "memory"):
        if config:
            flags += ["--config", str(Path(config).resolve())]
        for override in overrides:
            flags += ["--set", override]
    elif cfg is not None and (config or overrides):
        flags += config_flags(name, cfg)
    return [sys.executable, str(script), *flags, *extra]


def bench_stage(cfg: LoopFMConfig, run, benchmark: str, harness_args: Sequence[str] = (),
                config: Optional[str] = None, overrides: Sequence[str] = ()) -> None:
    """`loopfm bench <name> [-- harness args]`: `config` and `overrides` are the command's own
    `--config` and `--set` (harnesses that read a config get them as given, the others as flags)."""
    name = benchmark
    extra = list(harness_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if name not in NAMES:
        raise BenchmarkError(f"unknown benchmark `{name}` (known: {', '.join(NAMES)})")
    if name == "all" and extra:
        raise BenchmarkError("`loopfm bench all` takes no harness arguments (each harness has its own flags): "
                             "run the benchmarks one by one to pass them")
    repo = find_repo()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}  # local Ray on loopback
    for each in (ALL if name == "all" else (name,)):
        cmd = command(each, repo, extra, config, cfg, overrides)
        log.info("bench %s: %s (load avg %.2f)", each, " ".join(cmd[1:]), os.getloadavg()[0])
        started = time.perf_counter()
        code = subprocess.run(cmd, cwd=repo, env=env).returncode
        if code:
            raise BenchmarkError(f"benchmark `{each}` failed (exit code {code}): {' '.join(cmd[1:])}")
        log.info("bench %s: done in %.0fs; results in %s, row in %s", each, time.perf_counter() - started,
                 repo / "benchmarks" / "results", repo / "docs" / "BENCHMARKS.md")


# -- shared by the harnesses (importable without Ray or torch) ---------------------------------
def loglog_slope(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares fit of log y = a + b log x: {"slope": b, "r2": ...}. b = 1 is linear growth."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y) or not (np.all(x > 0) and np.all(y > 0) and np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("a log-log slope needs as many positive, finite times as sizes")
    lx, ly = np.log(x), np.log(y)
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError("a log-log slope needs at least two distinct sizes")
    slope, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (intercept + slope * lx)
    total = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return {"slope": round(float(slope), 4), "r2": round(r2, 4)}
