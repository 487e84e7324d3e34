"""User histories -> fixed-length FM chunks: the unit of FM training and of extraction.

A user's events on every surface, ordered by (ts, event_id), are cut into chunks of `chunk_len`
positions. Chunk k starts at k * stride (stride = chunk_len - context) and *outputs* only the
positions past its first `context` ones (the first chunk outputs all of its own), so every event
is output by exactly one chunk, and it is output with its full receptive field in view: the FM's
windowed causal attention makes that output equal to the single-pass one (tests/test_fm_model.py).

Token of position i: item, category, surface of event i and the label of event i - 1 (the FM
predicts event i's click without seeing it). Columns of a chunk row, each (chunk_len,) but
`user_id`: `event_id` (-1 pad), `ts`, `item`, `category`, `surface`, `prev_label` (0 none,
1 not clicked, 2 clicked), `label`, `split` (0 train, 1 valid, 2 test, -1 pad), `out` (bool).
"""

from __future__ import annotations

import numpy as np

from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, SURFACE, TS, USER_ID, idx
from loopfm.datasets.splits import split_of

TOKENS = ("item", "category", "surface", "prev_label")
CHUNK_COLUMNS = ("event_id", "ts", *TOKENS, "label", "split", "out")
EVENT_COLUMNS = [EVENT_ID, USER_ID, TS, LABEL, SURFACE, idx(ITEM_ID), idx(CATEGORY)]


def chunk_starts(n: int, chunk_len: int, context: int) -> np.ndarray:
    """Input start of every chunk covering n events."""
    stride = chunk_len - context
    if n <= chunk_len:
        return np.zeros(1, dtype=np.int64)
    return np.arange(0, n - context, stride, dtype=np.int64)


def user_chunks(events: dict[str, np.ndarray], chunk_len: int, context: int,
                valid_start: int, test_start: int) -> dict[str, np.ndarray]:
    """One user's events (any order) -> its chunks, a dict of (n_chunks, chunk_len) arrays."""
    order = np.lexsort((events[EVENT_ID], events[TS]))
    n = len(order)
    label = np.asarray(events[LABEL], dtype=np.int64)[order]
    per_event = {
        "event_id": np.asarray(events[EVENT_ID], dtype=np.int64)[order],
        "ts": np.asarray(events[TS], dtype=np.int64)[order],
        "item": np.asarray(events[idx(ITEM_ID)], dtype=np.int64)[order],
        "category": np.asarray(events[idx(CATEGORY)], dtype=np.int64)[order],
        "surface": np.asarray(events[SURFACE], dtype=np.int64)[order],
        "prev_label": np.concatenate([[0], label[:-1] + 1]) if n else label,
        "label": label,
        "split": split_of(np.asarray(events[TS])[order], valid_start, test_start).astype(np.int64),
    }
    starts = chunk_starts(n, chunk_len, context)
    pos = starts[:, None] + np.arange(chunk_len)  # (chunks, chunk_len) event positions
    real = pos < n
    take = np.where(real, pos, 0)
    chunks = {}
    for name, values in per_event.items():
        pad = -1 if name in ("event_id", "split") else 0
        chunks[name] = np.where(real, values[take], pad)
    first_out = np.where(starts == 0, 0, starts + context)
    chunks["out"] = real & (pos >= first_out[:, None])
    chunks["user_id"] = np.full(len(starts), events[USER_ID][0] if n else -1, dtype=np.int64)
    return chunks


def chunk_group(batch: dict[str, np.ndarray], chunk_len: int, context: int,
                valid_start: int, test_start: int) -> dict[str, np.ndarray]:
    """Ray Data `map_groups` fn over one user's event rows."""
    return user_chunks(batch, chunk_len, context, valid_start, test_start)


def build_chunks(run, cfg, cutoffs: tuple[int, int]):
    """All users' chunks over every split, as a lazy Ray Dataset (one shuffle by user).

    `cutoffs` = (valid_start, test_start) tag each position's split: the run's own boundaries,
    or earlier ones for an FM that may only see older events (`loopfm freshness`).
    """
    import ray

    from loopfm.datasets.schema import SPLITS
    from loopfm.datasets.splits import split_paths

    paths = [str(split_paths(run, name)) for name in SPLITS]
    return (
        ray.data.read_parquet(paths, columns=EVENT_COLUMNS)
        .groupby(USER_ID)
        .map_groups(chunk_group, batch_format="numpy",
                    fn_args=(cfg.fm.chunk_len, cfg.fm.context, *cutoffs))
    )


def has_split(batch: dict[str, np.ndarray], which: tuple[int, ...]) -> np.ndarray:
    """Rows (chunks) that output at least one event of the given splits."""
    return (batch["out"] & np.isin(batch["split"], which)).any(axis=1)


def keep_chunks(batch: dict[str, np.ndarray], which: tuple[int, ...]) -> dict[str, np.ndarray]:
    """map_batches fn: only the chunks that output events of the given splits."""
    mask = has_split(batch, which)
    return {k: v[mask] for k, v in batch.items()}
