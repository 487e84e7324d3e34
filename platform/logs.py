"""The `loopfm` logger: one line per step of a stage, on whatever stdout is at the time.

A module of its own, importing nothing heavy, so that the CLI (`loopfm --help`, `loopfm config
show`) and the benchmark helpers (`loopfm.bench`) can log without importing Ray or torch.
`loopfm.runtime` (Ray, devices) re-exports both names.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("loopfm")


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time (pytest and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("[loopfm %(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
