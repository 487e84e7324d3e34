"""The store on disk: a directory of parquet files in `ROW_SCHEMA` and a `StoreManifest`.

`seal` runs last inside the writer's temp directory (`rundir.atomic_output`): it counts the rows,
finds the time range, hashes every file and writes the manifest, so a store directory that exists
under its final name is complete. `open_store` refuses a store whose manifest differs from what
the reader pins (FM version, layers, width, dtype) or whose files no longer hash as recorded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loopfm.errors import VersionMismatchError
from loopfm.rundir import check_rows, now_stamp
from loopfm.store.schema import EVENT_ID, TS, StoreManifest


def data_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*.parquet")
                  if not any(part.startswith(".") for part in p.relative_to(path).parts))


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(path: Path, manifest: StoreManifest, expected_rows: Optional[int] = None,
         stage: str = "store") -> StoreManifest:
    """Compute rows, ts range, file hashes and `created_at` into `manifest` and write it (what the
    caller built it with for those is overwritten); checks the row count (`expected_rows`: one per
    event the `stage` embedded) and that event ids are unique."""
    files = data_files(path)
    tables = [pq.read_table(f, columns=[EVENT_ID, TS]) for f in files]
    rows = sum(t.num_rows for t in tables)
    if expected_rows is not None:
        check_rows(stage, f"store at {path}", rows, expected_rows, "one per event embedded")
    if rows:
        unique = len(np.unique(np.concatenate([t[EVENT_ID].to_numpy() for t in tables])))
        if unique != rows:
            raise VersionMismatchError(f"{stage}: store at {path} holds {rows - unique} duplicate event ids; "
                                       "not published")
    manifest.rows = rows
    manifest.min_ts = min((pc.min(t[TS]).as_py() for t in tables if t.num_rows), default=0)
    manifest.max_ts = max((pc.max(t[TS]).as_py() for t in tables if t.num_rows), default=0)
    manifest.files = {str(f.relative_to(path)): file_hash(f) for f in files}
    manifest.created_at = now_stamp()
    manifest.write(path)
    return manifest


def open_store(path: Path, expected: Optional[dict[str, Any]] = None, verify_files: bool = True) -> StoreManifest:
    """The manifest of a finished store, after checking it against `expected` and its files."""
    manifest = StoreManifest.read(path)
    if expected:
        manifest.check(expected, where=path)
    if verify_files:
        present = {str(f.relative_to(path)) for f in data_files(path)}
        if present != set(manifest.files):
            raise VersionMismatchError(
                f"store at {path}: files differ from its manifest (missing {sorted(set(manifest.files) - present)}, "
                f"unexpected {sorted(present - set(manifest.files))})"
            )
        for name, digest in manifest.files.items():
            if file_hash(Path(path) / name) != digest:
                raise VersionMismatchError(f"store at {path}: {name} does not match the hash in its manifest")
    return manifest
