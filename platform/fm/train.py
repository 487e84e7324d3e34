"""`loopfm fm train`: the foundation model, trained with Ray Train on every surface's history.

Data: each user's chunks over all three splits (`chunks.py`). The loss takes train-split
positions only; valid positions pick the best epoch (early stopping on valid AUC) and test
positions give the FM's test metrics. Causality makes this safe: a train position's output
depends only on earlier events, which are all train events too.

Output (`fm/<fingerprint>/`): `model.pt` (best epoch's weights) and `manifest.json`
(`FMManifest`). The FM version is the hash of `model.pt`.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import ray.train
import ray.train.torch
import torch

from loopfm.config import FMConfig, LoopFMConfig, stable_hash
from loopfm.datasets.splits import SplitInfo
from loopfm.evaluation.metrics import evaluate
from loopfm.fm.checkpoint import FMManifest, save_fm
from loopfm.fm.chunks import TOKENS, build_chunks, keep_chunks
from loopfm.models.fm import CausalFM, fm_loss
from loopfm.ordering import ordered_data
from loopfm.precision import autocast
from loopfm.rundir import RunDir
from loopfm.runtime import init_ray, log, use_gpu
from loopfm.skeleton import current, publish
from loopfm.training.loop import (
    LoopTimer,
    cpu_state,
    final_state,
    gather,
    report_epoch,
    resume,
    run_trainer,
    say,
    seed_everything,
    shuffle_seed,
    train_device,
)
from loopfm.weights import state_bytes

TRAIN, VALID, TEST = 0, 1, 2


Cutoffs = Optional[tuple[int, int]]


def fm_fingerprint(cfg: LoopFMConfig, info: SplitInfo, cutoffs: Cutoffs = None) -> str:
    """The FM of this config on these splits; `cutoffs` (train-until, valid-until) other than the
    splits' own boundaries give an FM that saw only older events."""
    return stable_hash(info.fingerprint, cfg.fm) if cutoffs is None else stable_hash(info.fingerprint, cfg.fm, cutoffs)


def split_cutoffs(info: SplitInfo, cutoffs: Cutoffs = None) -> tuple[int, int]:
    return cutoffs if cutoffs is not None else (info.valid_start_ts, info.test_start_ts)


def fm_train_stage(cfg: LoopFMConfig, run: RunDir, cutoffs: Cutoffs = None) -> FMManifest:
    """`loopfm fm train` (with `cutoffs`: the FM of the freshness study trained only on events before them)."""
    info = SplitInfo.load(run)
    fingerprint = fm_fingerprint(cfg, info, cutoffs)
    out = run.fm(fingerprint)
    done = current("fm train", out, fingerprint, FMManifest.read)
    if done is not None:
        return done
    init_ray(cfg.ray)
    gpu = use_gpu(cfg.ray)
    with ordered_data():  # the same chunks in the same order every run: the same FM bytes
        chunks = build_chunks(run, cfg, split_cutoffs(info, cutoffs)).materialize()
        datasets = {
            "train": chunks.map_batches(keep_chunks, batch_format="numpy", fn_args=((TRAIN,),)),
            "eval": chunks.map_batches(keep_chunks, batch_format="numpy", fn_args=((VALID, TEST),)),
        }
        vocab_sizes = {k: info.vocab_sizes[k] for k in ("item_id", "category")}
        log.info("fm train: %d chunks of %d events, %d workers%s, fm %s", chunks.count(), cfg.fm.chunk_len,
                 cfg.fm.num_workers, " on GPU" if gpu else "", cfg.fm.model_dump())
        started = time.time()
        result = run_trainer(
            fm_loop,
            {"fm": cfg.fm.model_dump(mode="json"), "vocab_sizes": vocab_sizes, "num_surfaces": info.num_surfaces,
             "use_gpu": gpu},
            datasets, name=f"fm-{fingerprint}", storage=str(run.ray_storage),
            num_workers=cfg.fm.num_workers, use_gpu=gpu,
        )
    state = final_state(result)
    manifest = publish(out, lambda tmp: save_fm(tmp, state_bytes(state["best"]), FMManifest(
        fingerprint=fingerprint, fm_version="", fm=cfg.fm.model_dump(mode="json"), vocab_sizes=vocab_sizes,
        num_surfaces=info.num_surfaces, splits_fingerprint=info.fingerprint,
        metrics=state["stopper"]["best_metrics"], history=state["history"],
        seconds=round(time.time() - started, 1),
    )))
    test = manifest.metrics.get("test", {})
    log.info("fm train: FM %s (best epoch %d) test auc %.4f ne %.4f -> %s", manifest.fm_version,
             state["stopper"]["best_epoch"] + 1, test.get("auc", float("nan")), test.get("ne", float("nan")), out)
    return manifest


def fm_loop(config: dict) -> None:
    """The per-worker training loop (Ray Train)."""
    timer = LoopTimer(config.get("timing_log"))  # benchmarks only (gpu_check): where the fit's time goes
    cfg = FMConfig.model_validate(config["fm"])
    seed_everything(cfg.seed)
    model = CausalFM(cfg, config["vocab_sizes"], config["num_surfaces"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = resume(model, optimizer, cfg.patience)
    device = train_device(config.get("use_gpu", False))
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    rank = ray.train.get_context().get_world_rank()
    train, evaluation = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("eval")
    timer.setup_done()
    for epoch in range(state.epoch, cfg.epochs):
        if state.stopper.should_stop:
            break
        model.train()
        losses = []
        epoch_seed = shuffle_seed(cfg.seed, epoch, rank)
        torch.manual_seed(epoch_seed)  # dropout too: a run resumed at this epoch draws what an unbroken one would
        batches = train.iter_torch_batches(batch_size=cfg.batch_size, device=device, local_shuffle_buffer_size=256,
                                           local_shuffle_seed=epoch_seed)
        for batch in timer.batches(batches):
            losses.append(fm_step(model, optimizer, batch, device))
        metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan"),
                   **evaluate_fm(model, evaluation, cfg.batch_size, device)}
        timer.evaluated()
        if state.stopper.update(epoch, metrics["valid"]["auc"], metrics):
            state.best_state = cpu_state(model)
        if rank == 0:
            v, t = metrics["valid"], metrics["test"]
            say(f"fm epoch {epoch + 1}/{cfg.epochs}: train loss {metrics['train_loss']:.4f} | valid auc "
                  f"{v['auc']:.4f} logloss {v['logloss']:.4f} ne {v['ne']:.4f} | test auc {t['auc']:.4f}")
        report_epoch(epoch, metrics, model, optimizer, state)
        timer.epoch_done(epoch)


def fm_step(model, optimizer, batch: dict, device) -> float:
    """One optimizer step on a batch of chunks; returns the loss. The forward runs under
    `loopfm.precision.autocast` (bf16 on CUDA, nothing on CPU), the loss in float32."""
    with autocast(device):
        logit = model(_tokens(batch))["logit"]
    loss = fm_loss(logit.float(), batch["label"].float(), batch["out"] & (batch["split"] == TRAIN))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _tokens(batch: dict) -> dict:
    return {name: batch[name].long() for name in TOKENS}


@torch.no_grad()
def evaluate_fm(model, shard, batch_size: int, device) -> dict:
    """Valid and test metrics over every worker's eval shard."""
    model.eval()
    parts = {"split": [], "label": [], "logit": [], "user": []}
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        with autocast(device):
            logit = model(_tokens(batch))["logit"]
        out = batch["out"] & (batch["split"] >= VALID)
        users = batch["user_id"][:, None].expand_as(out)
        for name, value in (("split", batch["split"]), ("label", batch["label"]), ("logit", logit), ("user", users)):
            parts[name].append(value[out].float().cpu().numpy() if name == "logit" else value[out].cpu().numpy())
    arrays = gather({k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()})
    result = {}
    for name, which in (("valid", VALID), ("test", TEST)):
        sel = arrays["split"] == which
        result[name] = evaluate(arrays["label"][sel], arrays["logit"][sel], arrays["user"][sel])
    return result
