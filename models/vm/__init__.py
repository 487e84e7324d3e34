"""The VM zoo: each model self-contained; shared layers live in models/layers.py."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from loopfm.config import VMConfig

from .dcnv2 import DCNv2
from .deepfm import DeepFM
from .din import DIN
from .dnn import DNN

VM_ZOO: dict[str, type[nn.Module]] = {"dnn": DNN, "deepfm": DeepFM, "dcnv2": DCNv2, "din": DIN}


def build_vm(cfg: VMConfig, vocab_sizes: dict[str, int], context_sizes: list[int], seq_width: Optional[int],
             aux_head: bool = False) -> nn.Module:
    """The VM named by cfg.model; seq_width None = no LoopFM input (already the prefix width if sliced)."""
    if cfg.model not in VM_ZOO:
        raise ValueError(f"vm.model {cfg.model!r} not one of {', '.join(VM_ZOO)}")
    return VM_ZOO[cfg.model](cfg, vocab_sizes, list(context_sizes), seq_width, aux_head)
