"""What the app serves: VM checkpoints (one per vertical), their feature sets and one store version.

Every path may be a URI (`s3://...`): a cluster serves a run directory in a bucket.

`latest_vm` picks the newest VM checkpoint of an arm and seed in a run directory (by the time its
manifest was written), of one vertical when asked; `Bundle.open` reads the manifests and checks
they agree: the VM's feature set must exist, and the store it names must be the one the feature set
was joined from. `open_bundles` opens the VMs of several verticals and refuses them unless they all
read the same store version (one app holds one store). No Ray, no torch here: the app builder, the
CLI and the deployments all call it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from loopfm.datasets.splits import SplitInfo
from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.features.reader import FeaturesManifest
from loopfm.location import AnyPath, Location, as_location
from loopfm.rundir import RunDir
from loopfm.training.checkpoint import VMManifest


def vm_vertical(vm_dir: Location, run: RunDir) -> int:
    """The surface a VM serves: its manifest's `vertical`, or the split's vertical for a manifest
    written before VMs carried one (read from the JSON, so either manifest version works)."""
    declared = declared_vertical(vm_dir)
    return declared if declared is not None else SplitInfo.load(run).vertical


def declared_vertical(vm_dir: Location) -> Optional[int]:
    """The manifest's own `vertical`, None when it has none."""
    declared = json.loads((as_location(vm_dir) / "manifest.json").read_text()).get("vertical")
    return None if declared is None else int(declared)


def latest_vm(run: RunDir, arm: str, seed: int, vertical: Optional[int] = None) -> AnyPath:
    """The newest `vm/<arm>/seed<seed>-*/` holding a manifest (newest manifest wins); with
    `vertical`, the newest of the VMs that serve that surface (`vm_vertical`)."""
    parent = run.root / "vm" / arm
    found = [p for p in parent.glob(f"seed{seed}-*") if p.is_dir() and (p / "manifest.json").is_file()]
    if vertical is not None:
        found = [p for p in found if vm_vertical(p, run) == vertical]
    if not found:
        which = f"arm {arm!r} seed {seed}" + (f" vertical {vertical}" if vertical is not None else "")
        raise MissingInputError(f"no VM checkpoint of {which} under {parent}: "
                                f"run `loopfm train --arm {arm} --seed {seed}` (or `loopfm report`) first")
    return max(found, key=lambda p: ((p / "manifest.json").stat().st_mtime_ns, p.name))


@dataclass
class Bundle:
    run: RunDir
    vm_dir: AnyPath
    vm: VMManifest
    features: FeaturesManifest
    store_dir: Optional[AnyPath]  # None when the VM does not read the store

    @classmethod
    def open(cls, run_dir: Location, vm_dir: Location, store_dir: Optional[Location] = None) -> Bundle:
        run, vm_dir = RunDir(run_dir), as_location(vm_dir).resolve()
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
            store = as_location(store_dir).resolve() if store_dir else run.store(vm.store_version)
        return cls(run, vm_dir, vm, features, store)

    @property
    def store_version(self) -> Optional[str]:
        return self.vm.store_version


def open_bundles(run_dir: Location, vm_dirs: dict[int, Location],
                 store_dir: Optional[Location] = None) -> dict[int, Bundle]:
    """The bundle of each vertical's VM, refused unless all that read a store read the same version
    (the app holds one store) and each VM that declares its vertical is registered under it."""
    if not vm_dirs:
        raise MissingInputError("vm_dirs: no VM to serve")
    bundles = {int(v): Bundle.open(run_dir, d, store_dir) for v, d in vm_dirs.items()}
    for v, b in bundles.items():
        declared = declared_vertical(b.vm_dir)
        if declared is not None and declared != v:
            raise VersionMismatchError(f"VM {b.vm.model_version} ({b.vm_dir}) serves vertical {declared}, "
                                       f"but is registered under vertical {v}")
    reading = [(v, b) for v, b in bundles.items() if b.store_version is not None]  # base/kd VMs read none
    for (first, a), (v, b) in zip(reading, reading[1:]):
        if b.store_version != a.store_version:
            raise VersionMismatchError(
                f"one app serves one store version: VM {a.vm.model_version} (vertical {first}) reads store "
                f"version {a.store_version}, VM {b.vm.model_version} (vertical {v}) reads {b.store_version}")
    return bundles
