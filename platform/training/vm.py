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

import io
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import numpy as np
import pyarrow.dataset as pads
import ray
import ray.train
import ray.train.collective
import ray.train.torch
import torch

from loopfm.actors.finished_vms import FinishedVMs
from loopfm.config import ARM_CHANNELS, ARMS, LoopFMConfig, TrainConfig, stable_hash
from loopfm.datasets.splits import SplitInfo
from loopfm.evaluation.metrics import evaluate
from loopfm.features.collate import VMBatchCollate
from loopfm.features.reader import LABEL, RAW_COLUMNS, SEQ_Z, FeaturesManifest, read_features
from loopfm.features.stage import features_verticals_stage
from loopfm.location import as_location
from loopfm.models.losses import vm_loss
from loopfm.ordering import ordered_data
from loopfm.precision import autocast, float32, model_device
from loopfm.rundir import RunDir, committed
from loopfm.runtime import init_ray, log, torch_device, use_gpu
from loopfm.skeleton import current, publish
from loopfm.training.batches import HeldShard, ShardBatches
from loopfm.training.checkpoint import VMManifest, build_from_manifest, save_vm
from loopfm.training.loop import (
    Background,
    LoopState,
    LoopTimer,
    cpu_state,
    drop_local_checkpoints,
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


# How often the driver looks for finished VMs of a running `train_vms` run.
PUBLISH_POLL_S = 2.0
TEST_BATCH = 4096  # rows per forward when the driver scores a VM on test
# Held by a VM's epochs and by the driver's test scoring. In Train's local mode both run in the
# driver process, and torch ops running at once in two threads change each other's thread counts,
# so kernels whose result depends on them would give other weights for the same seed.
TORCH_TURN = threading.Lock()

# Bumped when the training loop changes what a given config trains, so a run directory never
# keeps the VMs of an older loop as current.
LOOP_VERSION = 2


def vm_fingerprint(cfg: LoopFMConfig, features: FeaturesManifest) -> str:
    """What a VM depends on: its features, its architecture, its training settings and the loop."""
    return stable_hash(features.fingerprint, cfg.vm, cfg.train, LOOP_VERSION)


def train_vm(cfg: LoopFMConfig, run: RunDir, features: FeaturesManifest, callbacks=None,
             stop_file=None, timing_log=None) -> VMManifest:
    """Train (or find current) the VM of `cfg.train`'s arm and seed on `features`: `train_vms` of one.

    `callbacks`: Ray Train callbacks for the run (`loopfm tune` passes the one that reports to Tune).
    `stop_file`: when this file appears, the loop ends before its next epoch and the VM is not
    saved (it did not train its configured epochs); the manifest comes back with `stopped` in its
    metrics. `loopfm tune` stops trials so (ASHA), letting Train shut its workers down itself.
    `timing_log`: a file the workers append their wall-clock stamps to (`LoopTimer`; benchmarks).
    """
    return train_vms([cfg], run, features, callbacks=callbacks, stop_file=stop_file, timing_log=timing_log)[0]


def train_vms(cfgs: list[LoopFMConfig], run: RunDir, features: FeaturesManifest, callbacks=None,
              stop_file=None, timing_log=None) -> list[VMManifest]:
    """Train (or find current) one VM per config on `features`, all of them in one Ray Train run.

    A Train run pays its worker group's start-up and teardown once; a report's arms x seeds used to
    pay it once per VM, for a few seconds of compute each. Here the VMs train in turn in the same
    workers, on shards read once. Each VM seeds everything when it starts and permutes the kept rows
    by its own seed, so it trains exactly as it would alone: tests/test_pipeline.py compares the
    weights of a report's VM with the same VM trained by itself. Arguments as in `train_vm`; the
    configs may differ in arm, seed, `vm` and `train`, not in `train.num_workers` or `ray`.
    """
    fingerprints = [vm_fingerprint(cfg, features) for cfg in cfgs]
    outs = [run.vm(arm_of(cfg.train), cfg.train.seed, fp) for cfg, fp in zip(cfgs, fingerprints)]
    found = [current("train", out, fp, VMManifest.read) for out, fp in zip(outs, fingerprints)]
    todo = [i for i, manifest in enumerate(found) if manifest is None and outs[i] not in outs[:i]]
    if not todo:
        return found
    first = cfgs[todo[0]]
    if any((cfgs[i].train.num_workers, cfgs[i].ray) != (first.train.num_workers, first.ray) for i in todo):
        raise ValueError("train_vms: the configs of one run must agree on train.num_workers and ray")
    init_ray(first.ray)
    gpu = use_gpu(first.ray)
    info = SplitInfo.load(run)
    pending = [vm_manifest(cfgs[i], fingerprints[i], features, info) for i in todo]
    names = [feature_columns(run, features, loopfm=m.seq_width is not None, rawseq=m.rawseq) for m in pending]
    columns = list(dict.fromkeys(c for n in names for c in n))  # every VM's columns, the first VM's order
    with ordered_data():  # the same examples in the same order every run: the same VM for the same seed
        datasets = {split: read_features(run, features, split, columns) for split in ("train", "valid")}
        keep = keep_shards(first.train.data_cache, run, features)
        test = TestSplit(read_features(run, features, "test", columns), keep)
        for split in ("train", "valid") if keep else ("valid",):  # read once, not once per epoch
            datasets[split] = datasets[split].materialize()
        one = pending[0]
        name = (f"vm-{one.arm}-seed{one.seed}-{one.fingerprint}" if len(pending) == 1
                else f"vms-{len(pending)}-{stable_hash(*(m.fingerprint for m in pending))}")
        finished = FinishedVMs.remote()

        def collect() -> None:
            """Score and publish every VM that finished since the last call."""
            for k in ray.get(finished.finished.remote()):
                if found[todo[k]] is None:
                    state = torch.load(io.BytesIO(ray.get(finished.get.remote(k))), weights_only=True)
                    with TORCH_TURN:
                        found[todo[k]] = _finish(pending[k], state, outs[todo[k]], features, test, gpu,
                                                 cfgs[todo[k]].train, stop_file)

        fit = Background(lambda: run_trainer(
            vms_loop, {"manifests": [m.__dict__ for m in pending], "features": features.to_dict(),
                       "finished": finished, **({"stop_file": str(stop_file)} if stop_file else {}),
                       **({"timing_log": str(timing_log)} if timing_log else {}),
                       "keep_shards": keep, "use_gpu": gpu}, datasets,
            name=name, storage=str(run.ray_storage), num_workers=first.train.num_workers, use_gpu=gpu,
            callbacks=callbacks))
        try:
            while not fit.wait(PUBLISH_POLL_S):  # each VM published as it finishes: a crash loses only the running one
                collect()
            collect()
            fit.result()
        finally:
            drop_local_checkpoints()
            ray.kill(finished)
    missing = [pending[k] for k in range(len(pending)) if found[todo[k]] is None]
    if missing and not stop_file:
        which = ", ".join(f"{m.arm} seed {m.seed}" for m in missing)
        raise RuntimeError(f"training reported no final state for {which}")
    for k in range(len(pending)):
        if found[todo[k]] is None:  # asked to stop before this VM started
            pending[k].metrics = {"stopped": True, "history": []}
            found[todo[k]] = pending[k]
    return [found[outs.index(out)] for out in outs]  # a config given twice: trained once


def vm_manifest(cfg: LoopFMConfig, fingerprint: str, features: FeaturesManifest, info: SplitInfo) -> VMManifest:
    """What a VM of `cfg` will be, before training: everything but its weights and metrics."""
    width = seq_width(cfg, features)
    return VMManifest(
        fingerprint=fingerprint, model_version="", arm=arm_of(cfg.train), seed=cfg.train.seed,
        features_fingerprint=features.fingerprint, store_version=features.store_version if width else None,
        vm=cfg.vm.model_dump(mode="json"), train=cfg.train.model_dump(mode="json"),
        vocab_sizes={k: info.vocab_sizes[k] for k in ("user_id", "item_id", "category")},
        context_columns=list(features.context_columns), context_sizes=[info.vocab_sizes[c] for c in info.categorical],
        seq_len=features.seq_len, seq_width=width, raw_seq_len=features.raw_seq_len,
        rawseq=cfg.train.use_rawseq, num_surfaces=info.num_surfaces, vertical=features.vertical,
        dense_names=list(features.dense_names) if "counters" in cfg.vm.features else [],
    )


def _finish(manifest: VMManifest, state: dict, out, features: FeaturesManifest, test: TestSplit, gpu: bool,
            train_cfg: TrainConfig, stop_file) -> VMManifest:
    """Score a finished VM on test once, in the driver, and save it (unless it was stopped early)."""
    test_metrics = evaluate_state(state["best"], manifest, features, test, torch_device(gpu))
    manifest.metrics = {**state["stopper"]["best_metrics"], "test": test_metrics,
                        "best_epoch": state["stopper"]["best_epoch"] + 1,
                        "history": state["history"], "seconds": round(state["seconds"], 1)}
    ran_out = len(state["history"]) >= train_cfg.epochs or state["stopper"]["bad_epochs"] >= train_cfg.patience
    if stop_file and as_location(stop_file).exists() and not ran_out:  # a local path or a URI (tune on a bucket)
        manifest.metrics["stopped"] = True
        log.info("train: %s seed %d stopped after %d epochs (%s); not saved", manifest.arm, manifest.seed,
                 len(state["history"]), stop_file)
        return manifest
    publish(out, lambda tmp: save_vm(tmp, state_bytes(state["best"]), manifest))
    test = manifest.metrics["test"]
    log.info("train: %s seed %d: test auc %.4f gauc %.4f ne %.4f (best epoch %d) -> %s", manifest.arm, manifest.seed,
             test["auc"], test["gauc"], test["ne"], manifest.metrics["best_epoch"], out)
    return manifest


@dataclass
class TestSplit:
    """The test split as the driver scores every VM of a run on it: a Dataset, held in memory (read
    once, decoded once per kind of VM) when the run keeps its shards, else streamed per VM."""

    dataset: object
    keep: bool
    held: HeldShard = field(default_factory=HeldShard)


def evaluate_state(state: dict, manifest: VMManifest, features: FeaturesManifest, test: TestSplit,
                   device: torch.device = torch.device("cpu")) -> dict:
    """Test metrics of the kept epoch's weights, in the driver, once: the test split never takes
    part in choosing anything, and is not scored every epoch for nothing."""
    model = build_from_manifest(manifest)
    model.load_state_dict(state)
    model.to(device)
    collate = VMBatchCollate(features, manifest.seq_width, str(device), with_seq=manifest.seq_width is not None,
                             with_raw=manifest.rawseq)
    return evaluate_vm(model, ShardBatches(test.dataset, collate, TEST_BATCH, test.keep, held=test.held).epoch())


def keep_shards(mode: str, run: RunDir, features: FeaturesManifest) -> bool:
    """Whether Train workers keep their shards in memory after the first epoch (`train.data_cache`).

    "auto" says yes when the feature splits' parquet, at an assumed 3x in memory, plus the kept
    splits decoded (float32 sequences and int64 raw slots, `ShardBatches`) fill under a quarter of
    this machine's available memory: for splits that small, streaming them again every epoch costs
    more than holding them.
    """
    if mode != "auto":
        return mode == "memory"
    # Ray's vendored copy (ray/thirdparty_files, on the path once ray is imported): not a dependency of ours
    import psutil

    files = committed(run.features(features.fingerprint)).rglob("*.parquet")
    kept_rows = features.rows["train"] + features.rows["valid"]
    decoded = kept_rows * features.seq_len * (4 * features.width + 8 * len(RAW_COLUMNS))
    return 3 * sum(f.stat().st_size for f in files) + decoded < psutil.virtual_memory().available / 4


def feature_columns(run: RunDir, features: FeaturesManifest, loopfm: bool, rawseq: bool) -> list[str]:
    """The feature columns an arm reads: the sequence slots of the other arms are never decoded."""
    names = pads.dataset(str(committed(run.features(features.fingerprint)) / "train"), format="parquet").schema.names
    skip = ({SEQ_Z} if not loopfm else set()) | (set(RAW_COLUMNS) if not rawseq else set())
    return [n for n in names if n not in skip]


def vms_loop(config: dict) -> None:
    """The per-worker training loop (Ray Train): each VM of `config["manifests"]` in turn, skipping
    those already in `config["finished"]` (a restarted worker group), each finished VM's state put
    there by rank 0. The shards are read once for all of them."""
    timer = LoopTimer(config.get("timing_log"))
    features = FeaturesManifest(**config["features"])
    finished = config["finished"]
    done = set(ray.get(finished.finished.remote()))
    device = train_device(config.get("use_gpu", False))
    rank = ray.train.get_context().get_world_rank()
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "valid")}
    held = {name: HeldShard() for name in ("train", "valid")}  # read and decoded once for every VM
    total = len(config["manifests"])
    for index, fields in enumerate(config["manifests"]):
        if index in done:
            continue
        vm_started = time.time()
        manifest = VMManifest(**fields)
        train_cfg = TrainConfig.model_validate(manifest.train)
        collate = VMBatchCollate(features, manifest.seq_width, str(device), with_seq=manifest.seq_width is not None,
                                 with_raw=manifest.rawseq)
        splits = {name: ShardBatches(shards[name], collate, train_cfg.batch_size, config.get("keep_shards", False),
                                     shuffle_seed=train_cfg.seed if name == "train" else None, held=held[name])
                  for name in ("train", "valid")}
        tag = f"{manifest.arm} seed {manifest.seed}" + (f" (VM {index + 1}/{total})" if total > 1 else "")
        with TORCH_TURN:
            state, stopped = vm_epochs(manifest, train_cfg, splits, device, timer, index, config.get("stop_file"), tag)
        if rank == 0:
            buffer = io.BytesIO()
            torch.save({"best": state.best_state, "stopper": asdict(state.stopper), "history": state.history,
                        "seconds": time.time() - vm_started}, buffer)
            ray.get(finished.put.remote(index, buffer.getvalue()))
        if stopped:
            break


def vm_epochs(manifest: VMManifest, train_cfg: TrainConfig, splits: dict, device, timer: LoopTimer,
              index: int, stop_file: Optional[str], tag: str) -> tuple[LoopState, bool]:
    """One VM's epochs (resumed from the run's checkpoint when it is this VM's); returns its state and
    whether `stop_file` ended it."""
    seed_everything(train_cfg.seed)
    model = build_from_manifest(manifest)
    optimizer = vm_optimizer(model, train_cfg)
    state = resume(model, optimizer, train_cfg.patience, loop=index)
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    rank = ray.train.get_context().get_world_rank()
    timer.setup_done()
    for epoch in range(state.epoch, train_cfg.epochs):
        if state.stopper.should_stop:
            break
        if stop_file and ray.train.collective.broadcast_from_rank_zero(as_location(stop_file).exists()):
            return state, True  # asked to stop (e.g. by Tune's ASHA): every worker leaves on the same epoch
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
        report_epoch(epoch, metrics, model, optimizer, state, loop=index)
        timer.epoch_done(epoch)
    return state, False


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

