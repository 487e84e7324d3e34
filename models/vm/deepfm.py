"""DeepFM: first-order weights + FM pairwise interactions of the fields + a deep MLP, summed.

The pooled raw history and the LoopFM encoding are fields like any other, so the FM term
crosses the FM embedding with the candidate, user and context explicitly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from loopfm.config import VMConfig

from ..inputs import FeatureEmbeddings
from ..layers import MLP
from .base import VMBase


class DeepFM(VMBase):
    def build(self, cfg: VMConfig, in_dim: int) -> int:
        spec, emb = self.inputs.spec, self.inputs.emb
        self.first_ids = FeatureEmbeddings(spec.vocab_sizes, spec.context_sizes, 1)
        n_pooled = self.inputs.num_fields - emb.num_fields
        self.first_dense = nn.Linear(n_pooled * emb.dim, 1)  # first order of the pooled (non-id) fields
        self.mlp = MLP(in_dim, cfg.hidden, cfg.dropout)
        return self.mlp.out_dim

    def interact(self, fields, batch):
        n_ids = self.inputs.emb.num_fields
        first = torch.cat(self.first_ids(batch), dim=-1).sum(-1, keepdim=True)
        first = first + self.first_dense(torch.cat(fields[n_ids:], dim=-1))
        v = torch.stack(fields, dim=1)  # (B, F, D)
        second = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(-1, keepdim=True)
        return self.mlp(v.flatten(1)), first + second


VM = DeepFM
