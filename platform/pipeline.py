"""`loopfm run`: every stage in order, each skipped when its output is current.

The stage list is the data path of docs/DESIGN.md, 'Data path'. Each entry names a CLI command, so
`loopfm run` is exactly the sequence of commands a user could type (or `ray job submit`) alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from loopfm.cli import COMMANDS
from loopfm.config import LoopFMConfig
from loopfm.datasets.append import logs_append_stage
from loopfm.errors import MissingInputError
from loopfm.fm.incremental import incremental_embed
from loopfm.rundir import RunDir, atomic_write_text
from loopfm.runtime import log
from loopfm.serve_apps.stage import serve_refresh_stage

PIPELINE: tuple[str, ...] = (
    "data generate",
    "data validate",
    "data split",
    "fm train",
    "embed",
    "features",
    "report",  # trains every arm x seed (`loopfm train` is one of them)
)


def run_pipeline(cfg: LoopFMConfig, run: RunDir) -> None:
    by_name = {c.name: c for c in COMMANDS}
    run.ensure()
    atomic_write_text(run.config_path, cfg.to_yaml())
    missing = []
    for name in PIPELINE:
        if name == "data generate" and cfg.data.source != "synthetic":
            continue
        cmd = by_name[name]
        if cmd.target is None:
            missing.append(name)
            log.info("run: stage `%s` is not built yet, skipped", name)
            continue
        started = time.time()
        log.info("run: stage `%s`", name)
        cmd.load()(cfg, run)
        log.info("run: stage `%s` done in %.1fs", name, time.time() - started)
    if missing:
        log.info("run: reached the end of what exists; not built yet: %s", ", ".join(missing))
    else:
        log.info("run: finished; report in %s", run.report)


def cycle_stage(cfg: LoopFMConfig, run: RunDir, files: Sequence[str | os.PathLike], format: str = "auto",
                no_refresh: bool = False) -> None:
    """`loopfm cycle --files F...`: the loop's daily step (docs/LOOP.md) as one job.

    Appends the files to the log, embeds their events into a store delta with the same FM, then,
    when a Serve app of this run is reachable, makes its feature lookup load the delta now.
    """
    logs_append_stage(cfg, run, files, format)
    incremental_embed(cfg, run, "last")
    if no_refresh:
        return
    try:
        serve_refresh_stage(cfg, run)
    except MissingInputError as err:
        log.info("cycle: no running Serve app refreshed (%s); it picks the delta up within serve.refresh_interval_s",
                 err)
