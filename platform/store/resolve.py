"""Which store a config reads: the one its `embed` section built (features, increments, compaction, drift).

A store version is `stable_hash(fm_version, embed.layers, embed.compress, compressor_hash)` (the
embed stage names its output so, once the compressor is trained), so a store built with other
layers, width, dtype or compressor settings, or with another trained compressor, is never picked
up by accident. A store is found from the config by its manifest: it is this config's when the
version it records is the one its own FM version and compressor hash give under this `embed`
section. Among those, the one from the requested FM (or, when no FM is named, the newest) wins;
its manifest is then checked against what the features expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from loopfm.config import EmbedConfig, LoopFMConfig, stable_hash
from loopfm.errors import MissingInputError
from loopfm.rundir import RunDir
from loopfm.store.parquet import open_store
from loopfm.store.schema import StoreManifest


def store_version(fm_version: str, embed: EmbedConfig, compressor_hash: str) -> str:
    """What the stored z depend on: the FM, the layers, the compressor's settings and its trained
    weights (`compressor_hash`, the sha256 of `compressor.pt`); not batch sizes or actors.

    The weights are in it because one config can train two compressors (other hardware, numeric
    precision or library version): a store rebuilt so gets another version, so the features, VMs
    and serving bundles that pinned the old version never take the new one's z for theirs.
    """
    return stable_hash(fm_version, embed.layers, embed.compress, compressor_hash)


def expected_fields(cfg: LoopFMConfig, fm_version: Optional[str] = None) -> dict:
    """The store fields the features pin (StoreManifest.check refuses any other value)."""
    return {
        "fm_version": fm_version,
        "layers": list(cfg.embed.layers),
        "width": cfg.embed.compress.width,
        "dtype": cfg.embed.compress.dtype,
    }


def stores(run: RunDir) -> list[tuple[Path, StoreManifest]]:
    """(path, manifest) of every finished full store of the run."""
    parent = run.root / "store"
    if not parent.is_dir():
        return []
    return [(path, StoreManifest.read(path)) for path in sorted(p for p in parent.iterdir() if p.is_dir()
            and not p.name.startswith(".") and (p / "manifest.json").is_file())]


def stores_of(cfg: LoopFMConfig, run: RunDir, fm_version: Optional[str] = None) -> list[tuple[Path, StoreManifest]]:
    """The stores this config's `embed` section built (from FM `fm_version` when given), newest last."""
    ours = [(path, m) for path, m in stores(run)
            if m.store_version == store_version(m.fm_version, cfg.embed, m.compressor_hash)
            and fm_version in (None, m.fm_version)]
    return sorted(ours, key=lambda pm: (pm[1].created_at, pm[0].name))


def resolve_store(cfg: LoopFMConfig, run: RunDir, fm_version: Optional[str] = None) -> tuple[Path, StoreManifest]:
    """(path, manifest) of the store this config's features read; refuses a mismatching one."""
    ours = stores_of(cfg, run, fm_version)
    if not ours:
        seen = ", ".join(p.name for p, _ in stores(run)) or "none"
        wanted = f"FM {fm_version} and this embed config" if fm_version else "this embed config"
        raise MissingInputError(f"no store in {run.root / 'store'} built from {wanted} (found: {seen}): "
                                "run `loopfm embed` first")
    path, _ = ours[-1]
    return path, open_store(path, expected_fields(cfg, fm_version))
