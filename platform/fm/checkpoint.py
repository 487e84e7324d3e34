"""A trained FM on disk: `model.pt` + `manifest.json`. The FM version is the hash of `model.pt`.

Everything downstream (the store, its version, the VM features) names the FM by that hash, so
retraining with the same config but other weights gives a new version and never mixes with
the old one's embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopfm.config import FMConfig
from loopfm.location import as_path
from loopfm.models.fm import CausalFM
from loopfm.rundir import Manifest
from loopfm.weights import MODEL_FILE, model_hash, verified_state


@dataclass
class FMManifest(Manifest):
    MISSING = "no FM at {path}: run `loopfm fm train` first"

    fingerprint: str
    fm_version: str
    fm: dict[str, Any]  # FMConfig as JSON
    vocab_sizes: dict[str, int]
    num_surfaces: int
    splits_fingerprint: str
    metrics: dict[str, Any] = field(default_factory=dict)  # best epoch's valid and test metrics
    history: list = field(default_factory=list)  # one dict per epoch
    seconds: float = 0.0


def save_fm(directory: Path, weights: bytes, manifest: FMManifest) -> FMManifest:
    """Write into `directory` (a temp dir from atomic_output); the manifest goes last."""
    (as_path(directory) / MODEL_FILE).write_bytes(weights)
    manifest.fm_version = model_hash(weights)
    manifest.write(directory)
    return manifest


def load_fm(directory: Path):
    """(CausalFM in eval mode, manifest); refuses weights whose hash is not the manifest's version."""
    manifest = FMManifest.read(directory)
    model = CausalFM(FMConfig.model_validate(manifest.fm), manifest.vocab_sizes, manifest.num_surfaces)
    model.load_state_dict(verified_state(directory, manifest.fm_version))
    return model.eval(), manifest
