"""The point-in-time join, in numpy: the rule of docs/DESIGN.md ("Point-in-time rule") and nothing else.

For each of a user's vertical events at time t, with `cut = t - lag`:
- the vertical's own history: the user's last `raw_seq_len` events on the vertical with
  ts < cut: `hist_items`, `hist_cats`, `hist_labels` (1 not clicked, 2 clicked, 0 padding);
- counters (`dense`): the user's past vertical events and their smoothed positive rate, overall
  and over the last `counter_window` events; the item's past vertical impressions and smoothed
  CTR (all users). Every count is over ts < cut;
- `seq_z`: the last `seq_len` stored z of the user with ts < cut (and ts >= t - retention),
  from the configured surfaces (the LoopFM arms);
- `raw_*`: the same slots as `seq_z` (same L, surfaces, lag, retention, same rows: the store
  holds one row per event) filled with the events' raw tokens: item, category, surface, label
  (the `rawseq` control arm: history without the FM);
- `kd_logit`: the FM logit stored for the event itself.

Every window is "strictly before": an event at time t never sees anything logged at t, so the
event itself and every other event sharing its timestamp (on any surface) stay out. Rows are
ordered by (ts, event_id), oldest first; windows are left-padded so the real entries sit at the
end. Everything is a searchsorted over sorted rows: no per-event loop. No Ray here: the stage
(`loopfm.features.stage`) and the serving lookup (`loopfm.serve_apps.lookup`) both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from loopfm.config import FeaturesConfig
from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, SURFACE, TS, idx

DENSE_NAMES = ("user_log_events", "user_rate", "user_recent_rate", "item_log_impressions", "item_ctr")
USER_EVENT_COLUMNS = (EVENT_ID, TS, SURFACE, LABEL, idx(ITEM_ID), idx(CATEGORY))  # what `join_user` reads of events


@dataclass(frozen=True)
class JoinSpec:
    """What the join needs from the config and the store, in plain values (cheap to ship to tasks)."""

    seq_len: int
    raw_seq_len: int
    lag: int
    retention: Optional[int]
    surfaces: Optional[tuple[int, ...]]  # None = every surface
    row_bytes: int  # bytes of one stored z
    counter_window: int = 20
    prior: float = 0.5  # the train label rate of the vertical: where smoothed rates start
    prior_strength: float = 10.0

    @classmethod
    def from_config(cls, cfg: FeaturesConfig, row_bytes: int, prior: float) -> JoinSpec:
        return cls(cfg.seq_len, cfg.raw_seq_len, cfg.lag, cfg.retention, cfg.surface_filter(), row_bytes,
                   cfg.counter_window, float(prior), cfg.prior_strength)

    @classmethod
    def from_manifest(cls, features) -> JoinSpec:
        """The spec a feature set was built with (its `FeaturesManifest`): serving applies the same."""
        surfaces = None if features.surfaces == "all" else tuple(features.surfaces)
        return cls(features.seq_len, features.raw_seq_len, features.lag, features.retention, surfaces,
                   features.bytes_per_row, features.counter_window, features.prior, features.prior_strength)


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


def sort_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows in (ts, event_id) order: the order every window reads."""
    order = np.lexsort((np.asarray(rows["event_id"]), np.asarray(rows["ts"])))
    return {k: np.asarray(v)[order] for k, v in rows.items()}


def _gather(values: np.ndarray, index: np.ndarray, valid: np.ndarray, fill=0) -> np.ndarray:
    out = np.full(index.shape + values.shape[1:], fill, dtype=values.dtype)
    out[valid] = values[index[valid]]
    return out


def vertical_history(t: np.ndarray, vertical: dict[str, np.ndarray], spec: JoinSpec) -> dict[str, np.ndarray]:
    """The user's own vertical history at each t, from `vertical` rows sorted by `sort_rows`.

    `vertical`: `ts`, `label`, `item_id_idx`, `category_idx` of the user's vertical events.
    Returns `hist_items`, `hist_cats`, `hist_labels` (E, raw_seq_len) int64 and the user's
    counts `user_n`, `user_pos`, `recent_n`, `recent_pos` (E,) float64.
    """
    cut = np.asarray(t, dtype=np.int64) - spec.lag
    ts = np.asarray(vertical["ts"], dtype=np.int64)
    labels = np.asarray(vertical["label"], dtype=np.int64)
    index, valid = last_window(ts, cut, spec.raw_seq_len)
    cum = np.concatenate([[0], np.cumsum(labels)])
    n = rows_before(ts, cut)
    recent = np.maximum(n - spec.counter_window, 0)
    return {
        "hist_items": _gather(np.asarray(vertical["item_id_idx"], dtype=np.int64), index, valid),
        "hist_cats": _gather(np.asarray(vertical["category_idx"], dtype=np.int64), index, valid),
        "hist_labels": _gather(labels + 1, index, valid),
        "user_n": n.astype(np.float64), "user_pos": cum[n].astype(np.float64),
        "recent_n": (n - recent).astype(np.float64), "recent_pos": (cum[n] - cum[recent]).astype(np.float64),
    }


def counts_before(keys: np.ndarray, ts: np.ndarray, labels: np.ndarray, query_keys: np.ndarray,
                  query_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query (key, t): how many rows of that key have ts < t, and how many of them are positive.

    Rows and queries may be in any order and hold many keys (one block of items at once): ts is
    replaced by its rank among the rows, so (key, ts) packs into one sortable int64 and one
    searchsorted answers every query.
    """
    keys, ts = np.asarray(keys, dtype=np.int64), np.asarray(ts, dtype=np.int64)
    uniq_keys, key_code = np.unique(keys, return_inverse=True)
    uniq_ts, ts_rank = np.unique(ts, return_inverse=True)
    span = np.int64(len(uniq_ts) + 1)
    packed = key_code.astype(np.int64) * span + ts_rank
    order = np.argsort(packed, kind="stable")
    packed = packed[order]
    cum = np.concatenate([[0], np.cumsum(np.asarray(labels, dtype=np.int64)[order])])
    q_keys = np.asarray(query_keys, dtype=np.int64)
    q_code = np.minimum(np.searchsorted(uniq_keys, q_keys), max(len(uniq_keys) - 1, 0))
    known = uniq_keys[q_code] == q_keys if len(uniq_keys) else np.zeros(len(q_keys), dtype=bool)
    q_first = q_code.astype(np.int64) * span
    first = np.searchsorted(packed, q_first, side="left")
    end = np.searchsorted(packed, q_first + rows_before(uniq_ts, query_t), side="left")
    n = np.where(known, end - first, 0)
    pos = np.where(known, cum[end] - cum[first], 0)
    return n.astype(np.float64), pos.astype(np.float64)


class ItemHistory:
    """The vertical's events by raw item id, for the item counters at any time t (serving).

    Gives what `counts_before` gives the stage, for a few candidate items at once, without
    re-sorting the log per request.
    """

    def __init__(self, items: np.ndarray, ts: np.ndarray, labels: np.ndarray):
        order = np.lexsort((np.asarray(ts), np.asarray(items)))
        self.ts = np.asarray(ts, dtype=np.int64)[order]
        self.cum = np.concatenate([[0], np.cumsum(np.asarray(labels, dtype=np.int64)[order])])
        items = np.asarray(items, dtype=np.int64)[order]
        self.keys, self.starts = np.unique(items, return_index=True)
        self.ends = np.append(self.starts[1:], len(items)).astype(np.int64)

    def counts(self, items: np.ndarray, t: int, lag: int) -> tuple[np.ndarray, np.ndarray]:
        """(impressions, positives) of each item with ts < t - lag; 0 for items never logged."""
        items = np.asarray(items, dtype=np.int64)
        n, pos = np.zeros(len(items)), np.zeros(len(items))
        at = np.minimum(np.searchsorted(self.keys, items), max(len(self.keys) - 1, 0))
        for i, (item, k) in enumerate(zip(items, at)):
            if len(self.keys) and self.keys[k] == item:
                s, e = self.starts[k], self.ends[k]
                before = int(rows_before(self.ts[s:e], np.array([t - lag]))[0])
                n[i], pos[i] = before, self.cum[s + before] - self.cum[s]
        return n, pos


def dense_features(user: dict[str, np.ndarray], item_n: np.ndarray, item_pos: np.ndarray,
                   spec: JoinSpec) -> np.ndarray:
    """(E, len(DENSE_NAMES)) float32: log counts and rates smoothed toward the train label rate."""
    a, p = spec.prior_strength, spec.prior

    def rate(pos, n):
        return (pos + a * p) / (n + a)

    columns = [np.log1p(user["user_n"]), rate(user["user_pos"], user["user_n"]),
               rate(user["recent_pos"], user["recent_n"]), np.log1p(item_n), rate(item_pos, item_n)]
    return np.stack(columns, axis=1).astype(np.float32)


def raw_sequence(t: np.ndarray, events: dict[str, np.ndarray], spec: JoinSpec) -> dict[str, np.ndarray]:
    """The `rawseq` slots at each t: the user's last `seq_len` events (configured surfaces, ts < t - lag,
    ts >= t - retention) as raw tokens, from `events` sorted by `sort_rows`.

    `events`: `ts`, `surface`, `label`, `item_id_idx`, `category_idx` of the user's events on
    every surface. Returns `raw_items`, `raw_cats`, `raw_surfaces` (surface + 1), `raw_labels`
    (label + 1), each (E, seq_len) int64 with 0 as padding.
    """
    keep = _surface_mask(events["surface"], spec)
    index, valid = _sequence_window(t, np.asarray(events["ts"], dtype=np.int64)[keep], spec)
    take = {"raw_items": events["item_id_idx"], "raw_cats": events["category_idx"],
            "raw_surfaces": np.asarray(events["surface"]) + 1, "raw_labels": np.asarray(events["label"]) + 1}
    return {k: _gather(np.asarray(v, dtype=np.int64)[keep], index, valid) for k, v in take.items()}


def stored_sequence(t: np.ndarray, store: dict[str, np.ndarray], spec: JoinSpec) -> tuple[np.ndarray, np.ndarray]:
    """(E, seq_len * row_bytes) packed z, zero bytes in front for missing, and the real counts.

    `store`: the user's store rows sorted by `sort_rows`: `ts`, `surface`, `z` (n, row_bytes) uint8.
    """
    keep = _surface_mask(store["surface"], spec)
    index, valid = _sequence_window(t, np.asarray(store["ts"], dtype=np.int64)[keep], spec)
    rows = np.asarray(store["z"], dtype=np.uint8).reshape(-1, spec.row_bytes)[keep]
    packed = _gather(rows, index, valid)
    return packed.reshape(len(index), spec.seq_len * spec.row_bytes), valid.sum(axis=1).astype(np.int32)


def _surface_mask(surface: np.ndarray, spec: JoinSpec) -> np.ndarray:
    surface = np.asarray(surface)
    return np.ones(len(surface), dtype=bool) if spec.surfaces is None else np.isin(surface, spec.surfaces)


def _sequence_window(t: np.ndarray, sorted_ts: np.ndarray, spec: JoinSpec):
    """The one window rule that `seq_z` and `raw_*` share: that is what makes rawseq a fair control."""
    t = np.asarray(t, dtype=np.int64)
    not_before = None if spec.retention is None else t - spec.retention
    return last_window(sorted_ts, t - spec.lag, spec.seq_len, not_before)


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


def join_user(examples: dict[str, np.ndarray], events: dict[str, np.ndarray], store: dict[str, np.ndarray],
              spec: JoinSpec, vertical: int) -> dict[str, np.ndarray]:
    """One user's examples.

    examples: the user's vertical events to build rows for: `event_id`, `ts`, `item_n`,
      `item_pos` (the item counters, from `counts_before` over the whole vertical).
    events: the user's events on every surface: `event_id`, `ts`, `surface`, `label`,
      `item_id_idx`, `category_idx`.
    store: the user's store rows on every surface: `event_id`, `ts`, `surface`, `fm_logit`,
      `z` (n, row_bytes) uint8.
    Returns the feature columns aligned with `examples` (see the module docstring).
    """
    t = np.asarray(examples["ts"], dtype=np.int64)
    events = sort_rows(events)
    on_vertical = np.asarray(events["surface"]) == vertical
    user = vertical_history(t, {k: v[on_vertical] for k, v in events.items()}, spec)
    seq_z, seq_len_valid = stored_sequence(t, sort_rows(store), spec)
    return {
        "hist_items": user["hist_items"], "hist_cats": user["hist_cats"], "hist_labels": user["hist_labels"],
        "dense": dense_features(user, examples["item_n"], examples["item_pos"], spec),
        **raw_sequence(t, events, spec),
        "seq_z": seq_z,
        "seq_len_valid": seq_len_valid,
        "kd_logit": own_logit(examples["event_id"], store["event_id"], store["fm_logit"]),
    }


def join_users(examples: dict[str, np.ndarray], events: dict[str, np.ndarray], store: dict[str, np.ndarray],
               spec: JoinSpec, vertical: int) -> dict[str, np.ndarray]:
    """The examples of many users at once (one user bucket of the stage), by `join_user`.

    The same three dicts as `join_user`, each with a `user_id` column, holding every row of each
    of their users (the stage buckets by user, so a user is whole in one bucket). One stable argsort per
    dict groups the rows by user, and one searchsorted finds every user's slice, so each
    `join_user` call gets views of exactly its own rows, never a filter per user. Users without
    examples give no rows. Returns the feature columns aligned with `examples` in its order.
    """
    ex_order = np.argsort(np.asarray(examples["user_id"]), kind="stable")
    ex = {k: np.asarray(v)[ex_order] for k, v in examples.items()}
    ev = _by_user(events)
    st = _by_user(store)
    users, first = np.unique(ex["user_id"], return_index=True)
    bounds = zip(first, np.append(first[1:], len(ex_order)),
                 *_slices(ev["user_id"], users), *_slices(st["user_id"], users))
    parts = [join_user({k: v[a:b] for k, v in ex.items()}, {k: v[c:d] for k, v in ev.items()},
                       {k: v[e:f] for k, v in st.items()}, spec, vertical) for a, b, c, d, e, f in bounds]
    if not parts:  # no examples in the block: empty columns of the right shapes and types
        parts = [join_user(ex, {k: v[:0] for k, v in ev.items()}, {k: v[:0] for k, v in st.items()}, spec, vertical)]
    back = np.empty_like(ex_order)
    back[ex_order] = np.arange(len(ex_order))
    return {k: np.concatenate([p[k] for p in parts])[back] for k in parts[0]}


def _by_user(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(np.asarray(rows["user_id"]), kind="stable")
    return {k: np.asarray(v)[order] for k, v in rows.items()}


def _slices(sorted_users: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of each of `users` in `sorted_users` (empty where a user has no rows)."""
    return np.searchsorted(sorted_users, users, side="left"), np.searchsorted(sorted_users, users, side="right")
