"""A trained VM on disk: `model.pt` (a state dict) and `manifest.json` saying how to rebuild it.

The manifest pins everything the VM was trained against (feature set, store version, vocab and
context sizes, LoopFM width), so serving and evaluation rebuild the same module and refuse a store
it was not trained on. `model_version` is the sha256 prefix of `model.pt`; loading re-hashes the
bytes and refuses a file that does not match (torch.load(weights_only=True) never runs code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from loopfm.config import TrainConfig, VMConfig
from loopfm.location import as_path
from loopfm.models.inputs import InputSpec
from loopfm.models.vm import build_vm
from loopfm.rundir import Manifest
from loopfm.weights import MODEL_FILE, model_hash, verified_state


@dataclass
class VMManifest(Manifest):
    MISSING = "no VM checkpoint at {path} (missing manifest.json)"

    fingerprint: str
    model_version: str
    arm: str
    seed: int
    features_fingerprint: str
    store_version: Optional[str]
    vm: dict[str, Any]  # VMConfig as JSON
    train: dict[str, Any]  # TrainConfig as JSON (use_kd, use_loopfm, ...)
    vocab_sizes: dict[str, int]
    context_columns: list[str]
    context_sizes: list[int]
    seq_len: int
    seq_width: Optional[int]  # None when the VM does not read the LoopFM sequence
    raw_seq_len: int
    rawseq: bool = False  # reads the rawseq control's raw-token sequence
    dense_names: list[str] = field(default_factory=list)  # counters read (empty: none)
    num_surfaces: int = 1
    metrics: dict[str, Any] = field(default_factory=dict)  # {"valid": {...}, "test": {...}, "epochs": n}
    # the surface it serves (its features'); VMs written before the field had one vertical, 0 in every shipped config
    vertical: int = 0


def save_vm(directory: Path, model_state: bytes, manifest: VMManifest) -> VMManifest:
    """Write into `directory` (a temp dir from atomic_output); the manifest goes last."""
    directory = as_path(directory)
    (directory / MODEL_FILE).write_bytes(model_state)
    manifest.model_version = model_hash(model_state)
    manifest.write(directory)
    return manifest


def input_spec(manifest: VMManifest) -> InputSpec:
    """The VM's inputs as its manifest pins them."""
    vm = VMConfig.model_validate(manifest.vm)
    return InputSpec(vocab_sizes=dict(manifest.vocab_sizes), context_sizes=tuple(manifest.context_sizes),
                     seq_width=manifest.seq_width, rawseq=manifest.rawseq, history="history" in vm.features,
                     n_dense=len(manifest.dense_names), num_surfaces=manifest.num_surfaces, pooling=vm.pooling)


def build_from_manifest(manifest: VMManifest) -> torch.nn.Module:
    train = TrainConfig.model_validate(manifest.train)
    return build_vm(VMConfig.model_validate(manifest.vm), input_spec(manifest),
                    aux_head=train.use_kd and train.aux_head)


def load_vm(directory: Path) -> tuple[torch.nn.Module, VMManifest]:
    directory = as_path(directory)
    manifest = VMManifest.read(directory)
    model = build_from_manifest(manifest)
    model.load_state_dict(verified_state(directory, manifest.model_version))
    model.eval()
    return model, manifest
