"""The store's backend interface: what every place a store can live must do, and nothing more.

Like Feast's `OnlineStore`, the interface is narrow so a new place (another object store, a table
format) is one module: write and seal a store or delta from an attempt, open one with its pinned
fields checked, scan rows of a user range with column projection, list a version's chain of
deltas, compact the chain. Callers never list directories or open data files themselves: which
files a store holds is the backend's answer, so a backend whose storage cannot rename (an object
store) can keep uncommitted data beside committed data without a reader ever seeing it.

Paths are strings in the backend's own filesystem (absolute local paths on disk, `bucket/key`
prefixes on S3); `store_path(version)` and `deltas_path(version)` place a run's stores under its
root as `RunDir` does (`store/<version>`, `store_deltas/<version>/<seq>-<hash>`).

Registration: `BACKENDS` maps a kind to `"module:Class"`, imported on first use, so a new backend
touches only its own module and its one line there.
"""

from __future__ import annotations

import importlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from loopfm.location import UriPath
from loopfm.rundir import valid_id
from loopfm.store.schema import StoreManifest

BACKENDS: dict[str, str] = {
    "parquet": "loopfm.store.parquet:ParquetBackend",
}

STORE_DIR = "store"  # RunDir.store: <root>/store/<version>
DELTAS_DIR = "store_deltas"  # RunDir.store_deltas: <root>/store_deltas/<version>/<seq>-<hash>
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

Chain = list[tuple[str, StoreManifest]]  # (path, manifest) of the full store, then each delta in order
UserRange = tuple[int, int]  # [lo, hi): user ids lo <= user_id < hi


class StoreBackend(ABC):
    """Where stores and their deltas live, and the only code that touches their files.

    Writers: `with backend.attempt(path) as tmp:` write data files under `tmp`, then
    `backend.seal(tmp, manifest, expected_rows)`; the manifest written by `seal` is the commit,
    and a block left by an exception leaves nothing a reader sees. Readers: `open` (pinned fields
    and file hashes checked), `files` (what a committed store holds, for readers that take paths,
    such as Ray Data), `scan`, `chain`. Maintenance: `compact`, `cleanup`.
    """

    def __init__(self, filesystem: pafs.FileSystem, root: str):
        self.fs = filesystem
        self.root = root.rstrip("/") or "/"

    # -- layout ------------------------------------------------------------------------------
    # a version may come from a manifest: checked before it becomes a path, as RunDir does (valid_id)
    def store_path(self, version: str) -> str:
        return self._join(STORE_DIR, valid_id(version, "store version"))

    def deltas_path(self, version: str) -> str:
        return self._join(DELTAS_DIR, valid_id(version, "store version"))

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if self.root != "/" else "/" + "/".join(parts)

    # -- writing -----------------------------------------------------------------------------
    @abstractmethod
    def attempt(self, path: str) -> AbstractContextManager[str]:
        """A fresh, private place to write the data files of the store (or delta) at `path`: yields
        where to write them. `seal` inside the block commits; an exception discards the attempt."""

    @abstractmethod
    def seal(self, attempt: str, manifest: StoreManifest, expected_rows: Optional[int] = None,
             stage: str = "store") -> StoreManifest:
        """Count, check and hash the attempt's data files into `manifest` (rows, ts range, files,
        created_at) and write it last: from then on readers see exactly these files."""

    # -- reading -----------------------------------------------------------------------------
    @abstractmethod
    def open(self, path: str, expected: Optional[dict[str, Any]] = None, verify_files: bool = True) -> StoreManifest:
        """The manifest of the committed store at `path`, refused (naming the field) when a field of
        `expected` differs, and (with `verify_files`) when its files are not the ones it records."""

    @abstractmethod
    def files(self, path: str, manifest: Optional[StoreManifest] = None) -> list[str]:
        """The data files of the committed store at `path`, in a fixed order."""

    @abstractmethod
    def scan(self, stores: str | Sequence[tuple[str, StoreManifest]], columns: Sequence[str],
             users: Optional[UserRange] = None) -> pa.Table:
        """The rows of one store (a path) or of a chain, in chain and file order, with only `columns`,
        and only users lo <= user_id < hi when `users` is given."""

    @abstractmethod
    def chain(self, path: str, base: Optional[StoreManifest] = None) -> Chain:
        """The full store at `path` and the deltas of its version in order, every link checked (same FM,
        layers, width, dtype; each delta's parent the one before it). `base`: its manifest, already opened."""

    @abstractmethod
    def side_file(self, path: str, name: str) -> str:
        """Where the committed store at `path` keeps the non-row file `name` (`compressor.pt`)."""

    # -- maintenance -------------------------------------------------------------------------
    @abstractmethod
    def compact(self, version: str, chain: Optional[Chain] = None) -> StoreManifest:
        """Fold the deltas of `version` into one full store under the same version, then remove them
        (`chain`: `self.chain` of it, when the caller has it). One writer of a chain at a time: the
        caller holds the chain's lock where there is one."""

    @abstractmethod
    def cleanup(self, path: str, older_than_s: float) -> list[str]:
        """Remove abandoned attempts at `path` (no manifest names them and their writer is gone, or
        they are older than `older_than_s`); returns what it removed."""


def backend_class(kind: str = "parquet") -> type[StoreBackend]:
    """The registered backend class of `kind`."""
    try:
        module, name = BACKENDS[kind].split(":")
    except KeyError:
        raise ValueError(f"no store backend {kind!r}; registered: {sorted(BACKENDS)}") from None
    return getattr(importlib.import_module(module), name)


def backend_for(location: str | os.PathLike | UriPath, kind: str = "parquet", **options: Any) -> StoreBackend:
    """The backend of a run directory given as a local path, a URI (`s3://bucket/runs/x?region=...`,
    `gs://...`, `file:///...`; the filesystem from `pyarrow.fs.FileSystem.from_uri`) or a run
    directory's `UriPath` (its own filesystem, resolved from the environment)."""
    if isinstance(location, UriPath):
        return backend_class(kind)(location.fs, location.key, **options)
    text = os.fspath(location)
    if _SCHEME.match(text):
        filesystem, root = pafs.FileSystem.from_uri(text)
    else:
        filesystem, root = pafs.LocalFileSystem(), os.path.abspath(text)
    return backend_class(kind)(filesystem, root, **options)
