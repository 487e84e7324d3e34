"""`loopfm report`: the experiment: every arm on every VM seed under every FM replicate, and the FM.

Arms (`experiment.arms`: base, +KD, rawseq, +LoopFM, +KD+LoopFM by default) train on the same
features with the same seeds, so (FM replicate r, seed k) of every arm is a pair for the paired
tests. The FM of each replicate is scored on the very same test events: its logit for each of
them is the stored KD target. The report (`report/`) says which claims its evidence supports.
"""

from __future__ import annotations

import os
import platform as _stdlib_platform
import time

import numpy as np

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.datasets.schema import USER_ID
from loopfm.evaluation.metrics import evaluate
from loopfm.evaluation.report import build_report, write_report
from loopfm.features.reader import KD_LOGIT, LABEL, FeaturesManifest, read_features
from loopfm.features.stage import features_stage
from loopfm.fm.embed import embed_stage
from loopfm.fm.train import fm_train_stage
from loopfm.rundir import RunDir
from loopfm.runtime import init_ray, log
from loopfm.training.vm import arm_config, train_vms


def fm_on_test(run: RunDir, features: FeaturesManifest) -> dict:
    """FM metrics on the vertical's test events (the stored FM logits of those events)."""
    batches = read_features(run, features, "test", columns=[LABEL, KD_LOGIT, USER_ID]).iter_batches(
        batch_format="numpy", batch_size=None)
    parts = list(batches)
    cat = {k: np.concatenate([b[k] for b in parts]) for k in (LABEL, KD_LOGIT, USER_ID)}
    return evaluate(cat[LABEL], cat[KD_LOGIT], cat[USER_ID])


def replicate_config(cfg: LoopFMConfig, fm_seed: int) -> LoopFMConfig:
    """The config of one FM replicate: everything as configured, the FM's seed set."""
    return cfg.updated({"fm.seed": fm_seed})


def replicate_features(cfg: LoopFMConfig, run: RunDir) -> FeaturesManifest:
    """The FM, store and features of one replicate (each stage skipped when current)."""
    fm = fm_train_stage(cfg, run)
    embed_stage(cfg, run)
    return features_stage(cfg, run, fm_version=fm.fm_version)


def run_experiment(cfg: LoopFMConfig, run: RunDir) -> tuple[dict[str, list[dict]], list[dict], list[FeaturesManifest]]:
    """Every arm x VM seed under every FM replicate.

    Returns (arms, fm, features): `arms[arm]` is one test-metrics dict per (fm_seed, seed) pair,
    tagged with both, in the same order in every arm; `fm` the FM's test metrics per replicate.
    """
    results: dict[str, list[dict]] = {}
    fm_results, feature_sets = [], []
    total = len(cfg.experiment.fm_seeds) * len(cfg.experiment.arms) * cfg.experiment.seeds
    done = 0
    for fm_seed in cfg.experiment.fm_seeds:
        rcfg = replicate_config(cfg, fm_seed)
        features = replicate_features(rcfg, run)
        feature_sets.append(features)
        fm_results.append({**fm_on_test(run, features), "fm_seed": fm_seed})
        pairs = [(seed, arm) for seed in range(cfg.experiment.seeds) for arm in cfg.experiment.arms]
        manifests = train_vms([arm_config(rcfg, arm, seed) for seed, arm in pairs], run, features)
        for (seed, arm), manifest in zip(pairs, manifests):
            results.setdefault(arm, []).append({**manifest.metrics["test"], "seed": seed, "fm_seed": fm_seed})
        done += len(pairs)
        log.info("report: %d/%d VMs trained", done, total)
    return results, fm_results, feature_sets


def report_stage(cfg: LoopFMConfig, run: RunDir) -> dict:
    """`loopfm report`: train what is missing, evaluate, write report.json, report.md and plots."""
    init_ray(cfg.ray)
    started = time.time()
    arms, fm, feature_sets = run_experiment(cfg, run)
    meta = {
        "run": str(run.root), "config_hash": stable_hash(cfg), "seeds": cfg.experiment.seeds,
        "fm_seeds": list(cfg.experiment.fm_seeds), "vm": cfg.vm.model, "pooling": cfg.vm.pooling,
        "vm_features": list(cfg.vm.features),
        "store_versions": [f.store_version for f in feature_sets],
        "features": [f.fingerprint for f in feature_sets], "test_examples": feature_sets[0].rows["test"],
        "machine": f"{_stdlib_platform.machine()} {_stdlib_platform.system()}, {os.cpu_count()} cores",
    }
    report = build_report(arms, fm, meta)
    paths = write_report(report, run.report)
    for claim in report.get("claims", []):
        log.info("report: [%s] %s (%s)", claim["verdict"], claim["claim"], claim["evidence"])
    log.info("report: %s (experiment %.0fs)", ", ".join(str(p) for p in paths), time.time() - started)
    return report
