"""The plain deep model: concatenated field embeddings through an MLP."""

from __future__ import annotations

import torch

from loopfm.config import VMConfig

from ..layers import MLP
from .base import VMBase


class DNN(VMBase):
    def build(self, cfg: VMConfig, in_dim: int) -> int:
        self.mlp = MLP(in_dim, cfg.hidden, cfg.dropout)
        return self.mlp.out_dim

    def interact(self, fields, batch):
        return self.mlp(torch.cat(fields, dim=-1)), None


VM = DNN
