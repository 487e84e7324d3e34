"""DCN-V2 (parallel): full-rank cross layers x_{l+1} = x0 * (W x_l + b) + x_l beside a deep MLP."""

from __future__ import annotations

import torch
import torch.nn as nn

from loopfm.config import VMConfig

from ..inputs import InputSpec, VMInputs
from ..layers import MLP, vm_output


class CrossNetwork(nn.Module):
    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DCNv2(nn.Module):
    def __init__(self, cfg: VMConfig, spec: InputSpec, aux_head: bool = False):
        super().__init__()
        self.inputs = VMInputs(spec, cfg.embed_dim)
        in_dim = self.inputs.num_fields * cfg.embed_dim
        self.cross = CrossNetwork(in_dim, cfg.cross_layers)
        self.mlp = MLP(in_dim, cfg.hidden, cfg.dropout)
        out_dim = in_dim + self.mlp.out_dim
        self.head = nn.Linear(out_dim, 1)
        self.aux = nn.Linear(out_dim, 1) if aux_head else None

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0 = torch.cat(self.inputs(batch), dim=-1)
        h = torch.cat([self.cross(x0), self.mlp(x0)], dim=-1)
        return vm_output(self.head(h), h, self.aux)
