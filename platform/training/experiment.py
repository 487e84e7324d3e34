"""`loopfm report`: the experiment of DESIGN section 1: every arm on every seed, and the FM.

Arms (base, +KD, +LoopFM, +KD+LoopFM) train on the same features with the same seeds, so seed k
of every arm is a pair for the paired tests. The FM is scored on the very same test events:
its logit for each of them is the stored KD target. The report (`report/`) says which of the
paper's claims hold on this run, and by how much.
"""

from __future__ import annotations

import os
import platform as _stdlib_platform
import time

import numpy as np

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.features.reader import KD_LOGIT, LABEL, FeaturesManifest, read_features
from loopfm.rundir import RunDir


def fm_on_test(run: RunDir, features: FeaturesManifest) -> dict:
    """FM metrics on the vertical's test events (the stored FM logits of those events)."""
    from loopfm.evaluation.metrics import evaluate

    user = "user_id_idx"
    batches = read_features(run, features, "test", columns=[LABEL, KD_LOGIT, user]).iter_batches(
        batch_format="numpy", batch_size=None)
    parts = list(batches)
    cat = {k: np.concatenate([b[k] for b in parts]) for k in (LABEL, KD_LOGIT, user)}
    return evaluate(cat[LABEL], cat[KD_LOGIT], cat[user])


def run_experiment(cfg: LoopFMConfig, run: RunDir, features: FeaturesManifest) -> dict[str, list[dict]]:
    """Test metrics of every arm, one dict per seed (seeds in the same order in every arm)."""
    from loopfm.runtime import log
    from loopfm.training.vm import arm_config, train_vm

    results: dict[str, list[dict]] = {}
    total = len(cfg.experiment.arms) * cfg.experiment.seeds
    done = 0
    for seed in range(cfg.experiment.seeds):
        for arm in cfg.experiment.arms:
            manifest = train_vm(arm_config(cfg, arm, seed), run, features)
            results.setdefault(arm, []).append(manifest.metrics["test"])
            done += 1
            log.info("report: %d/%d VMs trained", done, total)
    return results


def report_stage(cfg: LoopFMConfig, run: RunDir, args=None) -> dict:
    """`loopfm report`: train what is missing, evaluate, write report.json, report.md and plots."""
    from loopfm.evaluation.report import build_report, write_report
    from loopfm.features import features_stage
    from loopfm.runtime import init_ray, log

    init_ray(cfg.ray)
    features = features_stage(cfg, run)
    started = time.time()
    arms = run_experiment(cfg, run, features)
    fm = fm_on_test(run, features)
    meta = {
        "run": str(run.root), "config_hash": stable_hash(cfg), "seeds": cfg.experiment.seeds,
        "vm": cfg.vm.model, "pooling": cfg.vm.pooling, "store_version": features.store_version,
        "features": features.fingerprint, "test_examples": features.rows["test"],
        "machine": f"{_stdlib_platform.machine()} {_stdlib_platform.system()}, {os.cpu_count()} cores",
        "experiment_seconds": round(time.time() - started, 1),
    }
    report = build_report(arms, fm, meta)
    paths = write_report(report, run.report)
    for claim in report.get("claims", []):
        log.info("report: [%s] %s (%s)", "holds" if claim["holds"] else "does not hold", claim["claim"], claim["evidence"])
    log.info("report: %s", ", ".join(str(p) for p in paths))
    return report
