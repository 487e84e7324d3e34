"""How much of the FM's advantage a channel (KD, rawseq, LoopFM, both) carries into the VM.

Arms: `loopfm.config.ARMS`. Every function here takes metric dicts (or their means) as
`evaluate` returns them, and signs everything so that positive = better, whatever the metric's
direction. `paired` turns per-pair differences into a mean, a 95% confidence interval and a
two-sided p-value: the evidence every claim of the report needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from scipy.stats import t as student_t
from scipy.stats import ttest_1samp, ttest_rel

from loopfm.config import ARMS

__all__ = [
    "ARMS",
    "CHANNELS",
    "ci95",
    "paired",
    "LOWER_IS_BETTER",
    "HIGHER_IS_BETTER",
    "improvement",
    "transfer_ratio",
    "gain_decomposition",
    "paired_ttest",
    "summarize",
]

CHANNELS = tuple(a for a in ARMS if a != "base")
LOWER_IS_BETTER = frozenset({"ne", "logloss"})
HIGHER_IS_BETTER = frozenset({"auc", "gauc"})


def _value(m: Mapping | float, metric: str) -> float:
    return float(m[metric]) if isinstance(m, Mapping) else float(m)


def improvement(a: Mapping | float, b: Mapping | float, metric: str) -> float:
    """How much b improves over a on `metric`; positive = b is better."""
    va, vb = _value(a, metric), _value(b, metric)
    if metric in LOWER_IS_BETTER:
        return va - vb
    if metric in HIGHER_IS_BETTER:
        return vb - va
    raise ValueError(f"unknown metric {metric!r}; known: {sorted(LOWER_IS_BETTER | HIGHER_IS_BETTER)}")


def transfer_ratio(base: Mapping | float, channel: Mapping | float, fm: Mapping | float, metric: str) -> float:
    """TR = (channel's gain over base) / (FM's gain over base): 0 = nothing carried, 1 = all of it.

    For NE this is (NE_base - NE_channel) / (NE_base - NE_fm), as in the paper. NaN when the FM
    is exactly as good as the base VM (no gap to transfer). A negative denominator (FM worse
    than the VM) gives a number too; the report flags that case via its "FM beats base" claim.
    """
    den = improvement(base, fm, metric)
    if den == 0 or math.isnan(den):
        return float("nan")
    return improvement(base, channel, metric) / den


def gain_decomposition(base, kd, loopfm, kd_loopfm, metric: str) -> dict:
    """Gains of each arm over base (positive = better) and their interaction.

    interaction = gain_both - gain_kd - gain_loopfm: > 0 means the channels are complementary
    (together they give more than the sum), < 0 means they overlap.
    """
    g_kd = improvement(base, kd, metric)
    g_lf = improvement(base, loopfm, metric)
    g_both = improvement(base, kd_loopfm, metric)
    return {"gain_kd": g_kd, "gain_loopfm": g_lf, "gain_both": g_both, "interaction": g_both - g_kd - g_lf}


def paired_ttest(a: Iterable[float], b: Iterable[float]) -> float:
    """Two-sided p-value of the paired t-test (seed i of `a` against seed i of `b`).

    Pairs where either value is NaN are dropped (e.g. a seed whose GAUC is undefined).
    NaN when fewer than 2 pairs remain, or when every difference is the same (zero variance:
    the t statistic is undefined, so we say "no test" rather than p = 0 or 1).
    """
    x, y = np.asarray(list(a), np.float64), np.asarray(list(b), np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired test needs equal lengths, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size < 2 or np.var(x - y) == 0:
        return float("nan")
    return float(ttest_rel(x, y).pvalue)


def ci95(values: Iterable[float]) -> tuple[float, float]:
    """Student-t 95% confidence interval of the mean (NaN values dropped; NaN bounds below 2 values)."""
    x = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    if x.size < 2:
        return float("nan"), float("nan")
    half = float(student_t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return float(x.mean() - half), float(x.mean() + half)


def paired(diffs: Iterable[float]) -> dict:
    """Per-pair differences (positive = better) -> mean, 95% CI, two-sided p of mean != 0, n.

    p is NaN below 2 pairs or when every difference is equal (the t statistic is undefined).
    """
    x = np.asarray([d for d in diffs if not math.isnan(d)], np.float64)
    lo, hi = ci95(x)
    p = float("nan") if x.size < 2 or np.var(x) == 0 else float(ttest_1samp(x, 0.0).pvalue)
    return {"mean": float(x.mean()) if x.size else float("nan"), "ci95": [lo, hi], "p": p, "n": int(x.size)}


def summarize(values: Iterable[float]) -> dict:
    """Mean, std (ddof=1; 0 for one value), 95% CI of the mean, n and the values themselves.

    NaN values stay in `values` (so they are visible) but are left out of mean, std, CI and n.
    """
    vals = [float(v) for v in values]
    finite = np.asarray([v for v in vals if not math.isnan(v)], np.float64)
    n = int(finite.size)
    mean = float(finite.mean()) if n else float("nan")
    std = float(finite.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan"))
    return {"mean": mean, "std": std, "ci95": list(ci95(finite)), "n": n, "values": vals}
