"""DeepFM: first-order weights + FM pairwise interactions of the fields + a deep MLP, summed.

The pooled raw history and the LoopFM encoding are fields like any other, so the FM term
crosses the FM embedding with the candidate, user and context explicitly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from loopfm.config import VMConfig

from ..inputs import FeatureEmbeddings, InputSpec, VMInputs
from ..layers import MLP, vm_output


class DeepFM(nn.Module):
    def __init__(self, cfg: VMConfig, spec: InputSpec, aux_head: bool = False):
        super().__init__()
        D = cfg.embed_dim
        self.inputs = VMInputs(spec, D)
        self.first_ids = FeatureEmbeddings(spec.vocab_sizes, spec.context_sizes, 1)
        n_dense = self.inputs.num_fields - self.inputs.emb.num_fields
        self.first_dense = nn.Linear(n_dense * D, 1)  # first order of the pooled (non-id) fields
        self.mlp = MLP(self.inputs.num_fields * D, cfg.hidden, cfg.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)
        self.aux = nn.Linear(self.mlp.out_dim, 1) if aux_head else None

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fields = self.inputs(batch)
        n_ids = self.inputs.emb.num_fields
        first = torch.cat(self.first_ids(batch), dim=-1).sum(-1, keepdim=True)
        first = first + self.first_dense(torch.cat(fields[n_ids:], dim=-1))
        v = torch.stack(fields, dim=1)  # (B, F, D)
        second = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(-1, keepdim=True)
        h = self.mlp(v.flatten(1))
        return vm_output(first + second + self.head(h), h, self.aux)
