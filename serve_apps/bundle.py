"""What one deployment of the app serves: a VM checkpoint, its feature set and its store version.

`latest_vm` picks the newest VM checkpoint of an arm and seed in a run directory (by the time its
manifest was written); `Bundle.open` reads the manifests and checks they agree: the VM's feature
set must exist, and the store it names must be the one the feature set was joined from. No Ray,
no torch here: the app builder, the CLI and the deployments all call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.features.reader import FeaturesManifest
from loopfm.rundir import RunDir
from loopfm.training.checkpoint import VMManifest


def latest_vm(run: RunDir, arm: str, seed: int) -> Path:
    """The newest `vm/<arm>/seed<seed>-*/` holding a manifest (newest manifest wins)."""
    parent = run.root / "vm" / arm
    found = [p for p in parent.glob(f"seed{seed}-*") if p.is_dir() and (p / "manifest.json").is_file()]
    if not found:
        raise MissingInputError(f"no VM checkpoint of arm {arm!r} seed {seed} under {parent}: "
                                f"run `loopfm train --arm {arm} --seed {seed}` (or `loopfm report`) first")
    return max(found, key=lambda p: ((p / "manifest.json").stat().st_mtime_ns, p.name))


@dataclass
class Bundle:
    run: RunDir
    vm_dir: Path
    vm: VMManifest
    features: FeaturesManifest
    store_dir: Optional[Path]  # None when the VM does not read the store

    @classmethod
    def open(cls, run_dir: str | Path, vm_dir: str | Path, store_dir: Optional[str | Path] = None) -> Bundle:
        run, vm_dir = RunDir(run_dir), Path(vm_dir).resolve()
        vm = VMManifest.read(vm_dir)
        features = FeaturesManifest.read(run.features(vm.features_fingerprint))
        if vm.seq_len != features.seq_len or vm.raw_seq_len != features.raw_seq_len:
            raise VersionMismatchError(
                f"VM {vm.model_version} expects seq_len {vm.seq_len} / raw_seq_len {vm.raw_seq_len}, features "
                f"{features.fingerprint} have {features.seq_len} / {features.raw_seq_len}")
        if vm.store_version is not None and vm.store_version != features.store_version:
            raise VersionMismatchError(
                f"VM {vm.model_version} was trained on store version {vm.store_version}, but its features "
                f"{features.fingerprint} were joined from store version {features.store_version}")
        if vm.store_version is None:
            store = None
        else:
            store = Path(store_dir).resolve() if store_dir else run.store(vm.store_version)
        return cls(run, vm_dir, vm, features, store)

    @property
    def store_version(self) -> Optional[str]:
        return self.vm.store_version
