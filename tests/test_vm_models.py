"""The VM zoo against the VM batch contract: shapes, masking, seq isolation, and that seq is learnable."""

from __future__ import annotations

import itertools

import pytest
import torch

from loopfm.config import VMConfig
from loopfm.models.inputs import InputSpec
from loopfm.models.layers import TargetAttention
from loopfm.models.sequence import SequenceEncoder
from loopfm.models.vm import VM_ZOO, build_vm

VOCAB = {"user_id": 30, "item_id": 40, "category": 6}
CONTEXT = [5, 7]
W, L, L_RAW, DENSE, SURFACES = 6, 5, 4, 5, 3
MODELS = list(VM_ZOO)
POOLINGS = ["mean", "sum", "attention"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(B: int = 8, seed: int = 0, width: int = W) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # oldest first, front-padded
    seq_mask = torch.arange(L).expand(B, L) >= torch.randint(0, L + 1, (B, 1), generator=g)
    hist = torch.randint(2, 40, (B, L_RAW), generator=g)
    hist[: B // 2, :2] = 0
    hist[0] = 0  # one user with no raw history, one (below) with no seq at all
    seq_mask[1] = False
    raw_labels = torch.where(seq_mask, torch.randint(1, 3, (B, L), generator=g), 0)
    return {
        "user": torch.randint(1, 30, (B,), generator=g),
        "item": torch.randint(1, 40, (B,), generator=g),
        "category": torch.randint(1, 6, (B,), generator=g),
        "context": torch.stack([torch.randint(1, n, (B,), generator=g) for n in CONTEXT], dim=1),
        "hist_items": hist,
        "hist_cats": torch.where(hist > 0, torch.randint(1, 6, (B, L_RAW), generator=g), 0),
        "hist_labels": torch.where(hist > 0, torch.randint(1, 3, (B, L_RAW), generator=g), 0),
        "dense": torch.rand(B, DENSE, generator=g),
        "raw_items": torch.where(seq_mask, torch.randint(1, 40, (B, L), generator=g), 0),
        "raw_cats": torch.where(seq_mask, torch.randint(1, 6, (B, L), generator=g), 0),
        "raw_surfaces": torch.where(seq_mask, torch.randint(1, SURFACES + 1, (B, L), generator=g), 0),
        "raw_labels": raw_labels,
        "raw_mask": seq_mask,
        "seq": torch.randn(B, L, width, generator=g),
        "seq_mask": seq_mask,
        "kd_logit": torch.randn(B, generator=g),
        "label": torch.randint(0, 2, (B,), generator=g).float(),
    }


def make_vm(model, pooling="attention", seq_width=W, aux=False, rawseq=False, **kw):
    torch.manual_seed(0)
    cfg = VMConfig(model=model, embed_dim=8, hidden=[16, 8], pooling=pooling, **kw)
    spec = InputSpec(VOCAB, tuple(CONTEXT), seq_width, rawseq, n_dense=DENSE, num_surfaces=SURFACES, pooling=pooling)
    return build_vm(cfg, spec, aux_head=aux)


CASES = [(m, p, True, a) for m, p, a in itertools.product(MODELS, POOLINGS, [False, True])]
CASES += [(m, "attention", False, a) for m, a in itertools.product(MODELS, [False, True])]


@pytest.mark.parametrize("model", MODELS)
def test_rawseq_reads_its_raw_slots_and_nothing_of_the_stored_sequence(model):
    vm = make_vm(model, seq_width=None, rawseq=True)
    b = make_batch()
    vm(b)["logit"].sum().backward()
    assert vm.inputs.surface.weight.grad.abs().sum() > 0 and vm.inputs.seq.proj.in_features == 8
    vm.eval()
    with torch.no_grad():
        ref = vm(b)["logit"]
        assert torch.equal(vm(dict(b, seq=torch.randn_like(b["seq"])))["logit"], ref)  # no FM embedding read
        padded = dict(b, raw_items=torch.where(b["raw_mask"], b["raw_items"],
                                               torch.randint(1, 40, b["raw_items"].shape)))
        assert torch.equal(vm(padded)["logit"], ref)  # padded slots are never read
        flipped = dict(b, raw_labels=torch.where(b["raw_mask"], 3 - b["raw_labels"], 0))
        assert not torch.allclose(vm(flipped)["logit"][2:], ref[2:])


@pytest.mark.parametrize("model", MODELS)
def test_history_and_counters_are_read(model):
    vm = make_vm(model, seq_width=None)
    vm.eval()
    b = make_batch()
    with torch.no_grad():
        ref = vm(b)["logit"]
        assert not torch.allclose(vm(dict(b, dense=b["dense"] + 1.0))["logit"], ref)
        flipped = dict(b, hist_labels=torch.where(b["hist_labels"] > 0, 3 - b["hist_labels"], 0))
        assert not torch.allclose(vm(flipped)["logit"][1:], ref[1:])


@pytest.mark.parametrize("model,pooling,use_seq,aux", CASES)
def test_shapes_grads_and_masking(model, pooling, use_seq, aux):
    vm = make_vm(model, pooling, W if use_seq else None, aux)
    b = make_batch()
    out = vm(b)
    assert set(out) == ({"logit", "aux_logit"} if aux else {"logit"})
    for v in out.values():
        assert v.shape == (8,) and torch.isfinite(v).all()
    sum(v.sum() for v in out.values()).backward()
    assert vm.inputs.emb.item.weight.grad.abs().sum() > 0
    if use_seq:
        assert vm.inputs.seq.proj.weight.grad.abs().sum() > 0
    else:
        assert vm.inputs.seq is None

    vm.eval()
    with torch.no_grad():
        ref = vm(b)
        noisy = dict(b, seq=torch.where(b["seq_mask"].unsqueeze(-1), b["seq"], 1e3 * torch.randn_like(b["seq"])))
        assert torch.equal(vm(noisy)["logit"], ref["logit"])  # padded seq slots are never read
        if use_seq:
            changed = dict(b, seq=b["seq"] + 1.0)
            assert not torch.allclose(vm(changed)["logit"][2:], ref["logit"][2:])
        else:
            no_seq = {k: v for k, v in b.items() if k not in ("seq", "seq_mask")}
            assert torch.equal(vm(no_seq)["logit"], ref["logit"])
            assert torch.equal(vm(dict(b, seq=torch.randn_like(b["seq"])))["logit"], ref["logit"])


def test_build_vm_rejects_unknown_model_and_honours_width():
    vm = make_vm("dnn", seq_width=3, loopfm_width=3)
    assert vm.inputs.seq.proj.in_features == 3
    assert vm(make_batch(width=3))["logit"].shape == (8,)
    with pytest.raises(ValueError, match="dcnv2, deepfm, din, dnn"):
        build_vm(VMConfig.model_construct(**dict(VMConfig().model_dump(), model="xgb")), InputSpec(VOCAB))


def test_the_zoo_and_the_configs_names_are_the_modules_of_models_vm():
    import pathlib

    import loopfm.models.vm as zoo
    from loopfm.config import ConfigError, load_config
    from loopfm.config.vm import vm_names
    from loopfm.models.vm.base import VMBase

    files = {p.stem for p in pathlib.Path(zoo.__file__).parent.glob("*.py")} - {"__init__", "base"}
    assert set(vm_names()) == set(VM_ZOO) == files
    assert all(issubclass(cls, VMBase) and cls is not VMBase for cls in VM_ZOO.values())
    with pytest.raises(ConfigError, match=r"vm\.model.*unknown VM 'xgb': one of dcnv2, deepfm, din, dnn"):
        load_config(overrides=["vm.model=xgb"])
    assert make_vm("dcnv2", dcnv2={"cross_layers": 3}).cross.layers.__len__() == 3


def test_target_attention_all_masked_rows_are_zero_and_finite():
    att = TargetAttention(4)
    q, k = torch.randn(3, 4, requires_grad=True), torch.randn(3, 5, 4)
    mask = torch.tensor([[False] * 5, [True, False, True, False, False], [True] * 5])
    out = att(q, k, mask)
    assert torch.equal(out[0], torch.zeros(4)) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    # the one-key row returns a convex mix of its real keys only
    single = att(q[1:2], k[1:2], torch.tensor([[False, False, True, False, False]]))
    assert torch.allclose(single[0], k[1, 2], atol=1e-6)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_sequence_encoder_pools_real_slots(pooling):
    enc = SequenceEncoder(W, 8, pooling)
    seq, mask = torch.randn(2, L, W), torch.tensor([[False, False, True, True, True], [False] * 5])
    out = enc(seq, mask, torch.randn(2, 8))
    assert out.shape == (2, enc.out_dim) and torch.equal(out[1], torch.zeros(8))
    if pooling != "attention":
        proj = enc.proj(seq[0, 2:])
        expected = proj.mean(0) if pooling == "mean" else proj.sum(0)
        assert torch.allclose(out[0], expected, atol=1e-6)


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    ranks = score.argsort().argsort().float() + 1
    pos = label.bool()
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return ((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def seq_task(B: int, seed: int) -> dict[str, torch.Tensor]:
    b = make_batch(B, seed)
    b["seq_mask"][:, -1] = True  # every user has at least one stored event
    m = b["seq_mask"].float()
    b["label"] = ((b["seq"][..., 0] * m).sum(1) / m.sum(1) > 0).float()
    return b


LEARN = [(m, "attention", True) for m in MODELS] + [("dnn", "mean", True), ("dnn", "sum", True), ("dnn", "mean", False)]


@pytest.mark.parametrize("model,pooling,use_seq", LEARN)
def test_loopfm_vm_learns_a_label_only_seq_explains(model, pooling, use_seq):
    vm = make_vm(model, pooling, W if use_seq else None)
    opt = torch.optim.Adam(vm.parameters(), lr=1e-2)
    for step in range(150):
        b = seq_task(128, seed=step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(vm(b)["logit"], b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vm.eval()
    test = seq_task(1000, seed=10_000)
    with torch.no_grad():
        score = auc(vm(test)["logit"], test["label"])
    if use_seq:
        assert score > 0.8, score
    else:  # the control: without the sequence the label is unpredictable
        assert score < 0.65, score
