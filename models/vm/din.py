"""DIN: the raw history is pooled by target attention with the candidate item as query."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from loopfm.config import VMConfig

from ..layers import MLP, VMInputs, vm_output


class DIN(nn.Module):
    def __init__(self, cfg: VMConfig, vocab_sizes: dict[str, int], context_sizes: list[int],
                 seq_width: Optional[int], aux_head: bool = False):
        super().__init__()
        self.inputs = VMInputs(vocab_sizes, context_sizes, cfg.embed_dim, seq_width, cfg.pooling, history="attention")
        self.mlp = MLP(self.inputs.num_fields * cfg.embed_dim, cfg.hidden, cfg.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)
        self.aux = nn.Linear(self.mlp.out_dim, 1) if aux_head else None

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.mlp(torch.cat(self.inputs(batch), dim=-1))
        return vm_output(self.head(h), h, self.aux)
