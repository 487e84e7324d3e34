"""The VM zoo: each model self-contained; shared layers live in models/layers.py."""

from __future__ import annotations

import torch.nn as nn

from loopfm.config import VMConfig

from ..inputs import InputSpec
from .dcnv2 import DCNv2
from .deepfm import DeepFM
from .din import DIN
from .dnn import DNN

VM_ZOO: dict[str, type[nn.Module]] = {"dnn": DNN, "deepfm": DeepFM, "dcnv2": DCNv2, "din": DIN}


def build_vm(cfg: VMConfig, spec: InputSpec, aux_head: bool = False) -> nn.Module:
    """The VM named by cfg.model over the inputs `spec` describes."""
    if cfg.model not in VM_ZOO:
        raise ValueError(f"vm.model {cfg.model!r} not one of {', '.join(VM_ZOO)}")
    return VM_ZOO[cfg.model](cfg, spec, aux_head)
