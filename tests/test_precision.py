"""loopfm.precision and the code paths that go through it, on the CPU (fast: no Ray started).

On a GPU the FM and VM training steps, extraction, evaluation and serving run under bf16 autocast
with TF32 matmuls (benchmarks/gpu_check.sh measures them there). Here, where CI runs, the same
functions must do exactly what they did before the policy existed: autocast off, float32 matmul
precision untouched, and the same numbers bit for bit as the step written out by hand.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from loopfm.actors.extractor import ChunkExtractor
from loopfm.config import FMConfig, LoopFMConfig, TrainConfig
from loopfm.fm.chunks import TOKENS
from loopfm.fm.extract import actor_gpus
from loopfm.fm.train import TRAIN, fm_step
from loopfm.models.fm import CausalFM, fm_loss
from loopfm.models.losses import vm_loss
from loopfm.precision import autocast, float32, gpu_precision, model_device, uses_autocast
from loopfm.training.vm import predict, vm_step

FM = FMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, window=4, chunk_len=16)
VOCAB = {"item_id": 50, "category": 7}


@pytest.fixture
def matmul_precision():
    """Puts back the process-wide float32 matmul precision a test may change."""
    before = torch.get_float32_matmul_precision()
    yield before
    torch.set_float32_matmul_precision(before)


def test_autocast_is_a_no_op_off_cuda_and_bf16_on_it(matmul_precision):
    assert not uses_autocast("cpu") and uses_autocast("cuda") and uses_autocast(torch.device("cuda", 0))
    ctx = autocast(torch.device("cpu"))
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
    assert gpu_precision("cpu") == torch.device("cpu")
    assert torch.get_float32_matmul_precision() == matmul_precision  # TF32 only where CUDA runs
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        cuda = autocast("cuda")  # built only: without a GPU torch disables it with a warning
    assert isinstance(cuda, torch.autocast) and cuda.fast_dtype == torch.bfloat16


def test_float32_turns_floating_outputs_only():
    out = float32({"logit": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(3), "note": "x"})
    assert out["logit"].dtype == torch.float32 and out["ids"].dtype == torch.int64 and out["note"] == "x"
    same = torch.ones(2)
    assert float32(same) is same  # float32 already: no copy on the CPU path
    assert model_device(torch.nn.Linear(2, 1)) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


def _chunk_batch(seed: int, batch: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = FM.chunk_len
    return {"item": torch.randint(2, VOCAB["item_id"], (batch, T), generator=g),
            "category": torch.randint(2, VOCAB["category"], (batch, T), generator=g),
            "surface": torch.randint(0, 3, (batch, T), generator=g),
            "prev_label": torch.randint(0, 3, (batch, T), generator=g),
            "label": torch.randint(0, 2, (batch, T), generator=g).to(torch.int8),
            "split": torch.randint(0, 3, (batch, T), generator=g).to(torch.int8),
            "out": torch.rand(batch, T, generator=g) < 0.7}


def _fm_and_optimizer():
    torch.manual_seed(0)
    model = CausalFM(FM, VOCAB, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def test_fm_step_on_cpu_is_the_step_written_out_by_hand():
    """fm_loop's step through the precision policy == the fp32 step it replaced, bit for bit."""
    ours, by_hand = _fm_and_optimizer(), _fm_and_optimizer()
    for seed in range(3):
        batch = _chunk_batch(seed)
        torch.manual_seed(seed)  # the same dropout draws on both sides
        got = fm_step(*ours, batch, torch.device("cpu"))
        model, optimizer = by_hand
        torch.manual_seed(seed)
        loss = fm_loss(model({k: batch[k].long() for k in TOKENS})["logit"], batch["label"].float(),
                       batch["out"] & (batch["split"] == TRAIN))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        assert got == loss.item()
    for (name, a), b in zip(ours[0].state_dict().items(), by_hand[0].state_dict().values()):
        assert torch.equal(a, b), name


class TinyVM(torch.nn.Module):
    """A VM's interface (a dict batch in, `logit` and `aux_logit` out) on the dense features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.head, self.aux = torch.nn.Linear(5, 1), torch.nn.Linear(5, 1)

    def forward(self, batch):
        return {"logit": self.head(batch["dense"]).squeeze(-1), "aux_logit": self.aux(batch["dense"]).squeeze(-1)}


def _vm_batch(seed: int, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kd = torch.randn(n, generator=g)
    kd[::7] = float("nan")  # rows without an FM logit
    return {"dense": torch.randn(n, 5, generator=g), "label": torch.randint(0, 2, (n,), generator=g).float(),
            "kd_logit": kd, "uid": torch.arange(n)}


def test_vm_step_and_predict_on_cpu_are_the_code_written_out_by_hand():
    cfg = TrainConfig(use_kd=True, kd_lambda=0.5, kd_temperature=2.0)
    ours, by_hand = TinyVM(), TinyVM()
    opt_ours, opt_hand = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ours, by_hand))
    for seed in range(3):
        batch = _vm_batch(seed)
        got = vm_step(ours, opt_ours, batch, cfg, torch.device("cpu"))
        loss, _ = vm_loss(by_hand(batch), batch, cfg.use_kd, cfg.kd_lambda, cfg.kd_temperature)
        opt_hand.zero_grad(set_to_none=True)
        loss.backward()
        opt_hand.step()
        assert got == loss.item()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), by_hand.parameters()))
    batches = [_vm_batch(10 + i) for i in range(2)]
    arrays = predict(ours, batches)
    with torch.no_grad():
        expected = np.concatenate([by_hand(b)["logit"].numpy() for b in batches])
    np.testing.assert_array_equal(arrays["logit"], expected)


def test_extractor_runs_where_the_stage_says(matmul_precision):
    """`gpu=False` (ray.use_gpu never, or a CPU cluster) keeps the actor on the CPU even where it
    could see a GPU; on a CPU-only machine no setting moves it, and nothing changes precision."""
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(CausalFM(FM, VOCAB, 3).state_dict(), buf)
    manifest = {"fm": FM.model_dump(mode="json"), "vocab_sizes": VOCAB, "num_surfaces": 3}
    for gpu in (False, None, True):
        extractor = ChunkExtractor(buf.getvalue(), manifest, [1], mode="raw", gpu=gpu)
        expected = "cuda" if torch.cuda.is_available() and gpu is not False else "cpu"
        assert extractor.device.type == expected
    batch = {k: v.numpy() for k, v in _chunk_batch(0).items()}
    raw = ChunkExtractor(buf.getvalue(), manifest, [1], mode="raw", gpu=False)(batch)["e"]
    assert raw.dtype == np.float32 and raw.shape[1] == FM.d_model
    assert torch.get_float32_matmul_precision() == matmul_precision


def test_extractor_pool_shares_the_gpus_it_has():
    assert actor_gpus(2, gpu=False) == 0
    assert actor_gpus(2, gpu=True) == 1.0  # no Ray here: one each, as before


def test_train_device_honours_use_gpu_in_local_mode(monkeypatch, matmul_precision):
    """Train's local mode (num_workers 0) assigns no GPU and says CPU; a stage that asked for one
    gets the process's CUDA device, with TF32 on. Never the other way round."""
    import ray.train.torch

    from loopfm.training.loop import train_device

    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    assert train_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert train_device(False) == torch.device("cpu")
    assert torch.get_float32_matmul_precision() == matmul_precision
    assert train_device(True) == torch.device("cuda", 0)
    assert torch.get_float32_matmul_precision() == "high"


def test_serving_asks_for_a_gpu_share_only_when_use_gpu_says_so():
    from loopfm.serve_apps.app import vm_gpus

    cfg = LoopFMConfig()
    assert vm_gpus(cfg.updated({"ray.use_gpu": "never"})) == 0
    assert vm_gpus(cfg.updated({"ray.use_gpu": "always", "serve.replicas": 2})) == 0.5
    scaled = cfg.updated({"ray.use_gpu": "always", "serve.autoscaling": {"min_replicas": 1, "max_replicas": 4}})
    assert vm_gpus(scaled) == 0.25
