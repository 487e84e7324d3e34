"""The peers harness's point-in-time features (benchmarks/peers_features.py): no leak, exact values.

Needs neither scikit-learn nor FuxiCTR. A planted label at the same timestamp must not reach its
twin (a `<=` in place of `<` fails here), and the smoothed rates equal a hand computation.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import peers_features as pf  # noqa: E402  (a plain script folder, not a package)


def log(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label"])


def reference(events: pd.DataFrame, key: str, window: int | None = None) -> tuple[list[int], list[int]]:
    """The rule written as plainly as possible: earlier = same key and ts strictly below."""
    counts, positives = [], []
    for _, row in events.iterrows():
        past = events[(events[key] == row[key]) & (events["ts"] < row["ts"])].sort_values("ts", kind="stable")
        if window is not None:
            past = past.tail(window)
        counts.append(len(past))
        positives.append(int(past["label"].sum()))
    return counts, positives


def test_same_timestamp_label_does_not_leak_and_rates_match_hand_computation():
    # user 1: a positive at t=1, then a positive and a negative that share t=2, then t=3
    events = log([(1, 10, 1, 1), (1, 11, 2, 1), (1, 12, 2, 0), (1, 13, 3, 0), (2, 10, 2, 0)])
    f = pf.point_in_time_features(events, prior=0.5, weight=10.0)
    # the t=2 events see only t=1: one event, one positive; their twin's label is not counted
    assert f["user_log_n"].tolist() == pytest.approx(np.log1p([0, 1, 1, 3, 0]).tolist())
    expected_rate = [0.5, (1 + 5) / (1 + 10), (1 + 5) / (1 + 10), (2 + 5) / (3 + 10), 0.5]
    assert f["user_rate"].tolist() == pytest.approx(expected_rate)
    # item 10: user 1's positive at t=1 is before user 2's event at t=2
    assert f["item_log_n"].tolist() == pytest.approx(np.log1p([0, 0, 0, 0, 1]).tolist())
    assert f["item_rate"].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, (1 + 5) / (1 + 10)])
    # a `<=` rule would give the t=2 negative its twin's positive: rate (2 + 5) / (2 + 10)
    assert f["user_rate"].iloc[2] != pytest.approx((2 + 5) / (2 + 10))
    # row order does not matter
    shuffled = events.sample(frac=1.0, random_state=3)
    again = pf.point_in_time_features(shuffled, prior=0.5, weight=10.0).loc[events.index]
    pd.testing.assert_frame_equal(again, f)


def test_recent_window_counts_the_last_events_only():
    labels = [1] * 5 + [0] * 20  # 25 events, one per second, positives first
    events = log([(7, i, i, y) for i, y in enumerate(labels)])
    f = pf.point_in_time_features(events, prior=0.4, window=20, weight=10.0)
    last = len(labels) - 1  # its past: 24 events, the last 20 of which hold 1 positive (t=4)
    assert f["user_rate_recent"].iloc[last] == pytest.approx((1 + 4) / (20 + 10))
    assert f["user_rate"].iloc[last] == pytest.approx((5 + 4) / (24 + 10))


def test_counts_equal_the_plain_rule_on_random_logs_with_ties():
    rng = np.random.default_rng(0)
    n = 300
    events = log(list(zip(rng.integers(0, 8, n), rng.integers(0, 15, n), rng.integers(0, 40, n),
                          rng.integers(0, 2, n))))
    for key, window in (("user_id", None), ("user_id", 5), ("item_id", None)):
        count, positives = pf.past_counts(events[key].to_numpy(), events["ts"].to_numpy(),
                                          events["label"].to_numpy(), window)
        want_count, want_positives = reference(events, key, window)
        assert count.tolist() == want_count and positives.tolist() == want_positives


def test_positive_history_is_strictly_earlier_oldest_first_and_padded():
    events = log([(1, 10, 1, 1), (1, 11, 2, 1), (1, 12, 2, 1), (1, 13, 3, 0), (1, 14, 4, 1), (2, 15, 4, 1)])
    items, = pf.positive_history(events["user_id"].to_numpy(), events["ts"].to_numpy(),
                                 events["label"].to_numpy(), [events["item_id"].to_numpy()], length=3)
    assert items.tolist() == [
        [0, 0, 0],  # nothing before t=1
        [0, 0, 10],  # t=2: only t=1; the same-ts positive (item 12 / 11) is not in it
        [0, 0, 10],
        [10, 11, 12],  # t=3: the three earlier positives (a tied pair in row order: the sort is stable)
        [10, 11, 12],  # t=4: the t=3 event is a negative
        [0, 0, 0],  # user 2: no past
    ]
