"""`loopfm train`: one vertical model (one arm, one seed) with Ray Train over Ray Data shards.

The arm decides the two channels: `kd` adds the distillation term on the stored FM logit,
`loopfm` feeds the stored FM embeddings of the user's past as a sequence feature. Each worker
streams its shard of the feature splits (`get_dataset_shard`) through `VMBatchCollate`, which
decodes the packed sequences batch by batch. The valid metric of `train.select_by` picks the epoch
(early stopping); the test metrics of that epoch's weights, computed once at the end, are the VM's
result.

Output (`vm/<arm>/seed<k>-<fingerprint>/`): `model.pt` + `manifest.json` (`VMManifest`).
"""

from __future__ import annotations

import os
import time
from typing import Optional, Union

import numpy as np
import pyarrow.dataset as pads
import ray.train
import ray.train.collective
import ray.train.torch
import torch

from loopfm.config import ARM_CHANNELS, ARMS, LoopFMConfig, TrainConfig, stable_hash
from loopfm.datasets.splits import SplitInfo
from loopfm.evaluation.metrics import evaluate
from loopfm.features.collate import VMBatchCollate
from loopfm.features.reader import LABEL, RAW_COLUMNS, SEQ_Z, FeaturesManifest, read_features
from loopfm.features.stage import features_verticals_stage
from loopfm.models.losses import vm_loss
from loopfm.ordering import ordered_data
from loopfm.precision import autocast, float32, model_device
from loopfm.rundir import RunDir
from loopfm.runtime import init_ray, log, torch_device, use_gpu
from loopfm.skeleton import current, publish
from loopfm.training.batches import ShardBatches
from loopfm.training.checkpoint import VMManifest, build_from_manifest, save_vm
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


def arm_config(cfg: LoopFMConfig, arm: str, seed: int) -> LoopFMConfig:
    """The config of one arm and seed: the channels switched on or off, the seed set."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    use_kd, use_loopfm, use_rawseq = ARM_CHANNELS[arm]
    return cfg.updated({"train.use_kd": use_kd, "train.use_loopfm": use_loopfm, "train.use_rawseq": use_rawseq,
                        "train.seed": seed})


def arm_of(train: TrainConfig) -> str:
    return {v: k for k, v in ARM_CHANNELS.items()}[(train.use_kd, train.use_loopfm, train.use_rawseq)]


def seq_width(cfg: LoopFMConfig, features: FeaturesManifest):
    """Width of the sequence the VM reads: None without LoopFM, else the configured prefix."""
    if not cfg.train.use_loopfm:
        return None
    return cfg.vm.loopfm_width or features.width


# Bumped when the training loop changes what a given config trains, so a run directory never
# keeps the VMs of an older loop as current.
LOOP_VERSION = 2


def vm_fingerprint(cfg: LoopFMConfig, features: FeaturesManifest) -> str:
    """What a VM depends on: its features, its architecture, its training settings and the loop."""
    return stable_hash(features.fingerprint, cfg.vm, cfg.train, LOOP_VERSION)


def train_vm(cfg: LoopFMConfig, run: RunDir, features: FeaturesManifest, callbacks=None,
             stop_file=None, timing_log=None) -> VMManifest:
    """Train (or find current) the VM of `cfg.train`'s arm and seed on `features`.

    `callbacks`: Ray Train callbacks for the run (`loopfm tune` passes the one that reports to Tune).
    `stop_file`: when this file appears, the loop ends before its next epoch and the VM is not
    saved (it did not train its configured epochs); the manifest comes back with `stopped` in its
    metrics. `loopfm tune` stops trials so (ASHA), letting Train shut its workers down itself.
    `timing_log`: a file the workers append their wall-clock stamps to (`LoopTimer`; benchmarks).
    """
    arm, seed = arm_of(cfg.train), cfg.train.seed
    fingerprint = vm_fingerprint(cfg, features)
    out = run.vm(arm, seed, fingerprint)
    done = current("train", out, fingerprint, VMManifest.read)
    if done is not None:
        return done
    init_ray(cfg.ray)
    gpu = use_gpu(cfg.ray)
    info = SplitInfo.load(run)
    width = seq_width(cfg, features)
    columns = feature_columns(run, features, loopfm=width is not None, rawseq=cfg.train.use_rawseq)
    with ordered_data():  # the same examples in the same order every run: the same VM for the same seed
        datasets = {split: read_features(run, features, split, columns) for split in ("train", "valid")}
        test = read_features(run, features, "test", columns)
        keep = keep_shards(cfg.train.data_cache, run, features)
        for split in ("train", "valid") if keep else ("valid",):  # read once, not once per epoch
            datasets[split] = datasets[split].materialize()
        manifest = VMManifest(
            fingerprint=fingerprint, model_version="", arm=arm, seed=seed, features_fingerprint=features.fingerprint,
            store_version=features.store_version if width else None, vm=cfg.vm.model_dump(mode="json"),
            train=cfg.train.model_dump(mode="json"),
            vocab_sizes={k: info.vocab_sizes[k] for k in ("user_id", "item_id", "category")},
            context_columns=list(features.context_columns),
            context_sizes=[info.vocab_sizes[c] for c in info.categorical],
            seq_len=features.seq_len, seq_width=width, raw_seq_len=features.raw_seq_len,
            rawseq=cfg.train.use_rawseq, num_surfaces=info.num_surfaces, vertical=features.vertical,
            dense_names=list(features.dense_names) if "counters" in cfg.vm.features else [],
        )
        started = time.time()
        result = run_trainer(
            vm_loop, {"manifest": manifest.__dict__, "features": features.to_dict(),
                      **({"stop_file": str(stop_file)} if stop_file else {}),
                      **({"timing_log": str(timing_log)} if timing_log else {}),
                      "keep_shards": keep, "use_gpu": gpu}, datasets,
            name=f"vm-{arm}-seed{seed}-{fingerprint}", storage=str(run.ray_storage),
            num_workers=cfg.train.num_workers, use_gpu=gpu, callbacks=callbacks,
        )
        state = final_state(result)
        test_metrics = evaluate_state(state["best"], manifest, features, test, torch_device(gpu))
    manifest.metrics = {**state["stopper"]["best_metrics"], "test": test_metrics,
                        "best_epoch": state["stopper"]["best_epoch"] + 1,
                        "history": state["history"], "seconds": round(time.time() - started, 1)}
    ran_out = len(state["history"]) >= cfg.train.epochs or state["stopper"]["bad_epochs"] >= cfg.train.patience
    if stop_file and os.path.exists(stop_file) and not ran_out:
        manifest.metrics["stopped"] = True
        log.info("train: %s seed %d stopped after %d epochs (%s); not saved", arm, seed,
                 len(state["history"]), stop_file)
        return manifest
    publish(out, lambda tmp: save_vm(tmp, state_bytes(state["best"]), manifest))
    test = manifest.metrics["test"]
    log.info("train: %s seed %d: test auc %.4f gauc %.4f ne %.4f (best epoch %d, %.0fs) -> %s", arm, seed,
             test["auc"], test["gauc"], test["ne"], manifest.metrics["best_epoch"], manifest.metrics["seconds"], out)
    return manifest


def evaluate_state(state: dict, manifest: VMManifest, features: FeaturesManifest, test,
                   device: torch.device = torch.device("cpu")) -> dict:
    """Test metrics of the kept epoch's weights, in the driver, once: the test split never takes
    part in choosing anything, and is not scored every epoch for nothing."""
    model = build_from_manifest(manifest)
    model.load_state_dict(state)
    model.to(device)
    collate = VMBatchCollate(features, manifest.seq_width, str(device), with_seq=manifest.seq_width is not None,
                             with_raw=manifest.rawseq)
    return evaluate_vm(model, test.iter_torch_batches(batch_size=4096, collate_fn=collate, device=str(device)))


def keep_shards(mode: str, run: RunDir, features: FeaturesManifest) -> bool:
    """Whether Train workers keep their shards in memory after the first epoch (`train.data_cache`).

    "auto" says yes when the feature splits' parquet, at an assumed 3x in memory, fills under a
    quarter of this machine's available memory: for splits that small, streaming them again every
    epoch costs more than holding them.
    """
    if mode != "auto":
        return mode == "memory"
    # Ray's vendored copy (ray/thirdparty_files, on the path once ray is imported): not a dependency of ours
    import psutil

    files = run.features(features.fingerprint).rglob("*.parquet")
    return 3 * sum(f.stat().st_size for f in files) < psutil.virtual_memory().available / 4


def feature_columns(run: RunDir, features: FeaturesManifest, loopfm: bool, rawseq: bool) -> list[str]:
    """The feature columns an arm reads: the sequence slots of the other arms are never decoded."""
    names = pads.dataset(str(run.features(features.fingerprint) / "train"), format="parquet").schema.names
    skip = ({SEQ_Z} if not loopfm else set()) | (set(RAW_COLUMNS) if not rawseq else set())
    return [n for n in names if n not in skip]


def vm_loop(config: dict) -> None:
    """The per-worker training loop (Ray Train)."""
    timer = LoopTimer(config.get("timing_log"))
    manifest = VMManifest(**config["manifest"])
    features = FeaturesManifest(**config["features"])
    train_cfg = TrainConfig.model_validate(manifest.train)
    seed_everything(train_cfg.seed)
    model = build_from_manifest(manifest)
    optimizer = vm_optimizer(model, train_cfg)
    state = resume(model, optimizer, train_cfg.patience)
    device = train_device(config.get("use_gpu", False))
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    collate = VMBatchCollate(features, manifest.seq_width, str(device), with_seq=manifest.seq_width is not None,
                             with_raw=manifest.rawseq)
    keep, size = config.get("keep_shards", False), train_cfg.batch_size
    splits = {name: ShardBatches(ray.train.get_dataset_shard(name), collate, size, keep,
                                 shuffle_seed=train_cfg.seed if name == "train" else None)
              for name in ("train", "valid")}
    rank = ray.train.get_context().get_world_rank()
    tag = f"{manifest.arm} seed {manifest.seed}"
    stop_file = config.get("stop_file")
    timer.setup_done()
    for epoch in range(state.epoch, train_cfg.epochs):
        if state.stopper.should_stop:
            break
        if stop_file and ray.train.collective.broadcast_from_rank_zero(os.path.exists(stop_file)):
            break  # asked to stop (e.g. by Tune's ASHA): every worker leaves on the same epoch
        model.train()
        # dropout: a resumed epoch draws as the first run did
        torch.manual_seed(shuffle_seed(train_cfg.seed, epoch, rank))
        losses = []
        for batch in timer.batches(splits["train"].epoch(epoch)):
            losses.append(vm_step(model, optimizer, batch, train_cfg, device))
        metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "valid": evaluate_vm(model, splits["valid"].epoch())}
        timer.evaluated()
        if state.stopper.update(epoch, selection_value(metrics["valid"], train_cfg.select_by), metrics):
            state.best_state = cpu_state(model)
        if rank == 0:
            v = metrics["valid"]
            say(f"train {tag} epoch {epoch + 1}/{train_cfg.epochs}: loss {metrics['train_loss']:.4f} | valid auc "
                  f"{v['auc']:.4f} gauc {v['gauc']:.4f} ne {v['ne']:.4f}")
        report_epoch(epoch, metrics, model, optimizer, state)
        timer.epoch_done(epoch)


def vm_step(model, optimizer, batch: dict, train_cfg: TrainConfig, device) -> float:
    """One optimizer step on a VM batch; returns the loss. The forward runs under
    `loopfm.precision.autocast` (bf16 on CUDA, nothing on CPU), the loss in float32."""
    with autocast(device):
        out = model(batch)
    loss, _ = vm_loss(float32(out), batch, train_cfg.use_kd, train_cfg.kd_lambda, train_cfg.kd_temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def vm_optimizer(model: torch.nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with L2 on the id tables (`embedding_l2`) apart from the dense layers' (`weight_decay`).

    Coupled L2 under Adam pulls every row of a table toward zero at each step, so ids seen a few
    times shrink instead of memorizing their labels: the embedding regularizer of CTR libraries.
    """
    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    embeddings = [p for p in model.parameters() if id(p) in tables]
    dense = [p for p in model.parameters() if id(p) not in tables]
    return torch.optim.Adam([{"params": embeddings, "weight_decay": train_cfg.embedding_l2},
                             {"params": dense, "weight_decay": train_cfg.weight_decay}], lr=train_cfg.lr)


def selection_value(metrics: dict, select_by: str) -> float:
    """The valid metric that picks the kept epoch, signed so that higher is better."""
    return -metrics["logloss"] if select_by == "logloss" else metrics["auc"]


@torch.no_grad()
def predict(model, batches) -> dict[str, np.ndarray]:
    """Serving-head logits with labels and users, over an iterable of VM batches."""
    model.eval()
    device = model_device(model)
    parts: dict[str, list] = {"label": [], "logit": [], "user": []}
    for batch in batches:
        with autocast(device):
            logit = model(batch)["logit"]
        parts["logit"].append(logit.float().cpu().numpy())
        parts["label"].append(batch[LABEL].cpu().numpy())
        parts["user"].append(batch["uid"].cpu().numpy())  # the raw id: every new user is a user of their own
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def evaluate_vm(model, batches) -> dict:
    """AUC, GAUC, log loss and NE of `model` over `batches` (every worker's, gathered)."""
    arrays = gather(predict(model, batches))
    return evaluate(arrays["label"], arrays["logit"], arrays["user"])


def train_stage(cfg: LoopFMConfig, run: RunDir, arm: Optional[str] = None,
                seed: Optional[int] = None) -> Union[VMManifest, list[VMManifest]]:
    """`loopfm train [--arm A] [--seed N]`: one VM on this config's features (default arm: the one
    `train.use_kd/use_loopfm/use_rawseq` name; default seed: `train.seed`), or one per vertical,
    in its order, when `data.vertical` is a list: the result has the shape of `data.vertical`."""
    arm = arm or arm_of(cfg.train)
    seed = cfg.train.seed if seed is None else seed
    features = features_verticals_stage(cfg, run)
    vms = [train_vm(arm_config(vcfg, arm, seed), run, features[v]) for v, vcfg in cfg.per_vertical().items()]
    return vms[0] if isinstance(cfg.data.vertical, int) else vms

