"""No example sees its own moment: the join admits only rows strictly earlier than the event.

The data is built to tempt a leak: timestamps take few values, so most events share their ts
with other events of the same user on every surface, and every vertical event has its own row
in the store. Stored z and item indices name their event, so decoding the join's output says
exactly which rows it picked. The last test swaps in a `ts <= t` boundary and shows the checks
catch it, so they can fail.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import loopfm.features.join as join
from features_reference import join_frames, reference_history, reference_sequences, sequence_tags, tagged_z, unpad
from loopfm.features.join import JoinSpec
from loopfm.store import codec

WIDTH, DTYPE = 8, "int4"
VERTICAL = 0
SPEC = JoinSpec(seq_len=6, raw_seq_len=4, lag=0, retention=None, surfaces=None, row_bytes=codec.bytes_per_row(WIDTH, DTYPE))


@pytest.fixture(scope="module")
def tempting_log():
    """(vertical events, store) for 12 users, 5 distinct timestamps, 3 surfaces."""
    rng = np.random.default_rng(7)
    n = 600
    log = pd.DataFrame({
        "event_id": np.arange(1, n + 1),
        "user_id": rng.integers(0, 12, n),
        "ts": rng.integers(0, 5, n) * 100,
        "surface": rng.integers(0, 3, n),
        "label": rng.integers(0, 2, n),
    })
    log["item_id_idx"] = log["event_id"] + 1  # an item that names its event
    store = log[["event_id", "user_id", "ts", "surface"]].copy()
    store["fm_logit"] = log["event_id"] / 100.0
    store["tag"] = store["event_id"]
    store["z"] = list(tagged_z(store["tag"].to_numpy(), WIDTH, DTYPE))
    events = log[log["surface"] == VERTICAL].reset_index(drop=True)
    return events, store


def joined(events, store, spec):
    out = join_frames(events, store, spec)
    seqs = sequence_tags(out["seq_z"], out["seq_len_valid"], spec, WIDTH, DTYPE)
    hist = unpad(out["hist_items"], (out["hist_items"] > 0).sum(axis=1))
    return seqs, hist


def violations(events, store, seqs, hist) -> dict[str, int]:
    """Counts of examples breaking the strict rule, by kind."""
    ts_of = dict(zip(store["event_id"], store["ts"]))
    found = {"own embedding": 0, "same-ts embedding": 0, "own item": 0, "same-ts click": 0}
    own = events[["event_id", "ts", "item_id_idx"]].itertuples(index=False)
    for (event_id, t, item), seq, items in zip(own, seqs, hist):
        found["own embedding"] += event_id in seq
        found["same-ts embedding"] += any(ts_of[e] >= t and e != event_id for e in seq)
        found["own item"] += item in items
        found["same-ts click"] += any(ts_of[i - 1] >= t and i != item for i in items)
    return found


def test_join_takes_only_strictly_earlier_rows(tempting_log):
    events, store = tempting_log
    seqs, hist = joined(events, store, SPEC)

    assert seqs == reference_sequences(events, store, SPEC.seq_len)
    assert hist == reference_history(events, SPEC.raw_seq_len)
    found = violations(events, store, seqs, hist)
    assert not any(found.values()), found
    # The data does tempt a leak: a `ts <= t` rule would pick other rows for most examples.
    leaky = reference_sequences(events, store.assign(ts=store["ts"] - 1), SPEC.seq_len)
    assert sum(a != b for a, b in zip(seqs, leaky)) > len(events) // 2


def test_leak_checks_fail_on_a_leaky_join(tempting_log, monkeypatch):
    """Swap the boundary for `ts <= t`: the same checks must now report every kind of leak."""
    events, store = tempting_log
    monkeypatch.setattr(join, "rows_before", lambda sorted_ts, t: np.searchsorted(sorted_ts, t, side="right"))
    seqs, hist = joined(events, store, SPEC)

    assert seqs != reference_sequences(events, store, SPEC.seq_len)
    assert hist != reference_history(events, SPEC.raw_seq_len)
    found = violations(events, store, seqs, hist)
    assert all(count > 0 for count in found.values()), found
