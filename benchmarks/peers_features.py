"""Point-in-time features of the peers harness (peers.py), written independently of the pipeline's join.

Why a second implementation: the peers are the control for the platform's own VMs, so they must
not share code (or bugs) with `loopfm.features`. Only numpy and pandas: the unit test
(tests/test_peers_features.py) runs without scikit-learn or FuxiCTR.

The rule, as in serving: an event at time t sees only events with ts < t strictly. Events that
share t (the event itself included) never see each other's labels, whatever their row order.
Every feature is computed over the whole log (train, valid and test together, in time order), so
a test event's history includes the valid and train events before it, as it would at serving time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

WINDOW = 20  # the "recent" counters and the DIN history length
PRIOR_WEIGHT = 10.0  # pseudo-events of the smoothing prior (the train positive rate)
FEATURES = ("user_rate", "user_rate_recent", "user_log_n", "item_log_n", "item_rate")


def past_counts(key: np.ndarray, ts: np.ndarray, label: np.ndarray,
                window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per event: (events, positives) of the same key with ts strictly before its own.

    `window`: only the last `window` of those earlier events. One sort by (key, ts); an event's
    past ends where its (key, ts) tie group starts, so same-ts events are all excluded.
    """
    key, ts, label = np.asarray(key), np.asarray(ts), np.asarray(label, dtype=np.int64)
    n = len(key)
    order = np.lexsort((ts, key))  # by key, then ts
    k, t, y = key[order], ts[order], label[order]
    position = np.arange(n)
    new_key = np.r_[True, k[1:] != k[:-1]] if n else np.zeros(0, bool)
    new_tie = new_key | (np.r_[True, t[1:] != t[:-1]] if n else np.zeros(0, bool))
    key_start = np.maximum.accumulate(np.where(new_key, position, 0)) if n else position
    tie_start = np.maximum.accumulate(np.where(new_tie, position, 0)) if n else position
    first = key_start if window is None else np.maximum(key_start, tie_start - window)
    cumulative = np.r_[0, np.cumsum(y)]
    count, positives = np.empty(n, np.int64), np.empty(n, np.int64)
    count[order] = tie_start - first
    positives[order] = cumulative[tie_start] - cumulative[first]
    return count, positives


def smoothed(positives: np.ndarray, count: np.ndarray, prior: float, weight: float = PRIOR_WEIGHT) -> np.ndarray:
    """(positives + weight * prior) / (count + weight): the prior when there is no past."""
    return (positives + weight * prior) / (count + weight)


def point_in_time_features(events: pd.DataFrame, prior: float, window: int = WINDOW,
                           weight: float = PRIOR_WEIGHT) -> pd.DataFrame:
    """The five counters of every event (same index as `events`: user_id, item_id, ts, label).

    user_rate / user_rate_recent: the user's smoothed positive rate over all earlier events / the
    last `window` of them; user_log_n: log1p(earlier events); item_log_n, item_rate: the item's
    earlier impressions (log1p) and smoothed positive rate. `prior` is the train positive rate.
    """
    user, item = events["user_id"].to_numpy(), events["item_id"].to_numpy()
    ts, label = events["ts"].to_numpy(), events["label"].to_numpy()
    n_user, pos_user = past_counts(user, ts, label)
    n_recent, pos_recent = past_counts(user, ts, label, window)
    n_item, pos_item = past_counts(item, ts, label)
    return pd.DataFrame(
        {
            "user_rate": smoothed(pos_user, n_user, prior, weight),
            "user_rate_recent": smoothed(pos_recent, n_recent, prior, weight),
            "user_log_n": np.log1p(n_user),
            "item_log_n": np.log1p(n_item),
            "item_rate": smoothed(pos_item, n_item, prior, weight),
        },
        index=events.index,
    )


def positive_history(user: np.ndarray, ts: np.ndarray, label: np.ndarray, values: list[np.ndarray],
                     length: int = WINDOW) -> list[np.ndarray]:
    """Per event and per column of `values`: the last `length` values of the user's positives with ts < t.

    Oldest first, left-padded with 0 (the vocabularies' padding index): DIN's click history. The
    k-th event of a user whose past holds p positives gets that user's positives [p - length, p).
    """
    user, ts, label = np.asarray(user), np.asarray(ts), np.asarray(label)
    _, earlier = past_counts(user, ts, label)  # the user's positives strictly before each event
    positive = np.flatnonzero(label == 1)
    order = positive[np.lexsort((ts[positive], user[positive]))]  # positives by (user, ts)
    start = np.searchsorted(user[order], user, side="left")  # the user's first positive in `order`
    slot = np.arange(length)
    index = np.clip(start[:, None] + earlier[:, None] - length + slot[None, :], 0, max(len(order) - 1, 0))
    real = slot[None, :] >= length - np.minimum(earlier, length)[:, None]
    out = []
    for column in values:
        column = np.asarray(column)
        picked = column[order][index] if len(order) else np.zeros(index.shape, column.dtype)
        out.append(np.where(real, picked, 0))
    return out
