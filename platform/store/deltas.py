"""A store version and its deltas: the chain readers see, and compaction that folds it back.

`store/<version>/` is the full store; `store_deltas/<version>/<seq>-<hash>/` are the increments
(`loopfm embed --incremental`), each naming its `parent`. `open_chain` verifies every link
(files hashed, parent = previous, same FM, layers, width and dtype) so a reader never mixes
rows from two embedding spaces. `loopfm store compact` writes base + deltas as one full store
under the same version (same FM, same compressor: the rows are the ones the deltas held) and
then removes the folded deltas (a delta older than its base's newest event counts as folded,
so a compaction killed between the two steps double-counts nothing).

The chain has one writer at a time: `embed --incremental` and `store compact` both hold
`chain_lock` from reading the chain to publishing, so a compaction never folds and removes the
delta a running increment is extending (which would publish a delta whose parent is gone, and
every reader would then refuse the chain), and an increment always extends the chain as it is.

The chain's rules (which deltas count, the link checks, how compaction folds and what it removes)
live in the store backend (`loopfm.store.backend`, `ParquetBackend.chain` and `.compact`); these
functions are the run directory's entry points to them.
"""

from __future__ import annotations

from filelock import FileLock

from loopfm.config import LoopFMConfig
from loopfm.location import AnyPath, beside, fs_path
from loopfm.logs import log
from loopfm.rundir import RunDir, output_lock
from loopfm.store.backend import StoreBackend, backend_for
from loopfm.store.resolve import resolve_store
from loopfm.store.schema import StoreManifest


def run_backend(run: RunDir) -> StoreBackend:
    """The store backend of run directory `run` (local disk: commits by rename; an object store: by
    manifest). Its paths are the filesystem's (`location.fs_path`): `bucket/key` on an object store."""
    return backend_for(run.root)


def chain_lock(run: RunDir, version: str) -> FileLock:
    """The lock of store `version`'s chain (its deltas and its compaction): one writer at a time."""
    return output_lock(run.store_deltas(version))


def delta_paths(run: RunDir, version: str) -> list[AnyPath]:
    return [beside(run.root, p) for p in run_backend(run).delta_paths(version)]


def open_chain(run: RunDir, base_path: AnyPath,
               base: StoreManifest | None = None) -> list[tuple[AnyPath, StoreManifest]]:
    """[(path, manifest)] of the full store and each of its deltas in order, every link checked.
    `base`: the store's manifest when the caller has already verified it with `open_store`."""
    return [(beside(run.root, p), m) for p, m in run_backend(run).chain(fs_path(base_path), base)]


def chain_max_ts(chain: list[tuple[AnyPath, StoreManifest]]) -> int:
    return max(m.max_ts for _, m in chain if m.rows)


def compact_stage(cfg: LoopFMConfig, run: RunDir) -> StoreManifest:
    """`loopfm store compact`: fold this config's store and its deltas into one full store."""
    base_path, base = resolve_store(cfg, run)
    backend = run_backend(run)
    with chain_lock(run, base.store_version):
        # the chain as it is now: a compaction may have finished while this one waited
        chain = backend.chain(str(base_path))
        manifest = backend.compact(base.store_version, chain)
    if len(chain) == 1:
        log.info("store compact: %s has no deltas", base_path)
        return manifest
    log.info("store compact: %d deltas folded into %s (%d rows, ts up to %d)", len(chain) - 1, base_path,
             manifest.rows, manifest.max_ts)
    return manifest
