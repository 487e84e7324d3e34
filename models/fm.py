"""The foundation model: a causal, windowed transformer over one user's events on all surfaces.

There are no absolute positions, only a learned bias per head per relative offset inside the
window. So a position's output depends on its last `n_layers * (window - 1)` predecessors and
nothing else, and a long history cut into chunks that overlap by that much (`cfg.context`)
gives exactly the single-pass representation of every event. Extraction relies on this.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from loopfm.config import FMConfig

# prev_label token: the label of the user's previous event, shifted so an event never sees its own.
NO_PREV, PREV_NOT_CLICKED, PREV_CLICKED = 0, 1, 2


@runtime_checkable
class FMExtractor(Protocol):
    """What the embedding stage needs from any FM: per-event logits and layer activations.

    `context` is how many leading positions of a chunk only serve as context (their outputs
    are not exact); chunks must overlap by it.
    """

    context: int

    def extract(self, batch: dict[str, torch.Tensor], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def layer_width(self, layers: list[int]) -> int: ...


class WindowedSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, window: int, dropout: float):
        super().__init__()
        self.n_heads, self.window, self.dropout = n_heads, window, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.rel_bias = nn.Parameter(torch.zeros(n_heads, window))  # [h, i - j]

    def mask(self, T: int, device: torch.device) -> torch.Tensor:
        """(1, H, T, T) float: bias[h, i-j] where 0 <= i-j < window, -inf elsewhere.

        Four dimensions, not three: SDPA on CPU takes its fused (flash) kernel only for a 4-D mask
        and falls back to the math path for (H, T, T), which materializes B x H x T x T scores and
        ran 5x slower at the default shapes (T = 128, B = 64).
        """
        pos = torch.arange(T, device=device)
        offset = pos[:, None] - pos[None, :]
        inside = (offset >= 0) & (offset < self.window)
        bias = self.rel_bias[:, offset.clamp(0, self.window - 1)]
        return bias.masked_fill(~inside, float("-inf"))[None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask(T, x.device).to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg: FMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = WindowedSelfAttention(cfg.d_model, cfg.n_heads, cfg.window, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CausalFM(nn.Module):
    """Token = item + category + surface + previous-label embeddings; output = click logit per event.

    Batch: "item", "category", "surface", "prev_label", all (B, T) long, right-padded with item 0.
    """

    def __init__(self, cfg: FMConfig, vocab_sizes: dict[str, int], num_surfaces: int):
        super().__init__()
        self.cfg = cfg
        self.context = cfg.context
        self.item = nn.Embedding(vocab_sizes["item_id"], cfg.d_model, padding_idx=0)
        self.category = nn.Embedding(vocab_sizes["category"], cfg.d_model, padding_idx=0)
        self.surface = nn.Embedding(num_surfaces, cfg.d_model)
        self.prev_label = nn.Embedding(3, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 1)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (
            self.item(batch["item"])
            + self.category(batch["category"])
            + self.surface(batch["surface"])
            + self.prev_label(batch["prev_label"])
        )

    def _run(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.tokens(batch)
        states = [x]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return self.head(self.ln_f(x)).squeeze(-1), states

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logit": self._run(batch)[0]}

    def _check(self, layers: list[int]) -> None:
        n = self.cfg.n_layers
        bad = [k for k in layers if not 0 <= k <= n]
        if not layers or bad:
            raise ValueError(f"layers {list(layers)} invalid: need a non-empty list of ints in 0..{n} "
                             f"(0 = input tokens, k = output of block k)")

    def layer_width(self, layers: list[int]) -> int:
        self._check(layers)
        return self.cfg.d_model * len(layers)

    def extract(self, batch: dict[str, torch.Tensor], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit (B, T), activations of `layers` concatenated in that order (B, T, layer_width))."""
        self._check(layers)
        logit, states = self._run(batch)
        return logit, torch.cat([states[k] for k in layers], dim=-1)


def fm_loss(logit: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean BCE over real positions; padding (valid False) contributes nothing, not even NaN."""
    per = F.binary_cross_entropy_with_logits(logit, label.to(logit.dtype), reduction="none")
    per = torch.where(valid, per, torch.zeros_like(per))
    return per.sum() / valid.sum().clamp_min(1)
