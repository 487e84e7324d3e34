"""The skeleton every stage shares: skip an output that is current, connect to Ray, build into a
temp directory, write the manifest last, publish (docs/DESIGN.md, 'Run directory and stage outputs').

A simple stage is one call:

    return run_stage("data split", run.splits, fingerprint, build, read=SplitInfo.load_dir, ray=cfg.ray)

A stage whose output path is known only after some work (the store: its version hashes the trained
compressor) or that may decide not to publish (a VM stopped by Tune) uses the two halves,
`current` then `publish`, with its own work between them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

from loopfm.config import RayConfig
from loopfm.rundir import MANIFEST, Manifest, atomic_output, is_complete, write_manifest
from loopfm.runtime import init_ray, log

T = TypeVar("T")
Built = TypeVar("Built", Manifest, dict)


def current(stage: str, out: Path, fingerprint: Optional[str], read: Callable[[Path], T]) -> Optional[T]:
    """What `read` makes of `out` when it holds a finished output with this fingerprint, else None."""
    if not is_complete(out, fingerprint):
        return None
    log.info("%s: %s is current, skipped", stage, out)
    return read(out)


def publish(out: Path, build: Callable[[Path], Built]) -> Built:
    """`build(tmp)` writes the output's files into a temp directory and returns its manifest; the
    manifest is written last (unless `build` sealed it itself: `seal`, `save_fm`, `save_vm`), then
    the directory is renamed to `out`. A `build` that raises leaves nothing under `out`."""
    with atomic_output(out) as tmp:
        manifest = build(tmp)
        if not (tmp / MANIFEST).is_file():
            _write(manifest, tmp)
    return manifest


def run_stage(stage: str, out: Path, fingerprint: str, build: Callable[[Path], Built], *,
              read: Callable[[Path], Any], ray: Optional[RayConfig]) -> Any:
    """`current`, else Ray (when `ray` is given) and `publish`: the whole skeleton of a stage with
    one output whose path and fingerprint are known before any work."""
    done = current(stage, out, fingerprint, read)
    if done is not None:
        return done
    if ray is not None:
        init_ray(ray)
    return publish(out, build)


def _write(manifest: Manifest | dict, directory: Path) -> None:
    if isinstance(manifest, Manifest):
        manifest.write(directory)
    elif isinstance(manifest, dict):
        write_manifest(directory, manifest)
    else:
        raise TypeError(f"a stage's build returned {type(manifest).__name__}, not a manifest")
