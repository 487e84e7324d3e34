"""Pieces every VM shares: an MLP, the id embedding tables, masked pooling, target attention."""

from __future__ import annotations

from typing import Optional, Sequence

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


class FeatureEmbeddings(nn.Module):
    """One table per id field (user, item, category, each context column); 0 is padding.

    The item table also embeds `hist_items`, so the raw history and the candidate share a space.
    """

    def __init__(self, vocab_sizes: dict[str, int], context_sizes: Sequence[int], dim: int):
        super().__init__()
        self.user = nn.Embedding(vocab_sizes["user_id"], dim, padding_idx=0)
        self.item = nn.Embedding(vocab_sizes["item_id"], dim, padding_idx=0)
        self.category = nn.Embedding(vocab_sizes["category"], dim, padding_idx=0)
        self.context = nn.ModuleList(nn.Embedding(n, dim, padding_idx=0) for n in context_sizes)
        self.num_fields = 3 + len(context_sizes)
        self.dim = dim

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The field embeddings [user, item, category, *context], each (B, dim)."""
        fields = [self.user(batch["user"]), self.item(batch["item"]), self.category(batch["category"])]
        fields += [table(batch["context"][:, i]) for i, table in enumerate(self.context)]
        return fields

    def history(self, hist_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) embeddings of the raw history and its mask (item 0 = padding)."""
        return self.item(hist_items), hist_items != 0


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


class VMInputs(nn.Module):
    """Every VM's input fields, each (B, dim): ids, the raw short history, and the LoopFM sequence.

    history "mean" pools hist_items; "attention" (DIN) attends over them with the candidate item
    as query. With seq_width None the sequence is never read (base and KD arms), so a batch may
    omit seq / seq_mask.
    """

    def __init__(self, vocab_sizes: dict[str, int], context_sizes: Sequence[int], dim: int,
                 seq_width: Optional[int], pooling: str, history: str = "mean"):
        super().__init__()
        from .sequence import SequenceEncoder  # here, not at the top: sequence.py builds on this module

        self.emb = FeatureEmbeddings(vocab_sizes, context_sizes, dim)
        self.hist_attn = TargetAttention(dim) if history == "attention" else None
        self.seq = SequenceEncoder(seq_width, dim, pooling) if seq_width is not None else None
        self.num_fields = self.emb.num_fields + 1 + (self.seq is not None)
        self.dim = dim

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        fields = self.emb(batch)
        cand = fields[1]
        hist, mask = self.emb.history(batch["hist_items"])
        fields.append(self.hist_attn(cand, hist, mask) if self.hist_attn is not None else masked_mean(hist, mask))
        if self.seq is not None:
            fields.append(self.seq(batch["seq"], batch["seq_mask"], cand))
        return fields


def vm_output(logit: torch.Tensor, hidden: torch.Tensor, aux: Optional[nn.Module]) -> dict[str, torch.Tensor]:
    """{"logit"} plus, with the ExFM auxiliary head, {"aux_logit"} read off the same last hidden layer."""
    out = {"logit": logit.squeeze(-1)}
    if aux is not None:
        out["aux_logit"] = aux(hidden).squeeze(-1)
    return out
