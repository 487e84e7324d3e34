"""Every VM's input fields: ids, the vertical's own history and counters, and one sequence channel.

A VM sees, each as one (B, dim) field:
- the id fields: user, item, category and every context column;
- `history` (vm.features): the user's last raw_seq_len vertical events, each the sum of its
  item, category and label embeddings, pooled (mean, or DIN attention with the candidate as query);
- `counters` (vm.features): the dense point-in-time counters through one linear layer;
- the sequence channel of the arm, if any: the LoopFM sequence (stored FM embeddings, width W)
  or the rawseq control (the same slots as raw tokens: item + category + surface + label
  embeddings, width dim). Both go through the same `SequenceEncoder`, so the control differs
  from LoopFM only in what fills the slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .layers import TargetAttention, masked_mean
from .sequence import SequenceEncoder

LABEL_TOKENS = 3  # 0 padding, 1 not clicked, 2 clicked


@dataclass(frozen=True)
class InputSpec:
    """What a VM's inputs are, in plain values (read from the VM manifest, so serving rebuilds it)."""

    vocab_sizes: dict[str, int]  # user_id, item_id, category
    context_sizes: tuple[int, ...] = ()
    seq_width: Optional[int] = None  # LoopFM sequence width; None = not read
    rawseq: bool = False  # the rawseq control's raw-token sequence
    history: bool = True
    n_dense: int = 0  # counters; 0 = not read
    num_surfaces: int = 1
    pooling: str = "attention"
    history_pooling: str = "mean"


class FeatureEmbeddings(nn.Module):
    """One table per id field (user, item, category, each context column); 0 is padding.

    The item and category tables also embed the history and the rawseq slots, so they share a
    space with the candidate.
    """

    def __init__(self, vocab_sizes: dict[str, int], context_sizes, dim: int):
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


class VMInputs(nn.Module):
    def __init__(self, spec: InputSpec, dim: int):
        super().__init__()
        self.spec = spec
        self.emb = FeatureEmbeddings(spec.vocab_sizes, spec.context_sizes, dim)
        self.label = nn.Embedding(LABEL_TOKENS, dim, padding_idx=0) if spec.history or spec.rawseq else None
        self.hist_attn = TargetAttention(dim) if spec.history and spec.history_pooling == "attention" else None
        self.dense = nn.Linear(spec.n_dense, dim) if spec.n_dense else None
        self.surface = nn.Embedding(spec.num_surfaces + 1, dim, padding_idx=0) if spec.rawseq else None
        width = spec.seq_width if spec.seq_width is not None else (dim if spec.rawseq else None)
        self.seq = SequenceEncoder(width, dim, spec.pooling) if width is not None else None
        self.num_fields = self.emb.num_fields + spec.history + bool(spec.n_dense) + (self.seq is not None)
        self.dim = dim

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        fields = self.emb(batch)
        cand = fields[1]
        if self.spec.history:
            tokens = (self.emb.item(batch["hist_items"]) + self.emb.category(batch["hist_cats"])
                      + self.label(batch["hist_labels"]))  # (B, L_raw, dim)
            mask = batch["hist_labels"] != 0
            fields.append(self.hist_attn(cand, tokens, mask) if self.hist_attn is not None
                          else masked_mean(tokens, mask))
        if self.dense is not None:
            fields.append(self.dense(batch["dense"]))
        if self.spec.rawseq:
            tokens = (self.emb.item(batch["raw_items"]) + self.emb.category(batch["raw_cats"])
                      + self.surface(batch["raw_surfaces"]) + self.label(batch["raw_labels"]))  # (B, L, dim)
            fields.append(self.seq(tokens, batch["raw_mask"], cand))
        elif self.seq is not None:
            fields.append(self.seq(batch["seq"], batch["seq_mask"], cand))
        return fields
