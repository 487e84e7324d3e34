"""Encoders of the LoopFM sequence: the user's last L stored z, pooled into one vector.

The stored width W is whatever the compressor chose, so each encoder first projects W to the
VM's embed_dim; the candidate item embedding (also embed_dim) is then a valid attention query.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from .layers import TargetAttention, masked_mean, masked_sum

Pooling = Literal["mean", "sum", "attention"]


class SequenceEncoder(nn.Module):
    def __init__(self, width: int, embed_dim: int, pooling: Pooling = "attention"):
        super().__init__()
        if pooling not in ("mean", "sum", "attention"):
            raise ValueError(f"pooling {pooling!r} not one of mean, sum, attention")
        self.pooling = pooling
        self.proj = nn.Linear(width, embed_dim)
        self.attn = TargetAttention(embed_dim) if pooling == "attention" else None
        self.out_dim = embed_dim

    def forward(self, seq: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """seq (B, L, W) float, mask (B, L) bool, query (B, embed_dim) -> (B, embed_dim)."""
        x = self.proj(seq.to(self.proj.weight.dtype))
        if self.pooling == "mean":
            return masked_mean(x, mask)
        if self.pooling == "sum":
            return masked_sum(x, mask)
        return self.attn(query, x, mask)
