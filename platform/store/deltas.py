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
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from filelock import FileLock

from loopfm.config import LoopFMConfig
from loopfm.errors import VersionMismatchError
from loopfm.logs import log
from loopfm.rundir import RunDir, output_lock, read_manifest, reap_dead_temps
from loopfm.skeleton import publish
from loopfm.store.parquet import data_files, open_store, seal
from loopfm.store.resolve import resolve_store
from loopfm.store.schema import COMPRESSOR_FILE, StoreManifest


def chain_lock(run: RunDir, version: str) -> FileLock:
    """The lock of store `version`'s chain (its deltas and its compaction): one writer at a time."""
    return output_lock(run.store_deltas(version))


def delta_paths(run: RunDir, version: str) -> list[Path]:
    root = run.store_deltas(version)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and read_manifest(p) is not None)


def open_chain(run: RunDir, base_path: Path, base: StoreManifest | None = None) -> list[tuple[Path, StoreManifest]]:
    """[(path, manifest)] of the full store and each of its deltas in order, every link checked.
    `base`: the store's manifest when the caller has already verified it with `open_store`."""
    base = base or open_store(base_path)
    chain = [(Path(base_path), base)]
    pinned = {"fm_version": base.fm_version, "layers": base.layers, "width": base.width, "dtype": base.dtype}
    for path in delta_paths(run, base.store_version):
        delta = StoreManifest.read(path)
        if delta.since is not None and delta.since < base.max_ts:
            continue  # folded into the base by a compaction that stopped before removing it
        delta = open_store(path, pinned)
        if delta.parent != chain[-1][1].store_version or delta.base != base.store_version:
            raise VersionMismatchError(
                f"store delta {path} extends {delta.parent} (base {delta.base}), but the chain before it ends at "
                f"{chain[-1][1].store_version} (base {base.store_version})")
        chain.append((path, delta))
    return chain


def chain_files(chain: list[tuple[Path, StoreManifest]]) -> list[Path]:
    return [f for path, _ in chain for f in data_files(path)]


def chain_max_ts(chain: list[tuple[Path, StoreManifest]]) -> int:
    return max(m.max_ts for _, m in chain if m.rows)


def compact_stage(cfg: LoopFMConfig, run: RunDir) -> StoreManifest:
    """`loopfm store compact`: fold this config's store and its deltas into one full store."""
    base_path, base = resolve_store(cfg, run)
    with chain_lock(run, base.store_version):
        base = open_store(base_path)  # as it is now: a compaction may have finished while this one waited
        chain = open_chain(run, base_path, base)
        if len(chain) == 1:
            _remove_folded(run, base.store_version)
            log.info("store compact: %s has no deltas", base_path)
            return base

        def build(tmp: Path) -> StoreManifest:
            for i, (path, _) in enumerate(chain):
                for f in data_files(path):
                    shutil.copy2(f, tmp / f"{i:04d}-{f.name}")
            shutil.copy2(base_path / COMPRESSOR_FILE, tmp / COMPRESSOR_FILE)
            return seal(tmp, dataclasses.replace(base), expected_rows=sum(m.rows for _, m in chain),
                        stage="store compact")  # the base's fields; rows, ts range and files recomputed

        manifest = publish(base_path, build)
        _remove_folded(run, base.store_version)
    log.info("store compact: %d deltas folded into %s (%d rows, ts up to %d)", len(chain) - 1, base_path,
             manifest.rows, manifest.max_ts)
    return manifest


def _remove_folded(run: RunDir, version: str) -> None:
    """With the chain lock held and the base just written: every delta left is folded into it (those
    of this compaction, and those a compaction killed before this step left), and a temp dir of a
    dead increment will never be published."""
    for path in delta_paths(run, version):
        shutil.rmtree(path)
    reap_dead_temps(run.store_deltas(version))
