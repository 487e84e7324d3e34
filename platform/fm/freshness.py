"""`loopfm freshness --slices K`: one fixed FM checkpoint against FMs retrained per time slice.

The train period is cut at c_1 < ... < c_K (c_K = the valid boundary; the others at train-time
quantiles). FM_k is trained only on events before c_k (its valid window is [c_k, c_k+1)), as a
platform retraining on a schedule would. Two stores of the same events are compared:

- fixed: every event embedded by FM_K (the run's own FM, one consistent embedding space);
- drifting: each event embedded by the newest FM of its time (events before c_2 by FM_1, those
  in [c_k, c_k+1) by FM_k, valid and test by FM_K), each FM with its own compressor.

For each store: centroid drift (mean distance between the z centroids of consecutive time
windows) and the test metrics of the LoopFM arm over every seed. The paper finds the fixed,
consistent space transfers better; `report/freshness.{md,json,png}` says what happens here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.datasets.schema import SPLITS, TS
from loopfm.datasets.splits import SplitInfo, split_paths
from loopfm.evaluation.report import write_ablation
from loopfm.evaluation.transfer import summarize
from loopfm.features.stage import features_stage
from loopfm.fm.embed import embed_stage
from loopfm.fm.train import fm_train_stage
from loopfm.rundir import RunDir
from loopfm.runtime import init_ray, log
from loopfm.skeleton import current, publish
from loopfm.store import codec
from loopfm.store.parquet import data_files, seal
from loopfm.store.resolve import store_version
from loopfm.store.schema import StoreManifest
from loopfm.training.vm import arm_config, train_vm


def slice_bounds(run: RunDir, info: SplitInfo, slices: int) -> list[int]:
    """c_1..c_K: quantiles of train-event times, then the valid boundary."""
    ts = pads.dataset(str(split_paths(run, "train")), format="parquet").to_table(columns=[TS])[TS].to_numpy()
    inner = np.quantile(ts, np.arange(1, slices) / slices, method="higher").astype(np.int64).tolist()
    return [*inner, info.valid_start_ts]


def drifting_store(run: RunDir, cfg: LoopFMConfig, stores: list[StoreManifest], bounds: list[int],
                   events: int) -> StoreManifest:
    """Each event's row from the newest FM of its time, as one sealed store."""
    fm_version = "drift-" + stable_hash([s.fm_version for s in stores], bounds)
    compressors = ",".join(s.compressor_hash for s in stores)  # each slice's rows keep their own compressor's z
    version = store_version(fm_version, cfg.embed, compressors)
    out = run.store(version)
    done = current("freshness: drifting store", out, None, StoreManifest.read)
    if done is not None:
        return done
    edges = [None, *bounds[1:], None]  # FM_k serves [c_k, c_k+1); FM_1 also everything before

    def build(tmp: Path) -> StoreManifest:
        for k, store in enumerate(stores):
            rows = pads.dataset([str(f) for f in data_files(run.store(store.store_version))], format="parquet")
            expr = None
            if edges[k] is not None:
                expr = pads.field(TS) >= edges[k]
            if edges[k + 1] is not None:
                upper = pads.field(TS) < edges[k + 1]
                expr = upper if expr is None else expr & upper
            pq.write_table(rows.to_table(filter=expr), tmp / f"slice{k}.parquet")
        last = stores[-1]
        return seal(tmp, StoreManifest(
            store_version=version, fm_version=fm_version, checkpoint_hash=",".join(s.fm_version for s in stores),
            layers=last.layers, raw_width=last.raw_width, width=last.width, prefix_widths=last.prefix_widths,
            dtype=last.dtype, recon_error=last.recon_error, quant_error=last.quant_error,
            compressor_hash=compressors), expected_rows=events, stage="freshness")

    return publish(out, build)


def centroid_drift(run: RunDir, store: StoreManifest, bounds: list[int]) -> float:
    """Mean L2 distance between z centroids of consecutive windows (before c_1, [c_1, c_2), ...)."""
    table = pads.dataset([str(f) for f in data_files(run.store(store.store_version))], format="parquet").to_table(
        columns=[TS, "z"])
    z = codec.decode(codec.binary_to_rows(table["z"], codec.bytes_per_row(store.width, store.dtype)),
                     store.dtype, store.width)
    window = np.searchsorted(np.asarray(bounds), table[TS].to_numpy(), side="right")
    centroids = [z[window == w].mean(axis=0) for w in range(len(bounds) + 1) if (window == w).any()]
    return float(np.mean([np.linalg.norm(b - a) for a, b in zip(centroids, centroids[1:])]))


def freshness_stage(cfg: LoopFMConfig, run: RunDir, slices: int = 3, arm: str = "loopfm") -> list[dict]:
    """`loopfm freshness [--slices K] [--arm A]`."""
    init_ray(cfg.ray)
    info = SplitInfo.load(run)
    bounds = slice_bounds(run, info, slices)
    stores = []
    for k, cut in enumerate(bounds):
        cutoffs = None if k == slices - 1 else (cut, bounds[k + 1])  # the last is the run's own FM
        log.info("freshness: FM %d/%d trained on events before ts %d", k + 1, slices, cut)
        fm_train_stage(cfg, run, cutoffs=cutoffs)
        stores.append(embed_stage(cfg, run, cutoffs=cutoffs))
    drifting = drifting_store(run, cfg, stores, bounds, sum(info.rows[s] for s in SPLITS))
    rows = []
    for name, store in (("fixed", stores[-1]), ("drifting", drifting)):
        features = features_stage(cfg, run, fm_version=store.fm_version)
        tests = [train_vm(arm_config(cfg, arm, seed), run, features).metrics["test"]
                 for seed in range(cfg.experiment.seeds)]
        row = {"embeddings": name, "centroid_drift": centroid_drift(run, store, bounds),
               **{m: summarize(t[m] for t in tests) for m in ("auc", "gauc", "logloss", "ne")}}
        log.info("freshness: %s embeddings: centroid drift %.4f, %s test auc %.4f ± %.4f", name,
                 row["centroid_drift"], arm, row["auc"]["mean"], row["auc"]["std"])
        rows.append(row)
    paths = write_ablation(rows, "embeddings", run.report, "freshness", metrics=("auc", "ne", "centroid_drift"))
    log.info("freshness: slices at ts %s; %s", bounds, ", ".join(str(p) for p in paths))
    return rows
