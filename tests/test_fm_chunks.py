"""User histories -> FM chunks: every event output exactly once, with its receptive field in view."""

from __future__ import annotations

import numpy as np
import pytest

from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, SURFACE, TS, USER_ID, idx
from loopfm.fm.chunks import chunk_starts, has_split, user_chunks


def user_events(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        EVENT_ID: rng.permutation(n) + 100,
        USER_ID: np.full(n, 7),
        TS: rng.integers(0, 50, n),  # many ties: order is (ts, event_id)
        LABEL: rng.integers(0, 2, n),
        SURFACE: rng.integers(0, 3, n),
        idx(ITEM_ID): rng.integers(2, 40, n),
        idx(CATEGORY): rng.integers(2, 9, n),
    }


@pytest.mark.parametrize("n, chunk_len, context", [(1, 8, 3), (8, 8, 3), (9, 8, 3), (57, 8, 3), (200, 16, 15)])
def test_every_event_is_output_once_with_its_context_before_it(n, chunk_len, context):
    events = user_events(n)
    chunks = user_chunks(events, chunk_len, context, valid_start=30, test_start=40)
    out_ids = chunks["event_id"][chunks["out"]]
    assert sorted(out_ids) == sorted(events[EVENT_ID])  # exactly once each
    order = np.lexsort((events[EVENT_ID], events[TS]))
    position = {e: i for i, e in enumerate(events[EVENT_ID][order])}
    for row in range(len(chunks["event_id"])):
        for j in np.flatnonzero(chunks["out"][row]):
            # an output position sees min(its position, context) real predecessors in its chunk
            assert j >= min(position[chunks["event_id"][row, j]], context)
    assert not chunks["out"][chunks["event_id"] == -1].any()  # padding is never output
    assert len(chunks["event_id"]) == len(chunk_starts(n, chunk_len, context))


def test_tokens_carry_the_previous_label_never_the_own_one():
    events = user_events(30, seed=3)
    chunks = user_chunks(events, 64, 5, valid_start=30, test_start=40)
    order = np.lexsort((events[EVENT_ID], events[TS]))
    labels = events[LABEL][order]
    row = chunks["prev_label"][0][:30]
    assert row[0] == 0
    np.testing.assert_array_equal(row[1:], labels[:-1] + 1)
    np.testing.assert_array_equal(chunks["label"][0][:30], labels)


def test_split_tags_follow_the_time_boundaries():
    events = user_events(40, seed=1)
    chunks = user_chunks(events, 64, 5, valid_start=30, test_start=40)
    real = chunks["out"]
    ts, split = chunks["ts"][real], chunks["split"][real]
    assert (split == (ts >= 30).astype(int) + (ts >= 40).astype(int)).all()
    assert has_split(chunks, (0,)).all() and not has_split({"out": real & False, "split": chunks["split"]}, (0,)).any()
