"""DCN-V2 (parallel): full-rank cross layers x_{l+1} = x0 * (W x_l + b) + x_l beside a deep MLP."""

from __future__ import annotations

import torch
import torch.nn as nn

from loopfm.config import VMConfig

from ..layers import MLP
from .base import VMBase


class CrossNetwork(nn.Module):
    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DCNv2(VMBase):
    def build(self, cfg: VMConfig, in_dim: int) -> int:
        self.cross = CrossNetwork(in_dim, cfg.dcnv2.cross_layers)
        self.mlp = MLP(in_dim, cfg.hidden, cfg.dropout)
        return in_dim + self.mlp.out_dim

    def interact(self, fields, batch):
        x0 = torch.cat(fields, dim=-1)
        return torch.cat([self.cross(x0), self.mlp(x0)], dim=-1), None


VM = DCNv2
