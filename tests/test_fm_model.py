"""The FM's extraction contract: causal, windowed, chunkable, and no event sees its own label."""

from __future__ import annotations

import pytest
import torch

from loopfm.config import FMConfig
from loopfm.models.fm import CausalFM, FMExtractor, fm_loss

VOCAB = {"item_id": 60, "category": 8}
LAYERS = [0, 1, 2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_fm(**kw) -> CausalFM:
    cfg = FMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, window=5, chunk_len=16, dropout=0.0, **kw)
    torch.manual_seed(0)
    fm = CausalFM(cfg, VOCAB, num_surfaces=3).eval()
    with torch.no_grad():  # non-trivial relative biases, so a wrong offset would show
        for block in fm.blocks:
            block.attn.rel_bias.normal_(0, 1.0)
    return fm


def users(B: int = 3, T: int = 40, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (B, T), generator=g)
    prev = torch.zeros(B, T, dtype=torch.long)
    prev[:, 1:] = label[:, :-1] + 1
    return {
        "item": torch.randint(2, 60, (B, T), generator=g),
        "category": torch.randint(2, 8, (B, T), generator=g),
        "surface": torch.randint(0, 3, (B, T), generator=g),
        "prev_label": prev,
        "label": label.float(),
    }


def sl(batch, a, b):
    return {k: v[:, a:b] for k, v in batch.items()}


def test_interface_and_layer_validation():
    fm = make_fm()
    assert isinstance(fm, FMExtractor)
    assert fm.context == 2 * (5 - 1)
    assert fm.layer_width([0, 2]) == 32
    logit, emb = fm.extract(users(), [2, 0])
    assert logit.shape == (3, 40) and emb.shape == (3, 40, 32)
    _, e0 = fm.extract(users(), [0])
    assert torch.equal(emb[..., 16:], e0)  # concatenated in the listed order
    with pytest.raises(ValueError, match=r"0\.\.2"):
        fm.extract(users(), [3])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        fm.layer_width([-1])


@torch.no_grad()
def test_single_pass_equals_every_prefix():
    fm, b = make_fm(), users()
    logit, emb = fm.extract(b, LAYERS)
    assert torch.allclose(fm(b)["logit"], logit)
    for t in range(b["item"].shape[1]):
        pl, pe = fm.extract(sl(b, 0, t + 1), LAYERS)
        assert torch.allclose(pl[:, t], logit[:, t], atol=1e-5)
        assert torch.allclose(pe[:, t], emb[:, t], atol=1e-5)


@torch.no_grad()
def test_chunks_overlapping_by_context_reproduce_single_pass():
    fm, b = make_fm(), users(T=40)
    c = fm.context
    logit, emb = fm.extract(b, LAYERS)
    for start in (c, 17, 30):
        cl, ce = fm.extract(sl(b, start - c, 40), LAYERS)
        assert torch.allclose(cl[:, c:], logit[:, start:], atol=1e-5)
        assert torch.allclose(ce[:, c:], emb[:, start:], atol=1e-5)
    # One predecessor less and the first kept position differs: the overlap is tight, not slack.
    cl, _ = fm.extract(sl(b, 20 - c + 1, 40), LAYERS)
    assert not torch.allclose(cl[:, c - 1], logit[:, 20], atol=1e-4)


@torch.no_grad()
def test_own_label_never_leaks():
    fm, b = make_fm(), users()
    logit, emb = fm.extract(b, LAYERS)
    for t in (0, 9, 25, 38):
        flipped = {k: v.clone() for k, v in b.items()}
        flipped["prev_label"][:, t + 1] = 3 - flipped["prev_label"][:, t + 1]  # 1 <-> 2: event t's label
        fl, fe = fm.extract(flipped, LAYERS)
        assert torch.equal(fl[:, : t + 1], logit[:, : t + 1])
        assert torch.equal(fe[:, : t + 1], emb[:, : t + 1])
        assert (fl[:, t + 1] - logit[:, t + 1]).abs().min() > 1e-6


@torch.no_grad()
def test_right_padding_leaves_real_positions_alone():
    fm, b = make_fm(), users(T=30)
    logit, emb = fm.extract(b, LAYERS)
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :7])], dim=1) for k, v in b.items()}
    pl, pe = fm.extract(padded, LAYERS)
    assert pl.shape == (3, 37)
    assert torch.allclose(pl[:, :30], logit, atol=1e-6) and torch.allclose(pe[:, :30], emb, atol=1e-6)


def test_fm_loss_ignores_padding():
    logit = torch.tensor([[0.0, 50.0], [0.0, float("nan")]])
    label = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    valid = torch.tensor([[True, False], [True, False]])
    assert torch.allclose(fm_loss(logit, label, valid), torch.log(torch.tensor(2.0)))
    assert fm_loss(logit, label, torch.zeros_like(valid)).item() == 0.0


def test_tiny_fm_learns_item_parity():
    torch.manual_seed(0)
    fm = CausalFM(FMConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, window=4, chunk_len=16, dropout=0.0),
                  VOCAB, num_surfaces=3)
    opt = torch.optim.Adam(fm.parameters(), lr=1e-2)

    def batch(seed):
        b = users(B=16, T=20, seed=seed)
        b["label"] = (b["item"] % 2 == 0).float()
        b["prev_label"][:, 1:] = b["label"][:, :-1].long() + 1
        return b

    def loss_on(b):
        return fm_loss(fm(b)["logit"], b["label"], b["item"] != 0)

    held = batch(999)
    with torch.no_grad():
        before = loss_on(held).item()
    for step in range(50):
        loss = loss_on(batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_on(held).item()
    assert before > 0.6 and after < 0.35, (before, after)


def test_inference_attention_takes_the_fused_cpu_kernel():
    """The window mask is 4-D so SDPA on CPU runs its fused kernel: a 3-D mask silently falls back
    to the math path (B x H x T x T scores in memory), which made extraction 2x slower end to end."""
    fm = make_fm()
    batch = {k: v for k, v in users(B=2, T=16).items() if k != "label"}
    with torch.no_grad(), torch.profiler.profile() as prof:
        fm.extract(batch, [1])
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(o for o in ops if "attention" in o)
    assert "aten::_scaled_dot_product_attention_math" not in ops
