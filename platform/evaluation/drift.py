"""`loopfm drift`: how far the stored embedding distribution moved, between time slices or stores.

The VM learned to read z from one embedding space; a new FM checkpoint (or a drifting one)
moves that space and silently breaks the VM, while new days through the same checkpoint should
move it only as much as user behaviour moves. Three views of one move, old sample a, new b:

* `centroid_shift`: ||mean(b) - mean(a)||, the freshness study's drift;
* `mean_shift` / `var_shift`: per dimension, |mean difference| in pooled standard deviations and
  |log variance ratio|, averaged over dimensions (which coordinates moved, not just how far);
* `classifier_auc`: held-out AUC of a logistic regression telling a from b (0.5: the two are
  indistinguishable; 1.0: disjoint). It catches rotations that leave the centroid in place.

Comparisons: consecutive time slices of this config's store chain (the full store and its deltas;
`--slices K`), and with `--stores A,B` two store versions on the events both hold (same events,
different FM). Output: `report/drift.{md,json,png}`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from loopfm.config import LoopFMConfig
from loopfm.errors import MissingInputError
from loopfm.evaluation.metrics import auc
from loopfm.evaluation.report import write_ablation
from loopfm.location import fs_path
from loopfm.logs import log
from loopfm.rundir import RunDir
from loopfm.store import codec
from loopfm.store.deltas import open_chain, run_backend
from loopfm.store.parquet import open_store
from loopfm.store.resolve import resolve_store
from loopfm.store.schema import EVENT_ID, TS, StoreManifest, Z


def drift_stats(a: np.ndarray, b: np.ndarray, seed: int = 0, max_rows: int = 20_000) -> dict[str, float]:
    """The three drift views of sample `a` (old) against `b` (new), each (n, width)."""
    rng = np.random.default_rng(seed)
    a, b = (x[rng.permutation(len(x))[:max_rows]].astype(np.float64) for x in (a, b))
    pooled = np.sqrt((a.var(axis=0) + b.var(axis=0)) / 2) + 1e-8
    return {
        "centroid_shift": float(np.linalg.norm(b.mean(axis=0) - a.mean(axis=0))),
        "mean_shift": float(np.mean(np.abs(b.mean(axis=0) - a.mean(axis=0)) / pooled)),
        "var_shift": float(np.mean(np.abs(np.log((b.var(axis=0) + 1e-8) / (a.var(axis=0) + 1e-8))))),
        "classifier_auc": _separability(a, b, rng),
        "rows_old": len(a), "rows_new": len(b),
    }


def _separability(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, steps: int = 300) -> float:
    """Held-out AUC of a logistic regression (Newton-free: plain gradient descent) telling b from a."""
    x = np.concatenate([a, b])
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    x = np.hstack([x, np.ones((len(x), 1))])
    half = len(x) // 2
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x[:half] @ w))
        w -= 0.5 * x[:half].T @ (p - y[:half]) / half
    return float(auc(y[half:], x[half:] @ w))


def read_z(table: pa.Table, manifest: StoreManifest,
           columns=(EVENT_ID, TS)) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(columns, decoded z) of every row of `table` (a store scan holding `columns` and z)."""
    z = codec.decode(codec.binary_to_rows(table[Z], codec.bytes_per_row(manifest.width, manifest.dtype)),
                     manifest.dtype, manifest.width)
    return {c: table[c].to_numpy() for c in columns}, z


def slice_drift(cols: dict[str, np.ndarray], z: np.ndarray, bounds: list[int]) -> list[dict]:
    """drift_stats between consecutive time windows cut at `bounds`."""
    window = np.searchsorted(np.asarray(bounds), cols[TS], side="right")
    rows = []
    for w in range(len(bounds)):
        old, new = z[window == w], z[window == w + 1]
        if len(old) and len(new):
            rows.append({"comparison": f"slice {w} -> {w + 1}", **drift_stats(old, new)})
    return rows


def store_drift(a: tuple, b: tuple) -> dict:
    """drift_stats of two stores' z on the events both hold (each arg: (columns, z) from `read_z`)."""
    (ca, za), (cb, zb) = a, b
    common, ia, ib = np.intersect1d(ca[EVENT_ID], cb[EVENT_ID], return_indices=True)
    if not len(common):
        raise ValueError("the two stores hold no event in common")
    return drift_stats(za[ia], zb[ib])


def drift_stage(cfg: LoopFMConfig, run: RunDir, slices: int = 4, stores: Sequence[str] = ()) -> list[dict]:
    """`loopfm drift [--slices K] [--stores A,B]`: between `slices` time slices of the store chain,
    and between the two store versions of `stores` when given."""
    rows = []
    backend = run_backend(run)
    chain = open_chain(run, *resolve_store(cfg, run))
    cols, z = read_z(backend.scan([(fs_path(p), m) for p, m in chain], [EVENT_ID, TS, Z]), chain[0][1])
    lo, hi = int(cols[TS].min()), int(cols[TS].max())
    bounds = [lo + (hi - lo) * k // slices for k in range(1, slices)]
    rows += slice_drift(cols, z, bounds)
    stores = [v for v in stores if v]
    if stores:
        if len(stores) != 2:
            raise MissingInputError(f"--stores takes two store versions A,B; got {stores}")
        a, b = ((backend.scan(fs_path(run.store(v)), [EVENT_ID, TS, Z]), open_store(run.store(v))) for v in stores)
        rows.append({"comparison": f"store {stores[0]} -> {stores[1]}", **store_drift(read_z(*a), read_z(*b))})
    for row in rows:
        log.info("drift: %-32s centroid %.4f  mean shift %.3f sd  var shift %.3f  classifier auc %.3f",
                 row["comparison"], row["centroid_shift"], row["mean_shift"], row["var_shift"], row["classifier_auc"])
    write_ablation(rows, "comparison", run.report, "drift",
                   metrics=("centroid_shift", "mean_shift", "var_shift", "classifier_auc"))
    return rows
