"""No example sees its own moment: every feature column admits only rows strictly earlier than the event.

The data is built to tempt a leak: timestamps take few values, so most events share their ts
with other events of the same user on every surface, and every event has its own row in the
store. Stored z and item indices name their event, so decoding the join's output says exactly
which rows it picked. Each column (the stored sequence, the vertical's label-aware history, the
rawseq slots, the user and item counters) is checked against a brute-force reference; the last
test swaps in a `ts <= t` boundary and shows every check catches it, so they can fail.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from features_reference import (
    join_frames,
    reference_counts,
    reference_sequences,
    reference_window,
    sequence_tags,
    tagged_z,
    unpad,
)

import loopfm.features.join as join
from loopfm.features.join import JoinSpec
from loopfm.store import codec

WIDTH, DTYPE = 8, "int4"
VERTICAL = 0
SPEC = JoinSpec(seq_len=6, raw_seq_len=4, lag=0, retention=None, surfaces=None,
                row_bytes=codec.bytes_per_row(WIDTH, DTYPE), counter_window=3, prior=0.3, prior_strength=2.0)


@pytest.fixture(scope="module")
def tempting_log():
    """(vertical events, every surface's events, store) for 12 users, 5 distinct timestamps, 3 surfaces."""
    rng = np.random.default_rng(7)
    n = 600
    log = pd.DataFrame({
        "event_id": np.arange(1, n + 1),
        "user_id": rng.integers(0, 12, n),
        "item_id": rng.integers(0, 15, n),  # few items: the item counters have history to count
        "ts": rng.integers(0, 5, n) * 100,
        "surface": rng.integers(0, 3, n),
        "label": rng.integers(0, 2, n),
    })
    log["item_id_idx"] = log["event_id"] + 1  # an item index that names its event
    log["category_idx"] = log["event_id"] + 2
    store = log[["event_id", "user_id", "ts", "surface"]].copy()
    store["fm_logit"] = log["event_id"] / 100.0
    store["tag"] = store["event_id"]
    store["z"] = list(tagged_z(store["tag"].to_numpy(), WIDTH, DTYPE))
    events = log[log["surface"] == VERTICAL].reset_index(drop=True)
    return events, log, store


def columns(events, log, store, spec) -> dict:
    """Every feature column of the join, decoded to comparable Python values."""
    out = join_frames(events, store, spec, log, VERTICAL)
    hist_n = (out["hist_labels"] > 0).sum(axis=1)
    raw_n = (out["raw_labels"] > 0).sum(axis=1)
    hist = zip(*(unpad(out[c], hist_n) for c in ("hist_items", "hist_cats", "hist_labels")))
    raw = zip(*(unpad(out[c], raw_n) for c in ("raw_items", "raw_cats", "raw_surfaces", "raw_labels")))
    return {
        "seq": sequence_tags(out["seq_z"], out["seq_len_valid"], spec, WIDTH, DTYPE),
        "hist": [list(zip(*h)) for h in hist],
        "raw": [list(zip(*r)) for r in raw],
        "dense": out["dense"],
    }


def references(events, log, store, spec) -> dict:
    vertical = log[log["surface"] == VERTICAL].assign(label=lambda d: d["label"] + 1)
    tokens = log.assign(surface1=log["surface"] + 1, label=log["label"] + 1)
    return {
        "seq": reference_sequences(events, store, spec.seq_len, spec.lag, spec.retention, spec.surfaces),
        "hist": reference_window(events, vertical, spec.raw_seq_len, ["item_id_idx", "category_idx", "label"],
                                 spec.lag),
        "raw": reference_window(events, tokens, spec.seq_len, ["item_id_idx", "category_idx", "surface1", "label"],
                                spec.lag, spec.retention, spec.surfaces),
        "user": reference_counts(events, "user_id", spec.lag),
        "recent": reference_counts(events, "user_id", spec.lag, spec.counter_window),
        "item": reference_counts(events, "item_id", spec.lag),
    }


def smoothed(counts: np.ndarray, spec) -> np.ndarray:
    return (counts[:, 1] + spec.prior_strength * spec.prior) / (counts[:, 0] + spec.prior_strength)


def mismatches(got: dict, ref: dict, spec) -> dict[str, int]:
    """Examples whose column differs from the brute-force rule, per column."""
    d = got["dense"]
    return {
        "seq_z": sum(a != b for a, b in zip(got["seq"], ref["seq"])),
        "history": sum(a != b for a, b in zip(got["hist"], ref["hist"])),
        "rawseq": sum(a != b for a, b in zip(got["raw"], ref["raw"])),
        "user counters": int((~np.isclose(d[:, 0], np.log1p(ref["user"][:, 0]))
                              | ~np.isclose(d[:, 1], smoothed(ref["user"], spec))).sum()),
        "recent rate": int((~np.isclose(d[:, 2], smoothed(ref["recent"], spec))).sum()),
        "item counters": int((~np.isclose(d[:, 3], np.log1p(ref["item"][:, 0]))
                              | ~np.isclose(d[:, 4], smoothed(ref["item"], spec))).sum()),
    }


def own_moment(events, log, got) -> dict[str, int]:
    """Examples that hold their own event or another event of their own timestamp, per column."""
    ts_of = dict(zip(log["event_id"], log["ts"]))
    found = {"seq_z": 0, "history": 0, "rawseq": 0}
    for (_, t), seq, hist, raw in zip(events[["event_id", "ts"]].itertuples(index=False),
                                            got["seq"], got["hist"], got["raw"]):
        found["seq_z"] += any(ts_of[e] >= t for e in seq)
        found["history"] += any(ts_of[h[0] - 1] >= t for h in hist)
        found["rawseq"] += any(ts_of[r[0] - 1] >= t for r in raw)
    return found


def test_join_takes_only_strictly_earlier_rows(tempting_log):
    events, log, store = tempting_log
    got, ref = columns(events, log, store, SPEC), references(events, log, store, SPEC)
    assert not any(mismatches(got, ref, SPEC).values()), mismatches(got, ref, SPEC)
    assert not any(own_moment(events, log, got).values())
    # The data does tempt a leak: a `ts <= t` rule would pick other rows for most examples.
    leaky = reference_sequences(events, store.assign(ts=store["ts"] - 1), SPEC.seq_len)
    assert sum(a != b for a, b in zip(got["seq"], leaky)) > len(events) // 2


def test_rawseq_fills_exactly_the_slots_of_the_stored_sequence(tempting_log):
    """Same L, surfaces, lag and retention: the control differs from LoopFM only in what fills the slots."""
    events, log, store = tempting_log
    spec = JoinSpec(seq_len=5, raw_seq_len=3, lag=100, retention=300, surfaces=(0, 2), row_bytes=SPEC.row_bytes)
    got, ref = columns(events, log, store, spec), references(events, log, store, spec)
    assert not any(mismatches(got, ref, spec).values()), mismatches(got, ref, spec)
    assert [[r[0] - 1 for r in raw] for raw in got["raw"]] == got["seq"]  # item_id_idx - 1 names the event
    assert sum(len(s) for s in got["seq"]) > len(events)  # the windows are not empty


def test_leak_checks_fail_on_a_leaky_join(tempting_log, monkeypatch):
    """Swap the boundary for `ts <= t`: every column's check must now fail."""
    events, log, store = tempting_log
    ref = references(events, log, store, SPEC)
    monkeypatch.setattr(join, "rows_before", lambda sorted_ts, t: np.searchsorted(sorted_ts, t, side="right"))
    got = columns(events, log, store, SPEC)
    assert all(count > 0 for count in mismatches(got, ref, SPEC).values()), mismatches(got, ref, SPEC)
    assert all(count > 0 for count in own_moment(events, log, got).values()), own_moment(events, log, got)
