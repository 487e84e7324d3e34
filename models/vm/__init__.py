"""The VM zoo: one module per architecture, named as `vm.model` names it, each exporting `VM`
(a `VMBase` subclass). A new architecture is one new file here: the zoo and the config's list of
names (`loopfm.config.vm.vm_names`) both come from the files."""

from __future__ import annotations

import importlib

from loopfm.config import VMConfig
from loopfm.config.vm import vm_names

from ..inputs import InputSpec
from .base import VMBase

VM_ZOO: dict[str, type[VMBase]] = {name: importlib.import_module(f"{__name__}.{name}").VM for name in vm_names()}


def build_vm(cfg: VMConfig, spec: InputSpec, aux_head: bool = False) -> VMBase:
    """The VM named by cfg.model over the inputs `spec` describes."""
    if cfg.model not in VM_ZOO:
        raise ValueError(f"vm.model {cfg.model!r} not one of {', '.join(VM_ZOO)}")
    return VM_ZOO[cfg.model](cfg, spec, aux_head)
