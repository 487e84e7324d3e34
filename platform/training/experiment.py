"""`loopfm report`: the experiment: every arm on every VM seed under every FM replicate, and the FM.

Arms (`experiment.arms`: base, +KD, rawseq, +LoopFM, +KD+LoopFM by default) train on the same
features with the same seeds, so (FM replicate r, seed k) of every arm is a pair for the paired
tests. The FM of each replicate is scored on the very same test events: its logit for each of
them is the stored KD target. The report (`report/`) says which claims its evidence supports.
With a list of verticals (`data.vertical`), each replicate's one FM and store serve them all:
every vertical gets its own features, VMs and report (`report/vertical<v>/`), and `report/`
holds them together with a summary across verticals.
"""

from __future__ import annotations

import os
import platform as _stdlib_platform
import time
from dataclasses import dataclass, field

import numpy as np

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.datasets.schema import USER_ID
from loopfm.evaluation.metrics import evaluate
from loopfm.evaluation.report import (
    VERTICAL_DIR,
    build_report,
    build_verticals_report,
    write_report,
    write_verticals_report,
)
from loopfm.features.reader import KD_LOGIT, LABEL, FeaturesManifest, read_features
from loopfm.features.stage import features_verticals_stage
from loopfm.fm.embed import embed_stage
from loopfm.fm.train import fm_train_stage
from loopfm.location import remove_tree
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
    """The FM, store and features of one replicate of one vertical (each stage skipped when current)."""
    vertical = cfg.data.one_vertical("a replicate's feature set")
    return replicate_verticals(cfg, run)[vertical]


def replicate_verticals(cfg: LoopFMConfig, run: RunDir) -> dict[int, FeaturesManifest]:
    """The FM and store of one replicate, and one feature set per vertical from that one store."""
    fm = fm_train_stage(cfg, run)
    embed_stage(cfg, run)
    return features_verticals_stage(cfg, run, fm_version=fm.fm_version)


@dataclass
class VerticalRuns:
    """One vertical's experiment: `arms[arm]` one test-metrics dict per (fm_seed, seed) pair, tagged
    with both, in the same order in every arm; `fm` the FM's test metrics per replicate, on this
    vertical's test events; `features` its feature set per replicate."""

    arms: dict[str, list[dict]] = field(default_factory=dict)
    fm: list[dict] = field(default_factory=list)
    features: list[FeaturesManifest] = field(default_factory=list)


def run_experiment(cfg: LoopFMConfig, run: RunDir) -> dict[int, VerticalRuns]:
    """Every arm x VM seed under every FM replicate, for each vertical of `data.vertical`: one FM
    and store per replicate serve every vertical, each with its own features and VMs."""
    verticals = cfg.data.verticals
    results = {v: VerticalRuns() for v in verticals}
    total = len(cfg.experiment.fm_seeds) * len(verticals) * len(cfg.experiment.arms) * cfg.experiment.seeds
    done = 0
    for fm_seed in cfg.experiment.fm_seeds:
        rcfg = replicate_config(cfg, fm_seed)
        features = replicate_verticals(rcfg, run)
        for vertical, vcfg in rcfg.per_vertical().items():
            out = results[vertical]
            out.features.append(features[vertical])
            out.fm.append({**fm_on_test(run, features[vertical]), "fm_seed": fm_seed})
            pairs = [(seed, arm) for seed in range(cfg.experiment.seeds) for arm in cfg.experiment.arms]
            manifests = train_vms([arm_config(vcfg, arm, seed) for seed, arm in pairs], run, features[vertical])
            for (seed, arm), manifest in zip(pairs, manifests):
                out.arms.setdefault(arm, []).append({**manifest.metrics["test"], "seed": seed, "fm_seed": fm_seed})
            done += len(pairs)
            log.info("report: %d/%d VMs trained", done, total)
    return results


def report_stage(cfg: LoopFMConfig, run: RunDir) -> dict:
    """`loopfm report`: train what is missing, evaluate, write report.json, report.md and plots
    (with a list of verticals: one report per vertical and the summary across them)."""
    init_ray(cfg.ray)
    started = time.time()
    results = run_experiment(cfg, run)
    meta = {
        "run": str(run.root), "config_hash": stable_hash(cfg), "seeds": cfg.experiment.seeds,
        "fm_seeds": list(cfg.experiment.fm_seeds), "vm": cfg.vm.model, "pooling": cfg.vm.pooling,
        "vm_features": list(cfg.vm.features),
    }
    machine = f"{_stdlib_platform.machine()} {_stdlib_platform.system()}, {os.cpu_count()} cores"
    reports = {v: build_report(r.arms, r.fm, {
        **meta, **({"vertical": v} if len(results) > 1 else {}),
        "store_versions": [f.store_version for f in r.features],
        "features": [f.fingerprint for f in r.features], "test_examples": r.features[0].rows["test"],
        "machine": machine}) for v, r in results.items()}
    clear_stale_report(run, keep=list(results) if len(results) > 1 else [])
    if len(results) == 1:
        [report] = reports.values()
        paths = write_report(report, run.report)
    else:
        first = next(iter(results.values()))  # every vertical's features come from the replicate's one store
        report = build_verticals_report(reports, {**meta, "verticals": list(results),
                                                  "store_versions": [f.store_version for f in first.features],
                                                  "machine": machine})
        paths = write_verticals_report(report, run.report)
    for v, r in reports.items():
        for claim in r.get("claims", []):
            log.info("report: vertical %d [%s] %s (%s)", v, claim["verdict"], claim["claim"], claim["evidence"])
    log.info("report: %s (experiment %.0fs)", ", ".join(str(p) for p in paths), time.time() - started)
    return report


def clear_stale_report(run: RunDir, keep: list[int]) -> None:
    """Remove the report files this report does not rewrite, so `report/` holds the current report
    only: folders of verticals it no longer has and, over several verticals (whose plots are per
    vertical), the top-level plots of a single-vertical report."""
    for path in run.report.glob(f"{VERTICAL_DIR}*"):
        suffix = path.name[len(VERTICAL_DIR):]
        if path.is_dir() and suffix.isdigit() and int(suffix) not in keep:
            remove_tree(path)
    if keep:
        for name in ("arms.png", "transfer.png"):
            (run.report / name).unlink(missing_ok=True)
