"""`loopfm scale`: the FM capacity study. FMs of growing size, each with its own store; TR against size.

The paper's motivating result is that KD's transfer ratio shrinks as the FM grows while LoopFM's
holds. This study lets that come out either way on any log the readers accept: every size of
`scale.fm_sizes` sets the shape keys of the `fm` section (so its fingerprint, FM, store and
features are its own) and then goes down the experiment's own path (`replicate_config`,
`replicate_features`, `fm_on_test`, `train_vms` per FM replicate), so a size is what
`loopfm report` would run with that FM. The store's width (`embed.compress`) stays fixed,
so each VM reads the same number of bytes per event whatever the FM: only what the FM knows
changes. `report/scale.{json,md,png}` holds TR per channel per size with 95% CIs, the trends over
log10(parameters) and the gated claims (`loopfm.evaluation.scale`).

The arms with no FM channel (`FM_FREE_ARMS`: base and rawseq) are trained once, on the first
size's features, and reused at every size. Their VM fingerprint hashes the feature fingerprint,
which hashes the store version, so a VM fingerprint alone would retrain them per size; but they read
no column the FM writes (`FM_COLUMNS`: the stored z sequence and the KD logit; the base loss
never looks at the KD logit). Reuse is checked, not assumed: a size shares them only when the
digest of every other feature column, every split, in read order, equals the first size's
(`vm_inputs_digest`); otherwise they are trained on its own features and a note says so. Reusing
them also makes them the common baseline of every size's pairs, so the TR curves are paired.
"""

from __future__ import annotations

import hashlib
import os
import platform as _stdlib_platform
import time

import pyarrow as pa
import pyarrow.compute as pc
import torch.nn as nn

from loopfm.config import ARM_CHANNELS, ConfigError, FMSize, LoopFMConfig, stable_hash
from loopfm.datasets.ingest import validate_stage
from loopfm.datasets.schema import SPLITS
from loopfm.datasets.splits import SplitInfo, split_stage
from loopfm.datasets.synthetic import generate_stage
from loopfm.evaluation.scale import build_scale, write_scale
from loopfm.features.reader import KD_LOGIT, SEQ_Z, FeaturesManifest
from loopfm.fm.checkpoint import FMManifest, load_fm
from loopfm.fm.train import fm_fingerprint
from loopfm.location import parquet_dataset
from loopfm.rundir import RunDir, committed
from loopfm.runtime import init_ray, log
from loopfm.training.experiment import fm_on_test, replicate_config, replicate_features
from loopfm.training.vm import arm_config, train_vms

FM_COLUMNS = (SEQ_Z, KD_LOGIT)  # the feature columns the FM writes; every other one comes from the log alone
FM_FREE_ARMS = tuple(arm for arm, (kd, loopfm, _) in ARM_CHANNELS.items() if not kd and not loopfm)


def size_config(cfg: LoopFMConfig, size: FMSize) -> LoopFMConfig:
    """The config of one FM size: the `fm` shape keys set, everything else as configured."""
    try:
        sized = cfg.updated({f"fm.{k}": v for k, v in size.shape.items()})
    except ConfigError as err:
        raise ConfigError(f"scale.fm_sizes: size {size.name!r} does not fit this config: {err}") from None
    if max(sized.embed.layers) > size.n_layers:
        raise ConfigError(f"scale.fm_sizes: size {size.name!r} has {size.n_layers} block(s) but embed.layers "
                          f"asks for layer {max(sized.embed.layers)}; use shallower layers or deeper sizes")
    return sized


def size_configs(cfg: LoopFMConfig) -> list[tuple[FMSize, LoopFMConfig]]:
    """Every size's config, all checked before anything trains (a bad size fails the study at once)."""
    return [(size, size_config(cfg, size)) for size in cfg.scale.fm_sizes]


def fm_parameters(run: RunDir, fm: FMManifest) -> dict:
    """Parameters of the FM as built from its checkpoint: all of them, and those in embedding tables."""
    model, _ = load_fm(run.fm(fm.fingerprint))
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return {"parameters": int(total), "embedding_parameters": int(embedding)}


def vm_inputs_digest(run: RunDir, features: FeaturesManifest) -> str:
    """sha256 of every feature column the FM does not write, every split, in file (read) order."""
    h = hashlib.sha256()
    for split in SPLITS:
        files = sorted((committed(run.features(features.fingerprint)) / split).rglob("*.parquet"), key=str)
        dataset = parquet_dataset(files)
        columns = [c for c in dataset.schema.names if c not in FM_COLUMNS]
        h.update(f"{split}:{','.join(columns)}".encode())
        for batch in dataset.to_batches(columns=columns):
            for name in columns:
                _digest_array(h, batch.column(name))
    return h.hexdigest()


def _digest_array(h, array: pa.Array) -> None:
    """Values, and list lengths where the column holds lists, so equal digests mean equal columns."""
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        h.update(pc.list_value_length(array).fill_null(-1).to_numpy(zero_copy_only=False).tobytes())
        array = pc.list_flatten(array)
    values = array.to_numpy(zero_copy_only=False)
    h.update(values.tobytes() if values.dtype != object else repr(values.tolist()).encode())


def run_scale(cfg: LoopFMConfig, run: RunDir) -> list[dict]:
    """Every FM size: its FM per replicate, store, features, FM test metrics, and every arm x seed.

    Returns one dict per size (shape, parameters, `fm` per replicate, `arms` as `run_experiment`
    tags them), the input of `build_scale`.
    """
    sizes = size_configs(cfg)
    if "base" not in cfg.experiment.arms:
        raise ConfigError("experiment.arms must include base: TR is every channel's gain over the base VM")
    arms, seeds, fm_seeds = cfg.experiment.arms, cfg.experiment.seeds, cfg.experiment.fm_seeds
    reference: tuple[FeaturesManifest, str] | None = None  # where the FM-free arms train, and its digest
    out = []
    for i, (size, scfg) in enumerate(sizes):
        log.info("scale: FM size %d/%d %s (%s)", i + 1, len(sizes), size.name, size.shape)
        row: dict = {"name": size.name, **size.shape, "fm": [], "arms": {}, "fm_versions": [], "store_versions": [],
                     "features": [], "fm_free_shared": []}
        for fm_seed in fm_seeds:
            rcfg = replicate_config(scfg, fm_seed)
            features = replicate_features(rcfg, run)
            fm = FMManifest.read(run.fm(fm_fingerprint(rcfg, SplitInfo.load(run))))
            counted = fm_parameters(run, fm)
            if row.get("parameters", counted["parameters"]) != counted["parameters"]:
                raise RuntimeError(f"scale: FM replicates of size {size.name} differ in parameters")
            row.update(counted)
            row["fm_versions"].append(fm.fm_version)
            row["store_versions"].append(features.store_version)
            row["features"].append(features.fingerprint)
            row["fm"].append({**fm_on_test(run, features), "fm_seed": fm_seed})
            digest = vm_inputs_digest(run, features)
            reference = reference or (features, digest)
            shared = digest == reference[1]
            row["fm_free_shared"].append(shared)
            if not shared:
                log.warning("scale: %s fm_seed %d: its FM-free feature columns differ from the first size's; "
                            "%s trained on its own features", size.name, fm_seed, ", ".join(FM_FREE_ARMS))
            pairs = [(seed, arm) for seed in range(seeds) for arm in arms]
            on = {arm: reference[0] if arm in FM_FREE_ARMS and shared else features for arm in arms}
            trained: dict = {}
            for fs in {id(f): f for f in on.values()}.values():  # one Train run per feature set
                group = [(seed, arm) for seed, arm in pairs if on[arm] is fs]
                trained.update(zip(group, train_vms([arm_config(rcfg, arm, seed) for seed, arm in group], run, fs)))
            for seed, arm in pairs:
                row["arms"].setdefault(arm, []).append({**trained[seed, arm].metrics["test"], "seed": seed,
                                                        "fm_seed": fm_seed})
        log.info("scale: %s has %d FM parameters; FM test auc %s", size.name, row["parameters"],
                 ", ".join(f"{d['auc']:.4f}" for d in row["fm"]))
        out.append(row)
    return out


def scale_stage(cfg: LoopFMConfig, run: RunDir) -> dict:
    """`loopfm scale`: the log's stages, then what is missing per size; writes report/scale.{json,md,png}.

    One command on a fresh run directory: the data stages run first (each skipped when current),
    as `loopfm run` would run them.
    """
    cfg.data.one_vertical("loopfm scale")
    size_configs(cfg)  # a size that does not fit fails before anything runs
    init_ray(cfg.ray)
    started = time.time()
    if cfg.data.source == "synthetic":
        generate_stage(cfg, run)
    validate_stage(cfg, run)
    split_stage(cfg, run)
    sizes = run_scale(cfg, run)
    meta = {
        "run": str(run.root), "config_hash": stable_hash(cfg), "arms": list(cfg.experiment.arms),
        "seeds": cfg.experiment.seeds, "fm_seeds": list(cfg.experiment.fm_seeds), "vm": cfg.vm.model,
        "store_width": cfg.embed.compress.width, "embed_layers": list(cfg.embed.layers),
        "fm_free_arms_shared": all(all(s["fm_free_shared"]) for s in sizes),
        "synthetic_taste_weight": cfg.data.synthetic.taste_weight if cfg.data.source == "synthetic" else None,
        "machine": f"{_stdlib_platform.machine()} {_stdlib_platform.system()}, {os.cpu_count()} cores",
    }
    report = build_scale(sizes, meta)
    paths = write_scale(report, run.report)
    for claim in report["claims"]:
        log.info("scale: [%s] %s (%s)", claim["verdict"], claim["claim"], claim["evidence"])
    log.info("scale: %s (study %.0fs)", ", ".join(str(p) for p in paths), time.time() - started)
    return report
