"""`loopfm freshness --slices K`: which FM's embeddings should a VM read when the FM is retrained
on a schedule?

The train period is cut at c_1 < ... < c_K (c_K = the valid boundary; the others at train-time
quantiles). FM_k is trained only on events before c_k (its valid window is [c_k, c_k+1)), as a
platform retraining on a schedule would; FM_K is the run's own FM. Three stores of the same events:

- stale: every event embedded by FM_1 (the first FM, never refreshed);
- fixed: every event embedded by FM_K (today's FM re-embeds all history; one space);
- drifting: each event embedded by the newest FM of its time (events before c_2 by FM_1, those in
  [c_k, c_k+1) by FM_k, valid and test by FM_K).

Each FM has its own compressor, so the raw z of two FMs are in unrelated coordinates. A VM must
train on the same mixture of spaces it is tested on, so each older FM's z is mapped into FM_K's
space by an affine least-squares map fitted on the train events both embed (`aligned_store`; its
fit R^2 on valid events is reported), and the drifting store is built from the aligned rows. Drift
is measured where it means something: per store, between consecutive time windows, as the
held-out AUC of a classifier telling the windows apart (0.5: no drift; `loopfm drift`'s measure)
and as centroid distance in the store's one space. For each store the arm's test metrics over
every seed; `report/freshness.{md,json,png}` says which came out ahead, whichever it is.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.datasets.schema import SPLITS, TS
from loopfm.datasets.splits import SplitInfo, split_paths
from loopfm.errors import LoopFMError, VersionMismatchError
from loopfm.evaluation.drift import read_z, slice_drift
from loopfm.evaluation.report import write_ablation
from loopfm.evaluation.transfer import improvement, paired, summarize
from loopfm.features.stage import features_stage
from loopfm.fm.embed import embed_stage
from loopfm.fm.train import fm_train_stage
from loopfm.location import AnyPath, fs_path, parquet_dataset
from loopfm.rundir import RunDir
from loopfm.runtime import init_ray, log
from loopfm.skeleton import current, publish
from loopfm.store import codec
from loopfm.store.deltas import run_backend
from loopfm.store.parquet import data_files, seal
from loopfm.store.resolve import store_version
from loopfm.store.schema import EVENT_ID, StoreManifest, Z
from loopfm.training.vm import arm_config, train_vms


def slice_bounds(run: RunDir, info: SplitInfo, slices: int) -> list[int]:
    """c_1..c_K: quantiles of train-event times, then the valid boundary."""
    ts = pads.dataset(str(split_paths(run, "train")), format="parquet").to_table(columns=[TS])[TS].to_numpy()
    inner = np.quantile(ts, np.arange(1, slices) / slices, method="higher").astype(np.int64).tolist()
    return [*inner, info.valid_start_ts]


ALIGNMENT_FILE = "alignment.npz"
# the paired comparisons of the report, (worse-expected, better-expected): "b_vs_a" > 0 means b is better
FRESHNESS_PAIRS = (("stale", "fixed"), ("fixed", "drifting"), ("stale", "drifting"))


def read_store_z(run: RunDir, store: StoreManifest) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(event id and ts columns sorted by event id, decoded z) of every row of `store`."""
    cols, z = read_z(run_backend(run).scan(fs_path(run.store(store.store_version)), [EVENT_ID, TS, Z]), store)
    order = np.argsort(cols[EVENT_ID], kind="stable")
    return {c: v[order] for c, v in cols.items()}, z[order]


def fit_alignment(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) minimizing ||source @ W + b - target||^2: one FM's z into another's space."""
    x = np.hstack([source.astype(np.float64), np.ones((len(source), 1))])
    solution, *_ = np.linalg.lstsq(x, target.astype(np.float64), rcond=None)
    return solution[:-1].astype(np.float32), solution[-1].astype(np.float32)


def apply_alignment(z: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Mapped z, clipped to the codec's range [-1, 1)."""
    return np.clip(z @ weight + bias, -1.0, 1.0 - 1e-6).astype(np.float32)


def r2(pred: np.ndarray, target: np.ndarray) -> float:
    resid = ((target - pred) ** 2).sum()
    total = ((target - target.mean(axis=0)) ** 2).sum()
    return float(1 - resid / total) if total > 0 else float("nan")


def aligned_store(run: RunDir, cfg: LoopFMConfig, store: StoreManifest, reference: StoreManifest,
                  info: SplitInfo) -> tuple[StoreManifest, float]:
    """`store`'s rows (its FM's logits, its events) with z mapped into `reference`'s space: the
    affine map is fitted on train events only and saved beside the rows (`alignment.npz`), the
    result re-encoded with the reference's codec. Returns the store and the map's R^2 on valid events."""
    fm_version = "aligned-" + stable_hash(store.store_version, reference.store_version)
    version = store_version(fm_version, cfg.embed, reference.compressor_hash)
    out = run.store(version)
    cols, z = read_store_z(run, store)
    ref_cols, ref_z = read_store_z(run, reference)
    if not np.array_equal(cols[EVENT_ID], ref_cols[EVENT_ID]):
        raise VersionMismatchError(f"freshness: stores {store.store_version} and {reference.store_version} "
                                   "do not hold the same events; cannot align one onto the other")
    train = cols[TS] < info.valid_start_ts
    valid = (cols[TS] >= info.valid_start_ts) & (cols[TS] < info.test_start_ts)
    weight, bias = fit_alignment(z[train], ref_z[train])
    fit = r2(apply_alignment(z[valid], weight, bias), ref_z[valid]) if valid.any() else float("nan")
    done = current("freshness: aligned store", out, None, StoreManifest.read)
    if done is not None:
        return done, fit

    def build(tmp: AnyPath) -> StoreManifest:
        alignment = io.BytesIO()  # the .npz bytes written whole: a local file or one object
        np.savez(alignment, weight=weight, bias=bias)
        (tmp / ALIGNMENT_FILE).write_bytes(alignment.getvalue())
        for f in data_files(run.store(store.store_version)):
            table = pq.read_table(str(f))  # a local path or a URI pyarrow resolves
            rows = codec.decode(codec.binary_to_rows(table[Z], codec.bytes_per_row(store.width, store.dtype)),
                                store.dtype, store.width)
            mapped = codec.encode(apply_alignment(rows, weight, bias), reference.dtype)
            table = table.set_column(table.schema.get_field_index(Z), Z, codec.rows_to_binary(mapped))
            pq.write_table(table, str(tmp / f.name))
        return seal(tmp, StoreManifest(
            store_version=version, fm_version=fm_version, checkpoint_hash=store.fm_version, layers=store.layers,
            raw_width=store.raw_width, width=reference.width, prefix_widths=reference.prefix_widths,
            dtype=reference.dtype, recon_error=store.recon_error, quant_error=reference.quant_error,
            compressor_hash=reference.compressor_hash), expected_rows=store.rows, stage="freshness")

    return publish(out, build), fit


def drifting_store(run: RunDir, cfg: LoopFMConfig, stores: list[StoreManifest], bounds: list[int],
                   events: int) -> StoreManifest:
    """Each event's row from the newest of `stores` (one per FM, oldest first, all in one z space)
    of its time, as one sealed store."""
    fm_version = "drift-" + stable_hash([s.fm_version for s in stores], bounds)
    compressors = ",".join(s.compressor_hash for s in stores)
    version = store_version(fm_version, cfg.embed, compressors)
    out = run.store(version)
    done = current("freshness: drifting store", out, None, StoreManifest.read)
    if done is not None:
        return done
    edges = [None, *bounds[1:], None]  # FM_k serves [c_k, c_k+1); FM_1 also everything before

    def build(tmp: AnyPath) -> StoreManifest:
        for k, store in enumerate(stores):
            rows = parquet_dataset(data_files(run.store(store.store_version)))
            expr = None
            if edges[k] is not None:
                expr = pads.field(TS) >= edges[k]
            if edges[k + 1] is not None:
                upper = pads.field(TS) < edges[k + 1]
                expr = upper if expr is None else expr & upper
            pq.write_table(rows.to_table(filter=expr), str(tmp / f"slice{k}.parquet"))
        last = stores[-1]
        return seal(tmp, StoreManifest(
            store_version=version, fm_version=fm_version, checkpoint_hash=",".join(s.checkpoint_hash for s in stores),
            layers=last.layers, raw_width=last.raw_width, width=last.width, prefix_widths=last.prefix_widths,
            dtype=last.dtype, recon_error=last.recon_error, quant_error=last.quant_error,
            compressor_hash=compressors), expected_rows=events, stage="freshness")

    return publish(out, build)


def window_drift(run: RunDir, store: StoreManifest, bounds: list[int]) -> dict[str, float]:
    """Drift between consecutive time windows of one store: mean classifier AUC and centroid distance."""
    cols, z = read_store_z(run, store)
    rows = slice_drift(cols, z, bounds)
    return {"classifier_auc": float(np.mean([r["classifier_auc"] for r in rows])),
            "centroid_drift": float(np.mean([r["centroid_shift"] for r in rows]))}


def freshness_stage(cfg: LoopFMConfig, run: RunDir, slices: int = 3, arm: str = "loopfm") -> list[dict]:
    """`loopfm freshness [--slices K] [--arm A]`: the stale, fixed and drifting stores, `arm` on each."""
    cfg.data.one_vertical("loopfm freshness")
    if slices < 2:
        raise LoopFMError(f"freshness needs at least 2 slices (one FM to be stale, a newer one), got {slices}")
    init_ray(cfg.ray)
    info = SplitInfo.load(run)
    bounds = slice_bounds(run, info, slices)
    stores = []
    for k, cut in enumerate(bounds):
        cutoffs = None if k == slices - 1 else (cut, bounds[k + 1])  # the last is the run's own FM
        log.info("freshness: FM %d/%d trained on events before ts %d", k + 1, slices, cut)
        fm_train_stage(cfg, run, cutoffs=cutoffs)
        stores.append(embed_stage(cfg, run, cutoffs=cutoffs))
    reference = stores[-1]
    aligned, fits = [], []
    for store in stores[:-1]:
        mapped, fit = aligned_store(run, cfg, store, reference, info)
        aligned.append(mapped)
        fits.append(fit)
        log.info("freshness: FM %s aligned onto FM %s: R^2 %.3f on valid events", store.fm_version[:12],
                 reference.fm_version[:12], fit)
    drifting = drifting_store(run, cfg, [*aligned, reference], bounds, sum(info.rows[s] for s in SPLITS))
    rows, per_seed = [], {}
    for name, store in (("stale", stores[0]), ("fixed", reference), ("drifting", drifting)):
        features = features_stage(cfg, run, fm_version=store.fm_version)
        tests = per_seed[name] = [vm.metrics["test"] for vm in train_vms(
            [arm_config(cfg, arm, seed) for seed in range(cfg.experiment.seeds)], run, features)]
        row = {"embeddings": name, "store_version": store.store_version, **window_drift(run, store, bounds),
               "alignment_r2": float(np.mean(fits)) if name == "drifting" else None,
               **{m: summarize(t[m] for t in tests) for m in ("auc", "gauc", "logloss", "ne")}}
        log.info("freshness: %s embeddings: window drift classifier auc %.3f, centroid %.4f; %s test auc %.4f ± %.4f",
                 name, row["classifier_auc"], row["centroid_drift"], arm, row["auc"]["mean"], row["auc"]["std"])
        rows.append(row)
    comparisons = {f"{b}_vs_{a}": {m: paired(improvement(x, y, m) for x, y in zip(per_seed[a], per_seed[b]))
                                   for m in ("auc", "ne")} for a, b in FRESHNESS_PAIRS}
    for key, ev in comparisons.items():
        log.info("freshness: %s: auc %+.4f (95%% CI %+.4f..%+.4f, p %.3g)", key, ev["auc"]["mean"],
                 *ev["auc"]["ci95"], ev["auc"]["p"])
    paths = write_ablation(rows, "embeddings", run.report, "freshness",
                           metrics=("auc", "ne", "classifier_auc", "centroid_drift", "alignment_r2"),
                           comparisons=comparisons)
    log.info("freshness: slices at ts %s; %s", bounds, ", ".join(str(p) for p in paths))
    return rows
