"""Matryoshka autoencoder: raw FM activations e -> z in [-1, 1]^width, every prefix usable alone.

z ends in tanh so the int4 store (round(8z)) has a fixed range. The loss averages the
reconstruction error over the prefix widths, which orders z by importance: a VM may read only
z[:d'] and still get the best d'-dimensional summary. It is trained on e.detach(), so
compression can never move the FM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from loopfm.config import CompressConfig


class MatryoshkaAE(nn.Module):
    def __init__(self, raw_width: int, cfg: CompressConfig):
        super().__init__()
        self.raw_width, self.width = raw_width, cfg.width
        self.prefix_widths = sorted(set(cfg.prefix_widths) | {cfg.width})
        self.register_buffer("mean", torch.zeros(raw_width))
        self.register_buffer("std", torch.ones(raw_width))
        self.enc = nn.Sequential(nn.Linear(raw_width, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.width),
                                 nn.Tanh())
        self.dec = nn.Sequential(nn.Linear(cfg.width, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, raw_width))

    @torch.no_grad()
    def fit_normalizer(self, sample: torch.Tensor) -> None:
        sample = sample.to(self.mean)
        self.mean.copy_(sample.mean(0))
        self.std.copy_(sample.std(0, unbiased=False).clamp_min(1e-6))

    def _norm(self, e: torch.Tensor) -> torch.Tensor:
        return (e.to(self.mean.dtype) - self.mean) / self.std

    def _prefix(self, z: torch.Tensor, prefix: Optional[int]) -> torch.Tensor:
        if prefix is None or prefix >= self.width:
            return z
        keep = torch.arange(self.width, device=z.device) < prefix
        return z * keep.to(z.dtype)

    def encode(self, e: torch.Tensor) -> torch.Tensor:
        return self.enc(self._norm(e))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z) * self.std + self.mean

    def reconstruct(self, e: torch.Tensor, prefix: Optional[int] = None) -> torch.Tensor:
        return self.decode(self._prefix(self.encode(e), prefix))

    def loss(self, e: torch.Tensor) -> torch.Tensor:
        """Mean over prefix widths of the MSE in normalized space, on stop-gradient(e)."""
        x = self._norm(e.detach())
        z = self.enc(x)
        return torch.stack([F.mse_loss(self.dec(self._prefix(z, p)), x) for p in self.prefix_widths]).mean()


def train_autoencoder(
    sample: torch.Tensor, cfg: CompressConfig, seed: int = 0, log: Optional[Callable[[str], None]] = None
) -> tuple[MatryoshkaAE, dict]:
    """Fit on 90% of `sample` (N, raw); report per-prefix MSE in raw space on the held-out 10%."""
    sample = sample.detach().float().cpu()
    n = sample.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_hold = max(1, n // 10) if n > 1 else 0
    hold, train = sample[perm[:n_hold]], sample[perm[n_hold:]]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = MatryoshkaAE(sample.shape[1], cfg)
    ae.fit_normalizer(train)
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr)
    ae.train()
    for epoch in range(cfg.epochs):
        order, total, seen = torch.randperm(len(train), generator=gen), 0.0, 0
        for start in range(0, len(train), cfg.batch_size):
            batch = train[order[start : start + cfg.batch_size]]
            loss = ae.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(batch), seen + len(batch)
        if log is not None:
            log(f"compress epoch {epoch + 1}/{cfg.epochs} loss {total / max(seen, 1):.4f}")
    ae.eval()

    check = hold if n_hold else train
    with torch.no_grad():
        recon = {str(p): F.mse_loss(ae.reconstruct(check, p), check).item() for p in ae.prefix_widths}
    return ae, {"recon_error": recon, "train_rows": len(train), "holdout_rows": n_hold}
