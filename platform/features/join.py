"""The point-in-time join of one user, in numpy: the rule of DESIGN section 1.3 and nothing else.

For each of the user's vertical events at time t:
- `hist_items`: the last `raw_seq_len` items the user clicked on the vertical with ts < t;
- `seq_z`: the last `seq_len` stored z of the user with ts < t - lag (and ts >= t - retention),
  from the configured surfaces;
- `kd_logit`: the FM logit stored for the event itself.

Both windows are "strictly before": an event at time t never sees anything logged at t, so the
event's own embedding and every other event sharing its timestamp (on any surface) stay out.
Rows are ordered by (ts, event_id), oldest first; windows are left-padded so the real entries
sit at the end. Everything is a searchsorted over the user's sorted rows: no per-event loop.
No Ray here: the stage (`loopfm.features.stage`) runs this once per user group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from loopfm.config import FeaturesConfig


@dataclass(frozen=True)
class JoinSpec:
    """What the join needs from the config and the store, in plain values (cheap to ship to tasks)."""

    seq_len: int
    raw_seq_len: int
    lag: int
    retention: Optional[int]
    surfaces: Optional[tuple[int, ...]]  # None = every surface
    row_bytes: int  # bytes of one stored z

    @classmethod
    def from_config(cls, cfg: FeaturesConfig, row_bytes: int) -> "JoinSpec":
        return cls(cfg.seq_len, cfg.raw_seq_len, cfg.lag, cfg.retention, cfg.surface_filter(), row_bytes)


def rows_before(sorted_ts: np.ndarray, t: np.ndarray) -> np.ndarray:
    """How many of `sorted_ts` are strictly earlier than each t: the leakage boundary."""
    return np.searchsorted(sorted_ts, t, side="left")


def last_window(sorted_ts: np.ndarray, before: np.ndarray, length: int, not_before=None):
    """Indices of the last `length` rows with ts < before (and ts >= not_before), left-padded.

    Returns (index, valid), both (len(before), length); padded slots hold index 0 and valid False.
    """
    end = rows_before(sorted_ts, before)
    start = np.maximum(end - length, 0)
    if not_before is not None:
        start = np.maximum(start, rows_before(sorted_ts, not_before))
    index = end[:, None] - length + np.arange(length)
    valid = index >= start[:, None]
    return np.where(valid, index, 0), valid


def join_user(events: dict[str, np.ndarray], store: dict[str, np.ndarray], spec: JoinSpec) -> dict[str, np.ndarray]:
    """One user's examples.

    events: the user's vertical events: `event_id`, `ts`, `label`, `item_id_idx` (any order).
    store: the user's store rows on every surface: `event_id`, `ts`, `surface`, `fm_logit`,
      `z` (n, row_bytes) uint8.
    Returns, aligned with `events`: `hist_items` (E, raw_seq_len) int64, `seq_z`
    (E, seq_len * row_bytes) uint8, `seq_len_valid` (E,) int32, `kd_logit` (E,) float32 (NaN
    when the store lacks the event).
    """
    seq_z, seq_len_valid = stored_sequence(events["ts"], store, spec)
    return {
        "hist_items": clicked_history(events, spec.raw_seq_len),
        "seq_z": seq_z,
        "seq_len_valid": seq_len_valid,
        "kd_logit": own_logit(events["event_id"], store["event_id"], store["fm_logit"]),
    }


def clicked_history(events: dict[str, np.ndarray], length: int) -> np.ndarray:
    """(E, length) item_id_idx of the user's earlier clicks on the vertical, 0 = padding."""
    t = np.asarray(events["ts"], dtype=np.int64)
    clicked = np.asarray(events["label"]) == 1
    order = np.lexsort((np.asarray(events["event_id"])[clicked], t[clicked]))
    items = np.asarray(events["item_id_idx"], dtype=np.int64)[clicked][order]
    index, valid = last_window(t[clicked][order], t, length)
    history = np.zeros((len(t), length), dtype=np.int64)
    history[valid] = items[index[valid]]
    return history


def stored_sequence(ts: np.ndarray, store: dict[str, np.ndarray], spec: JoinSpec) -> tuple[np.ndarray, np.ndarray]:
    """(E, seq_len * row_bytes) packed z, zero bytes in front for missing, and the real counts."""
    t = np.asarray(ts, dtype=np.int64)
    keep = np.ones(len(store["ts"]), dtype=bool) if spec.surfaces is None else np.isin(store["surface"], spec.surfaces)
    order = np.lexsort((np.asarray(store["event_id"])[keep], np.asarray(store["ts"])[keep]))
    rows = np.asarray(store["z"], dtype=np.uint8).reshape(-1, spec.row_bytes)[keep][order]
    not_before = None if spec.retention is None else t - spec.retention
    sorted_ts = np.asarray(store["ts"], dtype=np.int64)[keep][order]
    index, valid = last_window(sorted_ts, t - spec.lag, spec.seq_len, not_before)
    packed = np.zeros((len(t), spec.seq_len, spec.row_bytes), dtype=np.uint8)
    packed[valid] = rows[index[valid]]
    return packed.reshape(len(t), spec.seq_len * spec.row_bytes), valid.sum(axis=1).astype(np.int32)


def own_logit(event_ids: np.ndarray, store_ids: np.ndarray, store_logits: np.ndarray) -> np.ndarray:
    """The stored FM logit of each event (the KD target), NaN where the store has no such event."""
    out = np.full(len(event_ids), np.nan, dtype=np.float32)
    if len(store_ids):
        order = np.argsort(store_ids)
        ids = np.asarray(store_ids)[order]
        pos = np.minimum(np.searchsorted(ids, event_ids), len(ids) - 1)
        found = ids[pos] == event_ids
        out[found] = np.asarray(store_logits, dtype=np.float32)[order][pos[found]]
    return out
