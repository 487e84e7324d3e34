"""Ranking and calibration metrics for CTR models: AUC, GAUC, log loss, NE.

All functions take plain arrays (numpy, lists, or CPU tensors) and return Python floats, so
the results go straight into JSON. Undefined values are NaN, never an exception: a test
window with one class, or a user with only clicks, is a fact of the data, not a bug.
A NaN score (a diverged model) makes AUC/GAUC NaN instead of being silently ranked.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd
from scipy.special import expit
from scipy.stats import rankdata

__all__ = ["auc", "gauc", "logloss", "ne", "entropy", "evaluate", "MetricAccumulator"]


def _arr(x: Any, dtype=None) -> np.ndarray:
    """Array from numpy/list/torch (duck-typed, so this module never imports torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _binary(label: Any) -> np.ndarray:
    """Labels as bool; anything outside {0, 1} is a caller bug (soft labels are not clicks)."""
    y = _arr(label, np.float64)
    if y.size and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    return y == 1.0


def _same_length(*arrays: np.ndarray) -> None:
    if len({a.shape[0] for a in arrays}) > 1:
        raise ValueError(f"length mismatch: {[a.shape[0] for a in arrays]}")


def auc(label: Any, score: Any) -> float:
    """ROC AUC as the Mann-Whitney statistic; ties count 1/2 (average ranks). NaN if one class."""
    y, s = _binary(label), _arr(score, np.float64)
    _same_length(y, s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return float("nan")
    r_pos = rankdata(s)[y].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(user: Any, label: Any, score: Any) -> float:
    """Per-user AUC averaged with weights = the user's impression count.

    Users with one class only have no AUC and are left out (of the weights too). NaN when
    no user has both classes. One vectorized pass: per-user average ranks (pandas groupby
    rank), then per-user rank sums with bincount.
    """
    u, y, s = _arr(user), _binary(label), _arr(score, np.float64)
    _same_length(u, y, s)
    if y.size == 0 or np.isnan(s).any():
        return float("nan")
    codes, _ = pd.factorize(u)
    ranks = pd.Series(s).groupby(codes).rank(method="average").to_numpy()
    n = np.bincount(codes).astype(np.float64)
    n_pos = np.bincount(codes, weights=y.astype(np.float64))
    r_pos = np.bincount(codes, weights=np.where(y, ranks, 0.0))
    n_neg = n - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per_user = (r_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.average(per_user, weights=n[ok]))


def entropy(p: float) -> float:
    """Binary entropy H(p) in nats; 0 at p in {0, 1}."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return float(-p * np.log(p) - (1.0 - p) * np.log(1.0 - p))


def logloss(label: Any, prob: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (nats) of probabilities clipped to [eps, 1 - eps]."""
    y, p = _binary(label), _arr(prob, np.float64)
    _same_length(y, p)
    if y.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def _normalize(ll: float, y: np.ndarray) -> float:
    h = entropy(float(y.mean())) if y.size else 0.0
    return float(ll / h) if h > 0 else float("nan")


def ne(label: Any, prob: Any) -> float:
    """Normalized entropy: log loss / H(label rate). 1.0 = predicting the base rate; lower is better.

    NaN when the label rate is 0 or 1 (nothing to normalize by).
    """
    y = _binary(label)
    return _normalize(logloss(y, prob), y)


def _logloss_from_logits(y: np.ndarray, z: np.ndarray) -> float:
    """Exact BCE from logits: log(1 + e^z) - y z, no clipping, no overflow."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def evaluate(label: Any, logit: Any, user: Optional[Any] = None) -> dict:
    """All metrics of one model on one set of events, from logits.

    Log loss is computed from the logits directly (exact; the clipped `logloss` would cap a
    confidently wrong prediction at -log(eps)). AUC/GAUC rank the logits, not sigmoid(logit):
    float64 sigmoid saturates to 1.0 above ~37 and would invent ties. `user=None` gives
    gauc = NaN.
    """
    y = _binary(label)
    z = _arr(logit, np.float64)
    _same_length(y, z)
    n = int(y.size)
    ll = _logloss_from_logits(y.astype(np.float64), z) if n else float("nan")
    return {
        "auc": auc(y, z),
        "gauc": gauc(user, y, z) if user is not None else float("nan"),
        "logloss": ll,
        "ne": _normalize(ll, y),
        "n": n,
        "label_rate": float(y.mean()) if n else float("nan"),
        "mean_prob": float(expit(z).mean()) if n else float("nan"),
    }


class MetricAccumulator:
    """Collects (user, label, logit) over streamed batches; `result()` evaluates them all at once.

    AUC and GAUC are not decomposable over batches, so the accumulator keeps the raw columns
    (three numbers per event). For data-parallel training, gather each worker's `arrays()` (or
    `merge` accumulators) on one rank before calling `result()`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._user: list[np.ndarray] = []
        self._label: list[np.ndarray] = []
        self._logit: list[np.ndarray] = []

    def add(self, user: Any, label: Any, logit: Any) -> None:
        u, y, z = _arr(user), _arr(label, np.float64), _arr(logit, np.float64)
        _same_length(u, y, z)
        self._user.append(u)
        self._label.append(y)
        self._logit.append(z)

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        self._user += other._user
        self._label += other._label
        self._logit += other._logit
        return self

    def __len__(self) -> int:
        return int(sum(a.size for a in self._label))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, label, logit) concatenated."""
        if not self._label:
            return np.empty(0, np.int64), np.empty(0), np.empty(0)
        return np.concatenate(self._user), np.concatenate(self._label), np.concatenate(self._logit)

    def result(self) -> dict:
        user, label, logit = self.arrays()
        return evaluate(label, logit, user)
