"""Brute-force references for the feature join tests: docs/DESIGN.md's 'Point-in-time rule' written as plainly
as possible (one event at a time, a filter and a sort), plus stored z that name their event.

`tagged_z` writes each row's tag into the first coordinates of z as base-16 digits; every digit is
an exact INT4 level (and exact in fp16), so decoding a joined sequence says exactly which rows
the join picked.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from loopfm.store import codec

DIGITS = 4  # tags up to 16**4 - 1


def tagged_z(tags: np.ndarray, width: int, dtype: str) -> np.ndarray:
    """(n, bytes_per_row) encoded z whose first DIGITS coordinates spell each tag (> 0)."""
    tags = np.asarray(tags, dtype=np.int64)
    assert tags.min() > 0 and tags.max() < 16**DIGITS and width >= DIGITS
    z = np.zeros((len(tags), width), dtype=np.float32)
    for k in range(DIGITS):
        z[:, k] = ((tags // 16**k) % 16 - 8 + 0.5) / 8
    return codec.encode(z, dtype)


def tags_of(seq: np.ndarray) -> np.ndarray:
    """Decoded z (..., width) -> the tags they spell; all-zero padding reads as 0."""
    digits = np.round(seq[..., :DIGITS] * 8 - 0.5).astype(np.int64) + 8
    tags = sum(digits[..., k] * 16**k for k in range(DIGITS))
    return np.where(np.all(seq == 0, axis=-1), 0, tags)


def reference_sequences(events: pd.DataFrame, store: pd.DataFrame, seq_len: int, lag: int = 0,
                        retention: Optional[int] = None, surfaces=None, key: str = "tag") -> list[list[int]]:
    """For each event, `key` of the last seq_len store rows of its user with ts < t - lag, etc."""
    return [[row[0] for row in window] for window in
            reference_window(events, store, seq_len, [key], lag, retention, surfaces)]


def unpad(matrix: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """Left-padded rows -> their real entries, checking the padding is zeros at the front."""
    out = []
    for row, n in zip(matrix, lengths):
        assert not np.any(row[: len(row) - n]), f"padding is not zeros at the front: {row}"
        out.append([int(v) for v in row[len(row) - n :]])
    return out


def item_counts(events: pd.DataFrame, lag: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The stage's item counters (`counts_before` over the vertical's events by raw item id)."""
    from loopfm.features.join import counts_before

    items, ts = events["item_id"].to_numpy(), events["ts"].to_numpy()
    return counts_before(items, ts, events["label"].to_numpy(), items, ts - lag)


def join_frames(events: pd.DataFrame, store: pd.DataFrame, spec, log: Optional[pd.DataFrame] = None,
                vertical: int = 0) -> dict[str, np.ndarray]:
    """Run `join_user` once per user over data frames; outputs aligned with `events` rows.

    `events`: the vertical's events (the examples); `log`: every surface's events (default:
    `events` alone); store["z"] holds (bytes_per_row,) uint8 arrays. The stage does the same per
    Ray group.
    """
    from loopfm.features.join import join_user

    log = events if log is None else log
    n, pos = item_counts(events, spec.lag)
    events = events.assign(item_n=n, item_pos=pos)
    history = ("event_id", "ts", "surface", "label", "item_id_idx", "category_idx")
    parts, order = [], []
    store_by_user = dict(list(store.groupby("user_id")))
    log_by_user = dict(list(log.groupby("user_id")))
    for user, ev in events.groupby("user_id"):
        st = store_by_user.get(user, store.iloc[:0])
        arrays = {c: st[c].to_numpy() for c in ("event_id", "ts", "surface", "fm_logit")}
        arrays["z"] = np.stack(st["z"].to_list()) if len(st) else np.zeros((0, spec.row_bytes), np.uint8)
        hist = log_by_user[user]
        parts.append(join_user({c: ev[c].to_numpy() for c in ("event_id", "ts", "item_n", "item_pos")},
                               {c: hist[c].to_numpy() for c in history}, arrays, spec, vertical))
        order.append(ev.index.to_numpy())
    position = np.argsort(np.concatenate(order))
    return {k: np.concatenate([p[k] for p in parts])[position] for k in parts[0]}


def reference_window(events: pd.DataFrame, log: pd.DataFrame, length: int, columns: list[str], lag: int = 0,
                     retention: Optional[int] = None, surfaces=None) -> list[list[tuple]]:
    """For each event, `columns` of the last `length` rows of `log` of its user with ts < t - lag
    (and ts >= t - retention, on `surfaces`), oldest first, as tuples."""
    by_user = {u: g.sort_values(["ts", "event_id"]) for u, g in log.groupby("user_id")}
    out = []
    for user, t in zip(events["user_id"], events["ts"]):
        rows = by_user.get(user, log.iloc[:0])
        ok = rows["ts"] < t - lag
        if retention is not None:
            ok &= rows["ts"] >= t - retention
        if surfaces is not None:
            ok &= rows["surface"].isin(surfaces)
        out.append([tuple(int(v) for v in r) for r in rows.loc[ok, columns].to_numpy()[-length:]])
    return out


def reference_counts(events: pd.DataFrame, key: str, lag: int = 0, window: Optional[int] = None) -> np.ndarray:
    """(E, 2): for each event, (count, positives) of the events sharing its `key` with ts < t - lag;
    with `window`, of the last `window` of them."""
    by_key = {k: g.sort_values(["ts", "event_id"]) for k, g in events.groupby(key)}
    out = []
    for k, t in zip(events[key], events["ts"]):
        rows = by_key[k]
        labels = rows.loc[rows["ts"] < t - lag, "label"].to_numpy()
        labels = labels[-window:] if window else labels
        out.append((len(labels), int(labels.sum())))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def sequence_tags(seq_z: np.ndarray, lengths: np.ndarray, spec, width: int, dtype: str) -> list[list[int]]:
    """Joined seq_z bytes -> for each example, the tags of the rows it holds, oldest first.

    Checks that the padding (the first seq_len - length slots) is zero bytes.
    """
    rows = seq_z.reshape(len(seq_z), spec.seq_len, spec.row_bytes)
    padded = np.arange(spec.seq_len)[None, :] < (spec.seq_len - lengths)[:, None]
    assert not rows[padded].any(), "padding slots must be zero bytes"
    tags = tags_of(codec.decode(rows.reshape(-1, spec.row_bytes), dtype, width)).reshape(padded.shape)
    return [[int(v) for v in row[~pad]] for row, pad in zip(tags, padded)]
