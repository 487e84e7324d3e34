"""User histories -> FM chunks: every event output exactly once, with its receptive field in view."""

from __future__ import annotations

import numpy as np
import pytest

from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, SURFACE, TS, USER_ID, idx
from loopfm.datasets.splits import split_of
from loopfm.fm.chunks import CHUNK_COLUMNS, block_chunks, chunk_counts, chunk_users, has_split


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
    chunks = block_chunks(events, chunk_len, context, valid_start=30, test_start=40)
    out_ids = chunks["event_id"][chunks["out"]]
    assert sorted(out_ids) == sorted(events[EVENT_ID])  # exactly once each
    order = np.lexsort((events[EVENT_ID], events[TS]))
    position = {e: i for i, e in enumerate(events[EVENT_ID][order])}
    for row in range(len(chunks["event_id"])):
        for j in np.flatnonzero(chunks["out"][row]):
            # an output position sees min(its position, context) real predecessors in its chunk
            assert j >= min(position[chunks["event_id"][row, j]], context)
    assert not chunks["out"][chunks["event_id"] == -1].any()  # padding is never output
    assert len(chunks["event_id"]) == chunk_counts(np.array([n]), chunk_len, context)[0]


def plain_prev_label(ts: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The token written plainly for one user's events in (ts, event_id) order: 1 + the label of the
    last event with a strictly smaller ts, 0 when there is none."""
    out = []
    for t in ts:
        earlier = np.flatnonzero(ts < t)
        out.append(label[earlier[-1]] + 1 if len(earlier) else 0)
    return np.array(out, np.int64)


def test_tokens_carry_the_previous_label_never_the_own_one():
    events = user_events(30, seed=3)
    chunks = block_chunks(events, 64, 5, valid_start=30, test_start=40)
    order = np.lexsort((events[EVENT_ID], events[TS]))
    labels = events[LABEL][order]
    row = chunks["prev_label"][0][:30]
    assert row[0] == 0
    np.testing.assert_array_equal(row, plain_prev_label(events[TS][order], labels))
    np.testing.assert_array_equal(chunks["label"][0][:30], labels)


def test_an_event_never_sees_the_label_of_another_event_at_the_same_timestamp():
    """Two events of one user logged at the same ts with different labels: the second one's token
    is the label of the last event strictly before that ts, not the first one's (issue 18)."""
    events = {EVENT_ID: np.array([10, 11, 12, 13, 14]), USER_ID: np.full(5, 3), TS: np.array([100, 200, 200, 200, 300]),
              LABEL: np.array([0, 1, 0, 1, 0]), SURFACE: np.zeros(5, np.int64),
              idx(ITEM_ID): np.arange(5) + 2, idx(CATEGORY): np.full(5, 2)}
    chunks = block_chunks(events, 8, 3, valid_start=1000, test_start=2000)
    # 100 has no predecessor; 200 x3 all see event 10 (label 0 -> 1); 300 sees the last of the ties (label 1 -> 2)
    np.testing.assert_array_equal(chunks["prev_label"][0][:5], [0, 1, 1, 1, 2])
    assert chunks["prev_label"][0][2] != events[LABEL][1] + 1  # event 12 does not carry event 11's click
    # Only ties from its first event: nothing strictly earlier, so blank.
    tied = {k: v[1:4] for k, v in events.items()}
    np.testing.assert_array_equal(block_chunks(tied, 8, 3, 1000, 2000)["prev_label"][0][:3], [0, 0, 0])


def test_prev_labels_is_computed_per_user_on_a_block_of_many_users():
    from loopfm.fm.chunks import prev_labels

    block = block_of_users(SIZES, seed=2)
    order = np.lexsort((block[EVENT_ID], block[TS], block[USER_ID]))
    got = prev_labels(block[USER_ID][order], block[TS][order], block[LABEL][order])
    user, ts, label = block[USER_ID][order], block[TS][order], block[LABEL][order]
    want = np.concatenate([plain_prev_label(ts[user == u], label[user == u]) for u in np.unique(user)])
    np.testing.assert_array_equal(got, want)
    assert prev_labels(np.zeros(0), np.zeros(0), np.zeros(0)).shape == (0,)


def test_split_tags_follow_the_time_boundaries():
    events = user_events(40, seed=1)
    chunks = block_chunks(events, 64, 5, valid_start=30, test_start=40)
    real = chunks["out"]
    ts, split = chunks["ts"][real], chunks["split"][real]
    assert (split == (ts >= 30).astype(int) + (ts >= 40).astype(int)).all()
    assert has_split(chunks, (0,)).all() and not has_split({"out": real & False, "split": chunks["split"]}, (0,)).any()


def reference_user_chunks(events: dict, chunk_len: int, context: int, valid_start: int, test_start: int) -> dict:
    """The chunker written plainly, one user and one chunk at a time: the oracle for the vectorized one."""
    order = np.lexsort((events[EVENT_ID], events[TS]))
    n, stride = len(order), chunk_len - context
    label = events[LABEL][order]
    tokens = {"event_id": events[EVENT_ID][order], "ts": events[TS][order], "item": events[idx(ITEM_ID)][order],
              "category": events[idx(CATEGORY)][order], "surface": events[SURFACE][order],
              "prev_label": plain_prev_label(events[TS][order], label), "label": label,
              "split": split_of(events[TS][order], valid_start, test_start)}
    starts = [0] if n <= chunk_len else list(range(0, n - context, stride))
    rows = {name: [] for name in (*CHUNK_COLUMNS, "user_id")}
    for start in starts:
        for name, values in tokens.items():
            pad = -1 if name in ("event_id", "split") else 0
            row = np.full(chunk_len, pad, np.int64)
            part = values[start:start + chunk_len]
            row[:len(part)] = part
            rows[name].append(row)
        out = np.zeros(chunk_len, bool)
        out[(0 if start == 0 else context):min(chunk_len, n - start)] = True
        rows["out"].append(out)
        rows["user_id"].append(events[USER_ID][0])
    return {name: np.array(v) for name, v in rows.items()}


def block_of_users(sizes: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Events of users 0..len(sizes)-1 (user u has sizes[u] events), rows shuffled together."""
    parts = [user_events(n, seed=seed + u) | {USER_ID: np.full(n, u)} for u, n in enumerate(sizes)]
    offset = 0
    for part in parts:  # event ids unique across users
        part[EVENT_ID] = part[EVENT_ID] + offset
        offset += 10_000
    block = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    shuffle = np.random.default_rng(seed).permutation(len(block[USER_ID]))
    return {k: v[shuffle] for k, v in block.items()}


SIZES = [1, 7, 8, 9, 16, 57, 200, 3, 64]


def assert_chunks_equal(got: dict, sizes: list[int], block: dict, chunk_len: int, context: int) -> None:
    want = [reference_user_chunks({k: v[block[USER_ID] == u] for k, v in block.items()}, chunk_len, context, 30, 40)
            for u in range(len(sizes))]
    for name in (*CHUNK_COLUMNS, "user_id"):
        np.testing.assert_array_equal(np.asarray(got[name]), np.concatenate([w[name] for w in want]), err_msg=name)


@pytest.mark.parametrize("chunk_len, context", [(8, 3), (16, 15), (64, 5)])
def test_block_chunks_equals_the_plain_per_user_chunker_on_a_block_of_many_users(chunk_len, context):
    block = block_of_users(SIZES)
    assert_chunks_equal(block_chunks(block, chunk_len, context, 30, 40), SIZES, block, chunk_len, context)


def test_an_empty_block_gives_no_chunks_of_the_right_shape():
    """A sort partition or a trimmed block can be empty; it must give (0, chunk_len) columns."""
    chunks = block_chunks({k: v[:0] for k, v in block_of_users(SIZES).items()}, 8, 3, 30, 40)
    assert all(chunks[name].shape == (0, 8) for name in CHUNK_COLUMNS) and chunks["user_id"].shape == (0,)


def test_chunk_users_keeps_every_user_whole_and_yields_one_arrow_chunk_per_column(ray_session):
    """Blocks of one contiguous array per column: a block stitched from one piece per user (what
    `map_groups` left) made every batch of 64 chunks gather ~250 pieces, 27x slower to batch."""
    import pandas as pd
    import ray

    block = block_of_users(SIZES, seed=5)
    events = ray.data.from_pandas(pd.DataFrame(block)).repartition(3)  # users spread over blocks
    chunks = chunk_users(events, block_chunks, chunk_len=8, context=3, valid_start=30, test_start=40).materialize()
    tables = [ray.get(ref) for bundle in chunks.iter_internal_ref_bundles() for ref in bundle.block_refs]
    assert len(tables) > 1
    assert all(t.column(name).num_chunks == 1 for t in tables for name in t.column_names)
    got = {name: np.concatenate([t.column(name).to_numpy() if name == "user_id"
                                 else np.stack(t.column(name).to_numpy(zero_copy_only=False)) for t in tables])
           for name in (*CHUNK_COLUMNS, "user_id")}
    order = np.argsort(got["user_id"], kind="stable")  # blocks come in key order, chunks within a user in order
    assert_chunks_equal({k: v[order] for k, v in got.items()}, SIZES, block, 8, 3)
