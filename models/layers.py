"""Pieces every VM shares: an MLP, masked pooling, target attention, the output heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout per hidden width, then an optional linear output layer."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0, out_dim: Optional[int] = None):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = width
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
            in_dim = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over dim 1 of the slots where mask is True; masked slots may hold anything, even NaN."""
    return torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x)).sum(1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real slots; a row with none gives zeros (a cold-start user, not a NaN)."""
    return masked_sum(x, mask) / mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype)


class TargetAttention(nn.Module):
    """DIN-style attention: weight each key by an MLP score of [q, k, q-k, q*k], softmax over real keys."""

    def __init__(self, dim: int, hidden: Sequence[int] = (32,)):
        super().__init__()
        self.score = MLP(4 * dim, hidden, out_dim=1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keys = torch.where(mask.unsqueeze(-1), keys, torch.zeros_like(keys))
        q = query.unsqueeze(1).expand_as(keys)
        s = self.score(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
        # A row with no real key would softmax to NaN; give it finite scores and zero weights instead.
        s = s.masked_fill(~mask, float("-inf")).masked_fill(~mask.any(1, keepdim=True), 0.0)
        w = torch.softmax(s, dim=1) * mask.to(s.dtype)
        return (w.unsqueeze(-1) * keys).sum(1)


def vm_output(logit: torch.Tensor, hidden: torch.Tensor, aux: Optional[nn.Module]) -> dict[str, torch.Tensor]:
    """{"logit"} plus, with the ExFM auxiliary head, {"aux_logit"} read off the same last hidden layer."""
    out = {"logit": logit.squeeze(-1)}
    if aux is not None:
        out["aux_logit"] = aux(hidden).squeeze(-1)
    return out
