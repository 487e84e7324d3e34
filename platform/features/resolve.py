"""Which store a run's features read: the one this config's `embed` section built.

A store version is `stable_hash(fm_version, embed.layers, embed.compress)` (the embed stage names its output so),
so a store built with other layers, width, dtype or compressor settings is never picked up by
accident. Among stores of this embed config, the one from the requested FM (or, when no FM is
named, the newest) wins; its manifest is then checked against what the features expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from loopfm.config import EmbedConfig, LoopFMConfig, stable_hash
from loopfm.errors import MissingInputError
from loopfm.rundir import RunDir
from loopfm.store.parquet import open_store
from loopfm.store.schema import StoreManifest


def store_version(fm_version: str, embed: EmbedConfig) -> str:
    """What the stored z depend on: the FM, the layers and the compressor (not batch sizes or actors)."""
    return stable_hash(fm_version, embed.layers, embed.compress)


def expected_fields(cfg: LoopFMConfig, fm_version: Optional[str] = None) -> dict:
    """The store fields the features pin (StoreManifest.check refuses any other value)."""
    return {
        "fm_version": fm_version,
        "layers": list(cfg.embed.layers),
        "width": cfg.embed.compress.width,
        "dtype": cfg.embed.compress.dtype,
    }


def resolve_store(cfg: LoopFMConfig, run: RunDir, fm_version: Optional[str] = None) -> tuple[Path, StoreManifest]:
    """(path, manifest) of the store this config's features read; refuses a mismatching one."""
    parent = run.root / "store"
    found = []
    if parent.is_dir():
        for path in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (path / "manifest.json").is_file():
                found.append((path, StoreManifest.read(path)))
    ours = [
        (path, m) for path, m in found
        if m.store_version == store_version(m.fm_version, cfg.embed) and fm_version in (None, m.fm_version)
    ]
    if not ours:
        seen = ", ".join(p.name for p, _ in found) or "none"
        wanted = f"FM {fm_version} and this embed config" if fm_version else "this embed config"
        raise MissingInputError(f"no store in {parent} built from {wanted} (found: {seen}): run `loopfm embed` first")
    path, _ = max(ours, key=lambda pm: (pm[1].created_at, pm[0].name))
    return path, open_store(path, expected_fields(cfg, fm_version))
