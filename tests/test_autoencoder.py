"""The Matryoshka compressor: bounded z, ordered prefixes, and a loss that cannot move the FM."""

from __future__ import annotations

import pytest
import torch

from loopfm.config import CompressConfig
from loopfm.models.autoencoder import MatryoshkaAE, train_autoencoder

CFG = CompressConfig(width=16, prefix_widths=[4, 8], hidden=64, epochs=30, batch_size=128, lr=3e-3, dtype="fp16")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def low_rank(n: int = 3000, raw: int = 24, rank: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.5, rank)  # unequal factors, so the best k-prefix is well defined
    factors = torch.randn(n, rank, generator=g) * scales
    mix = torch.randn(rank, raw, generator=g) / rank**0.5
    return factors @ mix + 5.0 + 0.05 * torch.randn(n, raw, generator=g)


def test_z_is_bounded_and_prefix_zeroes_the_tail():
    ae = MatryoshkaAE(24, CFG)
    e = 100 * torch.randn(64, 24)
    z = ae.encode(e)
    assert z.shape == (64, 16) and z.abs().max() <= 1.0
    assert ae.prefix_widths == [4, 8, 16]
    # the prefix reconstruction equals decoding z with its tail zeroed by hand
    z4 = z.clone()
    z4[:, 4:] = 0
    assert torch.allclose(ae.reconstruct(e, 4), ae.decode(z4))
    assert not torch.allclose(ae.reconstruct(e, 4), ae.reconstruct(e))


def test_loss_is_stop_gradient_on_the_input():
    ae = MatryoshkaAE(24, CFG)
    e = torch.randn(32, 24, requires_grad=True)
    ae.loss(e).backward()
    assert e.grad is None
    assert ae.enc[0].weight.grad is not None and ae.enc[0].weight.grad.abs().sum() > 0


def test_training_orders_prefixes_and_compresses():
    data = low_rank()
    lines: list[str] = []
    ae, info = train_autoencoder(data, CFG, seed=0, log=lines.append)
    err = info["recon_error"]
    assert set(err) == {"4", "8", "16"}
    assert err["4"] > err["8"] > err["16"], err
    variance = data.var(0).mean().item()
    assert err["16"] < 0.1 * variance and err["4"] < variance, (err, variance)
    assert not ae.training and len(lines) == CFG.epochs and lines[-1].startswith(
        f"compress epoch {CFG.epochs}/{CFG.epochs} loss ")
    assert torch.allclose(ae.mean, data.mean(0), atol=0.3)  # normalizer fitted, in raw units


def test_training_is_seeded():
    data, cfg = low_rank(n=400), CFG.model_copy(update={"epochs": 2})
    runs = [train_autoencoder(data, cfg, seed=s)[1]["recon_error"] for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]
