"""The store as parquet files plus a `StoreManifest`, on any `pyarrow.fs` filesystem (`ParquetBackend`).

`seal` runs last inside the writer's attempt: it counts the rows, finds the time range, hashes
every file and writes the manifest, so a store a reader can open is complete. `open_store`
refuses a store whose manifest differs from what the reader pins (FM version, layers, width,
dtype) or whose files no longer hash as recorded.

Two ways to commit, one per kind of storage:

* local disk renames: the attempt is a hidden temp directory beside the final one
  (`rundir.atomic_output`), the manifest is written inside it and the directory is renamed (or
  exchanged) into place; a store's directory holds its data files and nothing else.
* an object store cannot rename: the attempt is a prefix `<store>/.attempt-<ms>-<random>/` inside
  the store's own prefix, and `<store>/manifest.json`, written last in one PUT, is the commit. It
  lists its files by their keys under that attempt (and names the attempt), so readers read only
  what a manifest lists: a crashed attempt is never seen, two writers of one version each commit
  whole files of their own (the last manifest wins), and attempts no manifest names are removed
  once older than the grace period (a writer must finish within it; so must a reader of a
  superseded manifest).

The module functions (`seal`, `open_store`, `data_files`, `file_hash`) are the local backend's,
for the callers that hold local paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.location import AnyPath, UriPath, is_remote
from loopfm.rundir import (
    ATTEMPT,
    ATTEMPT_KEY,
    GRACE_S,
    MANIFEST,
    atomic_output,
    attempt_name,
    check_rows,
    manifest_json,
    now_stamp,
    reap_dead_temps,
    reap_stale,
)
from loopfm.store.backend import Chain, StoreBackend, UserRange
from loopfm.store.schema import COMPRESSOR_FILE, EVENT_ID, TS, USER_ID, StoreManifest


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ParquetBackend(StoreBackend):
    """Parquet files on `filesystem` under `root`; local disk commits by rename, other filesystems by
    writing the manifest last (module docstring)."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, grace_s: float = GRACE_S):
        super().__init__(filesystem, root)
        self.renames = isinstance(filesystem, pafs.LocalFileSystem)
        self.grace_s = grace_s
        self._live: set[str] = set()  # attempts this process is writing: never cleaned up under it
        self._sealed: set[str] = set()
        # local reads go through pyarrow's default (local) resolution, as before there were backends
        self._read_fs = None if self.renames else filesystem

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def attempt(self, path: str) -> Iterator[str]:
        if self.renames:
            with atomic_output(Path(path)) as tmp:
                yield str(tmp)
                if not (tmp / MANIFEST).is_file():
                    raise ValueError(f"an attempt at {path} ended without `seal`: not published")
            return
        tmp = f"{path}/{attempt_name()}"
        self._live.add(tmp)
        try:
            self.fs.create_dir(tmp)
            yield tmp
            if tmp not in self._sealed:
                raise ValueError(f"an attempt at {path} ended without `seal`: not published")
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_dir(tmp)
            raise
        finally:
            self._live.discard(tmp)
            self._sealed.discard(tmp)
        self.cleanup(path, self.grace_s)

    def seal(self, attempt: str, manifest: StoreManifest, expected_rows: Optional[int] = None,
             stage: str = "store") -> StoreManifest:
        """Compute rows, ts range, file hashes and `created_at` into `manifest` and write it (what the
        caller built it with for those is overwritten); checks the row count (`expected_rows`: one per
        event the `stage` embedded) and that event ids are unique."""
        manifest = self.measure(attempt, manifest, expected_rows, stage)
        if self.renames:
            manifest.write(Path(attempt))
        else:
            store = posixpath.dirname(attempt)
            self._write_text(f"{store}/{MANIFEST}",
                             manifest_json({**manifest.to_dict(), ATTEMPT_KEY: posixpath.basename(attempt)}))
            self._sealed.add(attempt)
        return manifest

    def measure(self, attempt: str, manifest: StoreManifest, expected_rows: Optional[int] = None,
                stage: str = "store") -> StoreManifest:
        """`manifest` with the rows, ts range, files (named as `open` finds them: under the attempt
        on an object store) and `created_at` of the attempt's data files, checked; written nowhere."""
        files = self._listing(attempt)
        tables = [pq.read_table(f, columns=[EVENT_ID, TS], filesystem=self._read_fs) for f in files]
        rows = sum(t.num_rows for t in tables)
        if expected_rows is not None:
            check_rows(stage, f"store at {attempt}", rows, expected_rows, "one per event embedded")
        if rows:
            unique = len(np.unique(np.concatenate([t[EVENT_ID].to_numpy() for t in tables])))
            if unique != rows:
                raise VersionMismatchError(f"{stage}: store at {attempt} holds {rows - unique} duplicate event ids; "
                                           "not published")
        manifest.rows = rows
        manifest.min_ts = min((pc.min(t[TS]).as_py() for t in tables if t.num_rows), default=0)
        manifest.max_ts = max((pc.max(t[TS]).as_py() for t in tables if t.num_rows), default=0)
        manifest.created_at = now_stamp()
        if self.renames:
            manifest.files = {str(Path(f).relative_to(attempt)): file_hash(Path(f)) for f in files}
        else:
            store = posixpath.dirname(attempt)
            manifest.files = {posixpath.relpath(f, store): self._hash(f) for f in files}
        return manifest

    # -- reading -----------------------------------------------------------------------------
    def open(self, path: str, expected: Optional[dict[str, Any]] = None, verify_files: bool = True) -> StoreManifest:
        manifest = self._manifest(path)
        if expected:
            manifest.check(expected, where=path)
        if verify_files:
            if self.renames:  # the directory is the store: nothing in it but what the manifest lists
                present = {str(Path(f).relative_to(path)) for f in self._listing(path)}
            else:  # the prefix also holds other attempts: only the manifest's files count
                infos = self.fs.get_file_info([f"{path}/{name}" for name in manifest.files])
                present = {name for name, info in zip(manifest.files, infos) if info.type == pafs.FileType.File}
            listed = set(manifest.files)
            if present != listed:
                raise VersionMismatchError(f"store at {path}: files differ from its manifest (missing "
                                           f"{sorted(listed - present)}, unexpected {sorted(present - listed)})")
            for name, digest in manifest.files.items():
                if self._hash(f"{path}/{name}") != digest:
                    raise VersionMismatchError(f"store at {path}: {name} does not match the hash in its manifest")
        return manifest

    def files(self, path: str, manifest: Optional[StoreManifest] = None) -> list[str]:
        if self.renames:  # what `open` verified equals the manifest's list
            return self._listing(path)
        manifest = manifest or self._manifest(path)
        return [f"{path}/{name}" for name in sorted(manifest.files)]

    def scan(self, stores: str | Sequence[tuple[str, StoreManifest]], columns: Sequence[str],
             users: Optional[UserRange] = None) -> pa.Table:
        if isinstance(stores, (str, os.PathLike)):
            paths = self.files(os.fspath(stores))
        else:
            paths = [f for path, manifest in stores for f in self.files(os.fspath(path), manifest)]
        where = None if users is None else (pc.field(USER_ID) >= users[0]) & (pc.field(USER_ID) < users[1])
        return pads.dataset(paths, format="parquet", filesystem=self._read_fs).to_table(columns=list(columns),
                                                                                         filter=where)

    def chain(self, path: str, base: Optional[StoreManifest] = None) -> Chain:
        base = base or self.open(path)
        chain: Chain = [(path, base)]
        pinned = {"fm_version": base.fm_version, "layers": base.layers, "width": base.width, "dtype": base.dtype}
        for delta_path in self.delta_paths(base.store_version):
            delta = self._manifest(delta_path)
            if delta.since is not None and delta.since < base.max_ts:
                continue  # folded into the base by a compaction that stopped before removing it
            delta = self.open(delta_path, pinned)
            if delta.parent != chain[-1][1].store_version or delta.base != base.store_version:
                raise VersionMismatchError(
                    f"store delta {delta_path} extends {delta.parent} (base {delta.base}), but the chain before it "
                    f"ends at {chain[-1][1].store_version} (base {base.store_version})")
            chain.append((delta_path, delta))
        return chain

    def delta_paths(self, version: str) -> list[str]:
        """The committed deltas of store `version`, in order (their names start with the sequence number)."""
        parent = self.deltas_path(version)
        if self.renames:
            if not Path(parent).is_dir():
                return []
            return [str(p) for p in sorted(Path(parent).iterdir())
                    if not p.name.startswith(".") and (p / MANIFEST).is_file()]
        infos = self.fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        names = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
        paths = [f"{parent}/{name}" for name in names if not name.startswith(".")]
        return [p for p in paths if self._is_file(f"{p}/{MANIFEST}")]

    def side_file(self, path: str, name: str) -> str:
        if self.renames:
            return f"{path}/{name}"
        attempt = self._raw_manifest(path).get(ATTEMPT_KEY)
        return f"{path}/{attempt}/{name}" if attempt else f"{path}/{name}"

    # -- maintenance -------------------------------------------------------------------------
    def compact(self, version: str, chain: Optional[Chain] = None) -> StoreManifest:
        path = self.store_path(version)
        chain = chain or self.chain(path)
        base = chain[0][1]
        if len(chain) == 1:
            self._remove_folded(version)
            return base
        with self.attempt(path) as tmp:
            for i, (link, manifest) in enumerate(chain):
                for f in self.files(link, manifest):
                    self.fs.copy_file(f, f"{tmp}/{i:04d}-{posixpath.basename(f)}")
            compressor = self.side_file(path, COMPRESSOR_FILE)
            if self._is_file(compressor):
                self.fs.copy_file(compressor, f"{tmp}/{COMPRESSOR_FILE}")
            compacted = self.seal(tmp, dataclasses.replace(base), expected_rows=sum(m.rows for _, m in chain),
                                  stage="store compact")  # the base's fields; rows, ts range and files recomputed
        self._remove_folded(version)
        return compacted

    def _remove_folded(self, version: str) -> None:
        """With the base just written: every delta left is folded into it (those of this compaction,
        and those a compaction killed before this step left); an unfinished delta's attempt is
        abandoned (locally: its writer is dead; on an object store: older than the grace period)."""
        for delta_path in self.delta_paths(version):
            if self.renames:
                shutil.rmtree(delta_path)
            else:
                self.fs.delete_dir(delta_path)
        parent = self.deltas_path(version)
        if self.renames:
            reap_dead_temps(Path(parent))
            return
        for info in self.fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
            if info.type == pafs.FileType.Directory:
                self.cleanup(info.path, self.grace_s)

    def cleanup(self, path: str, older_than_s: float) -> list[str]:
        """Locally: temp dirs of `path` whose writer process is dead (`rundir.reap_stale`; their age
        does not matter, a live writer's is never touched). On an object store: attempts under `path`
        that its manifest does not name, at least `older_than_s` old, and not being written by this
        process."""
        if self.renames:
            return [str(p) for p in reap_stale(Path(path))]
        committed = self._raw_manifest(path).get(ATTEMPT_KEY) if self._is_file(f"{path}/{MANIFEST}") else None
        now_ms = time.time() * 1000
        removed = []
        for info in self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            name = posixpath.basename(info.path)
            match = ATTEMPT.fullmatch(name)
            if (match is None or info.type != pafs.FileType.Directory or name == committed
                    or f"{path}/{name}" in self._live or now_ms - int(match["ms"]) < older_than_s * 1000):
                continue
            self.fs.delete_dir(info.path)
            removed.append(info.path)
        return removed

    # -- files -------------------------------------------------------------------------------
    def _listing(self, path: str) -> list[str]:
        """The parquet files under `path`, none inside a hidden folder (another attempt, a temp dir)."""
        if self.renames:
            return [str(p) for p in sorted(Path(path).rglob("*.parquet"))
                    if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                      and not any(part.startswith(".") for part in posixpath.relpath(i.path, path).split("/")))

    def _manifest(self, path: str) -> StoreManifest:
        if self.renames:
            return StoreManifest.read(Path(path))
        return StoreManifest.from_dict(self._raw_manifest(path), path)

    def _raw_manifest(self, path: str) -> dict[str, Any]:
        if not self._is_file(f"{path}/{MANIFEST}"):
            raise MissingInputError(StoreManifest.MISSING.format(path=path))
        with self.fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            return json.loads(f.read().decode("utf-8"))

    def _hash(self, path: str) -> str:
        if self.renames:
            return file_hash(Path(path))
        h = hashlib.sha256()
        with self.fs.open_input_stream(path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def _is_file(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def _write_text(self, path: str, text: str) -> None:
        """One whole object (an object store's PUT is all or nothing)."""
        with self.fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))


_LOCAL = ParquetBackend(pafs.LocalFileSystem(), "/")


def backend_at(path: AnyPath) -> ParquetBackend:
    """The backend holding `path`: local disk, or the object store of a remote run directory."""
    return ParquetBackend(path.fs, path.key) if is_remote(path) else _LOCAL


def _key(path: AnyPath) -> str:
    return path.key if is_remote(path) else str(path)


def data_files(path: AnyPath) -> list[AnyPath]:
    """The data files of the committed store at `path` (on an object store: those its manifest lists)."""
    if is_remote(path):
        return [UriPath(path.scheme, f) for f in backend_at(path).files(path.key)]
    return [Path(f) for f in _LOCAL.files(str(path))]


def seal(path: AnyPath, manifest: StoreManifest, expected_rows: Optional[int] = None,
         stage: str = "store") -> StoreManifest:
    """`ParquetBackend.seal` of the attempt `path` (inside `rundir.atomic_output`). On an object store
    the manifest goes into the attempt, named as `open` reads it; `atomic_output` commits it (adding
    the attempt's name) as `<store>/manifest.json`, the same manifest the backend's own seal writes."""
    if is_remote(path):
        measured = backend_at(path.parent).measure(path.key, manifest, expected_rows, stage)
        (path / MANIFEST).write_text(manifest_json(measured.to_dict()))
        return measured
    return _LOCAL.seal(str(path), manifest, expected_rows, stage)


def open_store(path: AnyPath, expected: Optional[dict[str, Any]] = None, verify_files: bool = True) -> StoreManifest:
    """The manifest of a finished store, after checking it against `expected` and its files."""
    return backend_at(path).open(_key(path), expected, verify_files)
