"""DIN: the raw history is pooled by target attention with the candidate item as query."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from loopfm.config import VMConfig

from ..inputs import InputSpec, VMInputs
from ..layers import MLP, vm_output


class DIN(nn.Module):
    def __init__(self, cfg: VMConfig, spec: InputSpec, aux_head: bool = False):
        super().__init__()
        self.inputs = VMInputs(replace(spec, history_pooling="attention"), cfg.embed_dim)
        self.mlp = MLP(self.inputs.num_fields * cfg.embed_dim, cfg.hidden, cfg.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)
        self.aux = nn.Linear(self.mlp.out_dim, 1) if aux_head else None

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.mlp(torch.cat(self.inputs(batch), dim=-1))
        return vm_output(self.head(h), h, self.aux)
