"""`loopfm logs append --files F ...`: new event files join the run's log, validated like the log itself.

The loop's first step: events served today become tomorrow's log. Each call validates the new
files with the same rules as `loopfm data validate` (same column mapping and categorical context
as the run's events) and writes them as one batch, `data/appended/<seq>-<hash>/`, atomically:
the batch is validated and checked against the log under a hidden name and renamed into place
only when nothing in it will be refused, so no reader ever sees a batch that is then withdrawn.
A batch must be newer than everything the log already holds (its earliest ts after the log's
newest) and must not reuse an event id: incremental embedding continues each user's causal
history from its last stored position, so a late or repeated event would silently change the
past. Late events belong in a full re-embed.

Vocabulary indices are not written here: readers map ids with the run's vocabulary, so a new
item or user is out-of-vocabulary exactly as it would be at serving time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
from filelock import FileLock

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.datasets.ingest import validate_source
from loopfm.datasets.readers import generic_layout, open_source
from loopfm.datasets.schema import EVENT_ID, TS
from loopfm.errors import DataValidationError, MissingInputError
from loopfm.rundir import RunDir, read_manifest
from loopfm.runtime import init_ray, log

APPEND_LOCK = "append.lock"


def appended_batches(run: RunDir) -> list[Path]:
    """Finished batches in append order."""
    if not run.appended.is_dir():
        return []
    return sorted(p for p in run.appended.iterdir() if not p.name.startswith(".") and read_manifest(p) is not None)


def log_paths(run: RunDir) -> list[Path]:
    """Every directory of normalized events the log holds: the validated log, then each batch."""
    return [run.events, *appended_batches(run)]


def _columns(paths: list[Path], names: list[str]) -> dict[str, np.ndarray]:
    files = [str(f) for p in paths for f in sorted(Path(p).glob("*.parquet"))]
    table = pads.dataset(files, format="parquet").to_table(columns=names)
    return {n: table.column(n).to_numpy() for n in names}


def logs_append_stage(cfg: LoopFMConfig, run: RunDir, files: Sequence[str | os.PathLike],
                      format: str = "auto") -> dict:
    """`loopfm logs append --files F...`: validate `files` (parquet or CSV; `format` "auto" goes by
    extension) and append them to the run's log as one batch."""
    events = read_manifest(run.events)
    if events is None:
        raise MissingInputError(f"no validated log in {run.events}: run `loopfm data validate` first")
    files = [Path(f).resolve() for f in files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MissingInputError(f"logs append: no such file(s): {', '.join(missing)}")
    layout = generic_layout(cfg.data.columns, events.get("categorical", []), bool(cfg.data.sorted_by_ts))
    source = open_source(str(files[0].parent), _format(files, format), layout, files=files)

    # One append at a time: two batches checked against the same old log could both pass, then
    # reuse each other's ids or overlap in time once both are in.
    run.appended.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run.appended / f".{APPEND_LOCK}")):
        for stale in run.appended.glob(".*.staged-*"):  # a killed append's (the lock says none is running)
            shutil.rmtree(stale, ignore_errors=True)
        batches = appended_batches(run)
        content = [(str(f), f.stat().st_size, f.stat().st_mtime) for f in files]
        out = run.appended / f"{len(batches):04d}-{stable_hash(content)}"
        # Validated under a hidden name (readers, `embed --incremental` and serving skip it) and
        # checked against the log there; only a batch that passed every check is renamed into place.
        staged = run.appended / f".{out.name}.staged-{os.getpid()}"
        init_ray(cfg.ray)
        old = _columns(log_paths(run), [EVENT_ID, TS])
        try:
            manifest = validate_source(cfg, source, staged, out.parent / f"{out.name}.validation.json",
                                       {"fingerprint": stable_hash(content), "source": "append"})
            new = _columns([staged], [EVENT_ID, TS])
            problem = _conflict(old, new, files)
            if problem:
                raise DataValidationError(f"logs append: {problem}; nothing was appended")
            os.replace(staged, out)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    log.info("logs append: %d events (ts %d..%d) from %d file(s) -> %s", len(new[TS]), new[TS].min(),
             new[TS].max(), len(files), out)
    return manifest


def _format(files: list[Path], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    kinds = {f.suffix.lower().lstrip(".") for f in files}
    if len(kinds) != 1 or not kinds <= {"parquet", "csv"}:
        raise DataValidationError(f"logs append: cannot tell the format of {', '.join(f.name for f in files)} "
                                  "from their extensions (.parquet or .csv, all the same); pass --format")
    return kinds.pop()


def _conflict(old: dict[str, np.ndarray], new: dict[str, np.ndarray], files: list[Path]) -> str:
    """Why a batch cannot be appended ('' when it can)."""
    names = ", ".join(f.name for f in files)
    if not len(new[TS]):
        return f"{names} hold no valid events"
    newest = int(old[TS].max()) if len(old[TS]) else None
    if newest is not None and (late := int((new[TS] <= newest).sum())):
        return (f"{late} of {len(new[TS])} events in {names} are at or before the log's newest event "
                f"(ts {newest}); only newer events can be appended")
    reused = int(np.isin(new[EVENT_ID], old[EVENT_ID]).sum())
    if reused:
        return f"{reused} event_id values in {names} are already in the log (give the files their own event_id column)"
    return ""
