"""The features stage joins a whole bucket of users at once (`join.join_users`, `stage.join_block`):
it must give every user exactly what `join_user` gives that user alone.

Pure: numpy and Arrow only, no Ray (the stage's Ray plumbing is covered by tests/test_features.py).
The log interleaves users in time and in row order, with ties, users without examples, store rows
missing for some events and an ordering that is not by user, so a slice that reached one row into
a neighbour, or a window over the whole block, would change some history, counter or logit.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from loopfm.features import stage
from loopfm.features.join import USER_EVENT_COLUMNS, JoinSpec, join_user, join_users
from loopfm.features.reader import LIST_COLUMNS
from loopfm.store import codec

VERTICAL = 0
WIDTH, DTYPE = 8, "int4"
SPEC = JoinSpec(seq_len=6, raw_seq_len=4, lag=20, retention=900, surfaces=None,
                row_bytes=codec.bytes_per_row(WIDTH, DTYPE), counter_window=3, prior=0.3)


def block_log(seed: int = 0, users: int = 9, n: int = 700) -> pa.Table:
    """Events of several users in the splits' schema, rows in random order (not by user)."""
    rng = np.random.default_rng(seed)
    user = rng.integers(100, 100 + users, n)
    user[user == 100 + users - 1] = 100  # one id never used: no rows at all for it
    surface = rng.integers(0, 3, n).astype(np.int32)
    surface[user == 101] = 1  # a user with history but no vertical event: no examples
    item = rng.integers(0, 30, n)
    return pa.table({
        "event_id": rng.permutation(n).astype(np.int64) * 3 + 5,
        "user_id": user.astype(np.int64),
        "item_id": item * 11,
        "category": item % 4,
        "surface": surface,
        "ts": rng.integers(0, 60, n).astype(np.int64) * 30,  # many ties across and within users
        "label": (rng.random(n) < 0.4).astype(np.int8),
        "user_id_idx": user.astype(np.int64) - 98,
        "item_id_idx": item + 2,
        "category_idx": item % 4 + 2,
    })


def store_of(log: pa.Table, seed: int = 1) -> pa.Table:
    """Store rows (random z, logits) for most events of every surface; a few are missing."""
    rng = np.random.default_rng(seed)
    keep = rng.random(log.num_rows) < 0.95
    rows = log.filter(pa.array(keep))
    z = codec.encode(rng.uniform(-1, 1, (rows.num_rows, WIDTH)), DTYPE)
    return pa.table({"event_id": rows["event_id"], "user_id": rows["user_id"], "ts": rows["ts"],
                     "surface": rows["surface"], "fm_logit": rng.normal(size=rows.num_rows).astype(np.float32),
                     "z": codec.rows_to_binary(z)})


def numpy_inputs(log: pa.Table, store: pa.Table) -> tuple[dict, dict, dict]:
    """`join_users`' three dicts; the item counters are any per-example values (carried through)."""
    vertical = log.filter(pa.array(log["surface"].to_numpy() == VERTICAL))
    rng = np.random.default_rng(2)
    examples = {"user_id": vertical["user_id"].to_numpy(), "event_id": vertical["event_id"].to_numpy(),
                "ts": vertical["ts"].to_numpy(), "item_n": rng.integers(0, 9, vertical.num_rows).astype(float),
                "item_pos": rng.integers(0, 3, vertical.num_rows).astype(float)}
    events = {c: log[c].to_numpy() for c in ("user_id", *USER_EVENT_COLUMNS)}
    rows = {c: store[c].to_numpy() for c in ("user_id", "event_id", "ts", "surface", "fm_logit")}
    rows["z"] = codec.binary_to_rows(store["z"], SPEC.row_bytes)
    return examples, events, rows


def per_user(examples: dict, events: dict, store: dict, spec: JoinSpec = SPEC) -> dict[str, np.ndarray]:
    """`join_user` called once per user on that user's rows alone (boolean masks), in example order."""
    out: dict[str, np.ndarray] = {}
    for user in np.unique(examples["user_id"]):
        mine = [{k: v[d["user_id"] == user] for k, v in d.items()} for d in (examples, events, store)]
        joined = join_user(*mine, spec, VERTICAL)
        for k, v in joined.items():
            out.setdefault(k, np.zeros((len(examples["user_id"]), *v.shape[1:]), v.dtype))[
                examples["user_id"] == user] = v
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # NaN logits compare equal


def test_the_block_join_gives_every_user_what_join_user_gives_it_alone():
    log = block_log()
    examples, events, store = numpy_inputs(log, store_of(log))
    want = per_user(examples, events, store)
    assert_same(join_users(examples, events, store, SPEC, VERTICAL), want)

    # The log is one that a leak would show in: the block joined as if it were one user differs.
    as_one = join_user(examples, events, store, SPEC, VERTICAL)
    for k in ("hist_items", "raw_items", "seq_z", "dense"):
        assert not np.array_equal(as_one[k], want[k]), k
    assert np.isnan(want["kd_logit"]).any()  # the store misses some: NaN, never another row's logit


def test_the_block_join_does_not_depend_on_row_order():
    log = block_log(seed=3)
    examples, events, store = numpy_inputs(log, store_of(log, seed=4))
    want = join_users(examples, events, store, SPEC, VERTICAL)
    rng = np.random.default_rng(5)
    ev, st = (rng.permutation(len(d["user_id"])) for d in (events, store))
    got = join_users(examples, {k: v[ev] for k, v in events.items()}, {k: v[st] for k, v in store.items()},
                     SPEC, VERTICAL)
    assert_same(got, want)


def test_a_block_without_examples_gives_empty_columns_of_the_usual_types():
    log = block_log(seed=6)
    examples, events, store = numpy_inputs(log, store_of(log))
    full = join_users(examples, events, store, SPEC, VERTICAL)
    none = join_users({k: v[:0] for k, v in examples.items()}, events, store, SPEC, VERTICAL)
    for k, v in full.items():
        assert none[k].shape == (0, *v.shape[1:]) and none[k].dtype == v.dtype, k


@pytest.mark.parametrize("lag", [0, 20])
def test_join_block_on_an_arrow_block_in_the_union_schema(lag):
    """`stage.join_block` over the union rows a user bucket holds (vertical events with their item
    counters and split, other surfaces' events, store rows; shuffled) equals `join_user` per user."""
    spec = JoinSpec(SPEC.seq_len, SPEC.raw_seq_len, lag, SPEC.retention, SPEC.surfaces, SPEC.row_bytes,
                    SPEC.counter_window, SPEC.prior)
    log = block_log(seed=7)
    store = store_of(log, seed=8)
    is_vertical = log["surface"].to_numpy() == VERTICAL
    schema = stage.union_schema(log.schema)
    vertical = stage.item_counters(log.filter(pa.array(is_vertical)), lag)
    block = pa.concat_tables([
        stage.event_rows(vertical, schema, 600, 1200),
        stage.history_rows(log.filter(pa.array(~is_vertical)), schema),
        stage.store_rows(store, schema),
    ])
    block = block.take(np.random.default_rng(9).permutation(block.num_rows))

    out = stage.join_block(block, spec, log.schema.names, VERTICAL)

    assert out.num_rows == int(is_vertical.sum())
    assert all(column.num_chunks == 1 for column in out.columns)
    examples = {c: out[c].to_numpy() for c in ("user_id", "event_id", "ts")}
    by_id = {e: i for i, e in enumerate(vertical["event_id"].to_numpy())}
    at = np.array([by_id[e] for e in examples["event_id"]])
    examples["item_n"], examples["item_pos"] = vertical["item_n"].to_numpy()[at], vertical["item_pos"].to_numpy()[at]
    _, events, rows = numpy_inputs(log, store)
    want = per_user(examples, events, rows, spec)
    for name in LIST_COLUMNS:
        np.testing.assert_array_equal(np.stack(out[name].to_numpy(zero_copy_only=False)), want[name], err_msg=name)
    np.testing.assert_array_equal(codec.binary_to_rows(out["seq_z"], spec.seq_len * spec.row_bytes), want["seq_z"])
    np.testing.assert_array_equal(out["seq_len_valid"].to_numpy(), want["seq_len_valid"])
    np.testing.assert_array_equal(out["kd_logit"].to_numpy(zero_copy_only=False), want["kd_logit"])
    which = (examples["ts"] >= 600).astype(int) + (examples["ts"] >= 1200)
    assert out["split"].to_pylist() == [("train", "valid", "test")[i] for i in which]
    assert out.column_names[:len(log.schema.names)] == log.schema.names
