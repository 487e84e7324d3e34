"""The run directory (DESIGN section 3): where every stage reads its inputs and writes its outputs.

Each stage output is a directory holding a `manifest.json` with the stage's fingerprint (a hash of
the config sections and upstream versions it depends on). A stage whose output exists with the same
fingerprint is skipped. Outputs are written to a hidden temp directory and renamed into place, so a
crashed job leaves no half-written output under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

MANIFEST = "manifest.json"


class RunDir:
    """Paths of one run; every stage takes one, so names live here and nowhere else."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    # -- layout ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def source(self) -> Path:
        """The synthetic generator's raw log (contract format, before validation)."""
        return self.root / "data" / "source"

    @property
    def events(self) -> Path:
        """Validated, normalized events (one row per impression)."""
        return self.root / "data" / "events"

    @property
    def appended(self) -> Path:
        """Batches of new events added after the split (`loopfm logs append`), one folder each."""
        return self.root / "data" / "appended"

    @property
    def splits(self) -> Path:
        """train/ valid/ test/ parquet folders, the vocabulary and `manifest.json`."""
        return self.root / "data" / "splits"

    def fm(self, fingerprint: str) -> Path:
        return self.root / "fm" / fingerprint

    def store(self, version: str) -> Path:
        return self.root / "store" / version

    def store_deltas(self, version: str) -> Path:
        """Deltas of store `version` (`loopfm embed --incremental`), one folder each, in order."""
        return self.root / "store_deltas" / version

    def features(self, fingerprint: str) -> Path:
        return self.root / "features" / fingerprint

    def vm(self, arm: str, seed: int, fingerprint: str) -> Path:
        return self.root / "vm" / arm / f"seed{seed}-{fingerprint}"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def ray_storage(self) -> Path:
        """Ray Train / Tune `storage_path`: checkpoints of in-flight runs, for resume."""
        return self.root / "ray"

    def ensure(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def read_manifest(path: Path) -> Optional[dict]:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    return json.loads(f.read_text())


def from_manifest(cls, raw: dict[str, Any], path: Path):
    """The manifest dataclass `cls` from its JSON; one lacking a required field is refused by name."""
    import dataclasses

    from loopfm.errors import VersionMismatchError

    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise VersionMismatchError(f"{Path(path) / MANIFEST} lacks {missing}: not a complete {cls.__name__}")
    return cls(**{f.name: raw[f.name] for f in fields if f.name in raw})


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    data = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    tmp = Path(path) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, Path(path) / MANIFEST)


def is_complete(path: Path, fingerprint: Optional[str] = None) -> bool:
    """True when `path` holds a finished output (and, if given, with this fingerprint)."""
    m = read_manifest(path)
    return m is not None and (fingerprint is None or m.get("fingerprint") == fingerprint)


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final`, on error it is removed.

    A killed process leaves only a `.<name>.tmp-*` directory, which readers never look at and
    the next run of the same output removes.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
