"""User histories -> fixed-length FM chunks: the unit of FM training and of extraction.

A user's events on every surface, ordered by (ts, event_id), are cut into chunks of `chunk_len`
positions. Chunk k starts at k * stride (stride = chunk_len - context) and *outputs* only the
positions past its first `context` ones (the first chunk outputs all of its own), so every event
is output by exactly one chunk, and it is output with its full receptive field in view: the FM's
windowed causal attention makes that output equal to the single-pass one (tests/test_fm_model.py).

Token of position i: item, category, surface of event i and the label of the user's last event
strictly earlier in time (`prev_labels`): the FM predicts event i's click without seeing it, nor
the label of any event logged at the same timestamp, which a server would not know yet either.
Columns of a chunk row, each (chunk_len,) but `user_id`: `event_id` (-1 pad), `ts`, `item`,
`category`, `surface`, `prev_label` (0 none, 1 not clicked, 2 clicked), `label`, `split`
(0 train, 1 valid, 2 test, -1 pad), `out` (bool).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import ray

from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, SPLITS, SURFACE, TS, USER_ID, idx
from loopfm.datasets.splits import split_of, split_paths
from loopfm.location import as_location, parquet_dataset
from loopfm.ordering import sort_boundaries

TOKENS = ("item", "category", "surface", "prev_label")
CHUNK_COLUMNS = ("event_id", "ts", *TOKENS, "label", "split", "out")
EVENT_COLUMNS = [EVENT_ID, USER_ID, TS, LABEL, SURFACE, idx(ITEM_ID), idx(CATEGORY)]
ROWS_PER_PARTITION = 1 << 16  # events per sort partition: far below a block's size limit, so none is split


def chunk_counts(n: np.ndarray, chunk_len: int, context: int) -> np.ndarray:
    """How many chunks cover a user of n events: 1 up to chunk_len, then one per stride."""
    stride = chunk_len - context
    return np.where(n <= chunk_len, 1, -(-(n - context) // stride))


def runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal values in sorted `keys`: (first row of each, its length, each row's rank in its run)."""
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[first, len(keys)])
    return first, counts, np.arange(len(keys)) - np.repeat(first, counts)


def prev_labels(user: np.ndarray, ts: np.ndarray, label: np.ndarray) -> np.ndarray:
    """`prev_label` token of every row of events sorted by (user, ts, event_id): 1 + the label of
    the user's last event with a strictly earlier ts, 0 when there is none.

    Every row of a run of equal (user, ts) gets the same value, from the row just before the run:
    with the previous *row* instead, an event would see the label of another event logged at the
    same instant (coarse timestamps make those common). The one place the token is computed, so
    training, extraction, incremental embedding and freshness cannot disagree on it.
    """
    label = np.asarray(label, dtype=np.int64)
    if not len(label):
        return np.zeros(0, np.int64)
    user, ts = np.asarray(user), np.asarray(ts)
    first = np.flatnonzero(np.r_[True, (user[1:] != user[:-1]) | (ts[1:] != ts[:-1])])
    before = np.maximum(first - 1, 0)
    value = np.where((first > 0) & (user[before] == user[first]), label[before] + 1, 0)
    return np.repeat(value, np.diff(np.r_[first, len(label)]))


def block_chunks(events: dict[str, np.ndarray], chunk_len: int, context: int,
                 valid_start: int, test_start: int) -> dict[str, np.ndarray]:
    """Every user's chunks from a block of event rows holding each of its users whole.

    One vectorized pass over the block (users in id order, each user's chunks in order), where a
    `map_groups` call per user cost ~1 ms each and left blocks of one Arrow chunk per user, which
    every later batch had to stitch together again (tests/test_fm_chunks.py).

    A `prev_label` column in `events`, when present, is taken as is: incremental embedding computes
    it over more of a user's history than the rows it chunks.
    """
    order = np.lexsort((events[EVENT_ID], events[TS], events[USER_ID]))
    user = np.asarray(events[USER_ID])[order]
    first, counts, _ = runs(user)
    per_user = chunk_counts(counts, chunk_len, context)
    owner = np.repeat(np.arange(len(first)), per_user)  # the user of every chunk
    starts = (np.arange(len(owner)) - np.repeat(np.cumsum(per_user) - per_user, per_user)) * (chunk_len - context)
    local = starts[:, None] + np.arange(chunk_len)  # (chunks, chunk_len) positions in the user's history
    real = local < counts[owner][:, None]
    take = np.where(real, first[owner][:, None] + local, 0)

    label = np.asarray(events[LABEL], dtype=np.int64)[order]
    ts = np.asarray(events[TS], dtype=np.int64)[order]
    prev_label = (np.asarray(events["prev_label"], dtype=np.int64)[order] if "prev_label" in events
                  else prev_labels(user, ts, label))
    per_event = {
        "event_id": np.asarray(events[EVENT_ID], dtype=np.int64)[order],
        "ts": ts,
        "item": np.asarray(events[idx(ITEM_ID)], dtype=np.int64)[order],
        "category": np.asarray(events[idx(CATEGORY)], dtype=np.int64)[order],
        "surface": np.asarray(events[SURFACE], dtype=np.int64)[order],
        "prev_label": prev_label,
        "label": label,
        "split": split_of(ts, valid_start, test_start).astype(np.int64),
    }
    chunks = {}
    for name, values in per_event.items():
        pad = -1 if name in ("event_id", "split") else 0
        chunks[name] = np.where(real, values[take], pad)
    first_out = np.where(starts == 0, 0, starts + context)
    chunks["out"] = real & (local >= first_out[:, None])
    chunks["user_id"] = user[first][owner].astype(np.int64)
    return chunks


def file_boundaries(paths: list[str], rows_per_partition: int = ROWS_PER_PARTITION) -> list[int]:
    """Sort boundaries for `chunk_users` from the user id of every event in these parquet files or
    folders (reads the user column only): partitions of about `rows_per_partition` events."""
    files = [str(f) for p in map(as_location, paths) for f in (sorted(p.rglob("*.parquet")) if p.is_dir() else [p])]
    users = parquet_dataset(files).to_table(columns=[USER_ID])[USER_ID].to_numpy()
    return sort_boundaries(users, rows_per_partition)


def chunk_users(events, fn, boundaries: Optional[list[int]] = None, **fn_kwargs):
    """Ray Dataset of event rows -> Dataset of chunks: sort by user, then `fn` over whole blocks.

    The sort's reduce writes one block per key range, so no user straddles two blocks (what Ray
    Data's own `map_groups` relies on); `batch_size=None` hands `fn` each block whole. The reduce
    splits a partition past `target_max_block_size`, so `boundaries` (`ordering.sort_boundaries`) keep
    partitions far smaller, and make them the same on every run; without them Ray samples its own.
    """
    return events.sort(USER_ID, boundaries=boundaries).map_batches(
        fn, batch_size=None, batch_format="numpy", fn_kwargs=fn_kwargs)


def build_chunks(run, cfg, cutoffs: tuple[int, int]):
    """All users' chunks over every split, as a lazy Ray Dataset (one shuffle by user), in the
    same blocks on every run (create it inside `ordering.ordered_data` to keep their order too).

    `cutoffs` = (valid_start, test_start) tag each position's split: the run's own boundaries,
    or earlier ones for an FM that may only see older events (`loopfm freshness`).
    """
    paths = [str(split_paths(run, name)) for name in SPLITS]
    return chunk_users(ray.data.read_parquet(paths, columns=EVENT_COLUMNS), block_chunks, file_boundaries(paths),
                       chunk_len=cfg.fm.chunk_len, context=cfg.fm.context,
                       valid_start=cutoffs[0], test_start=cutoffs[1])


def has_split(batch: dict[str, np.ndarray], which: tuple[int, ...]) -> np.ndarray:
    """Rows (chunks) that output at least one event of the given splits."""
    return (batch["out"] & np.isin(batch["split"], which)).any(axis=1)


def keep_chunks(batch: dict[str, np.ndarray], which: tuple[int, ...]) -> dict[str, np.ndarray]:
    """map_batches fn: only the chunks that output events of the given splits."""
    mask = has_split(batch, which)
    return {k: v[mask] for k, v in batch.items()}
