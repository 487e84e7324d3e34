"""The feature lookup: each user's stored FM embeddings, history and counters, cut at the request time.

`FeatureTable` holds, in memory and sorted once at load:
- the store rows of the VM's store version (only the surfaces the features used), per user by
  (ts, event_id): `ts`, `surface` and the packed `z` bytes exactly as stored (int4 / fp16);
- the store's deltas too (`loopfm embed --incremental`): the chain `open_chain` verifies;
- every event of the log from the run's splits (all three: at serving time all of the log is
  history) and appended batches (`loopfm logs append`), per user by (ts, event_id): the
  vertical's label-aware history, the user counters and the rawseq slots come from these;
- the vertical's events by raw item id (`ItemHistory`), for the item counters;
- an item catalog (raw item id -> category index, from the item's latest logged event) and each
  user's latest value of every categorical context column (the default when a request omits it);
- the vocabularies, so raw ids map to the indices the VM was trained with (unknown -> OOV).

At request time t it calls the functions of `loopfm.features.join` that the features stage calls,
with the feature set's own `JoinSpec`, so a test example posted with its own time gets its training
features. A user the log has never seen gets empty windows and zero counts: the cold-start path.
The FM is never called: every z was stored when its event happened. `LiveTable` keeps one table
current (background reload when the store or the log grows) inside the scoring replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import numpy as np
import pyarrow as pa

from loopfm.datasets.append import appended_batches
from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, OOV_INDEX, SPLITS, SURFACE, TS, USER_ID, idx
from loopfm.datasets.splits import SplitInfo, split_paths
from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.features.join import (
    USER_EVENT_COLUMNS,
    ItemHistory,
    JoinSpec,
    dense_features,
    raw_sequence,
    stored_sequence,
    vertical_history,
)
from loopfm.features.reader import DENSE, HISTORY_COLUMNS, RAW_COLUMNS, SEQ_LEN_VALID, SEQ_Z
from loopfm.location import AnyPath, as_path, fs_path, parquet_dataset
from loopfm.rundir import committed
from loopfm.serve_apps.bundle import Bundle
from loopfm.store import codec
from loopfm.store.deltas import chain_max_ts, delta_paths, open_chain, run_backend
from loopfm.store.parquet import open_store
from loopfm.store.schema import Z

TS_KEY = "ts"
logger = logging.getLogger("ray.serve")


class _PerUser:
    """Rows sorted by user: the slice of one user's rows by binary search."""

    def __init__(self, users_sorted: np.ndarray):
        self.users, self.starts = np.unique(users_sorted, return_index=True)
        self.ends = np.append(self.starts[1:], len(users_sorted)).astype(np.int64)

    def rows(self, user: int) -> slice:
        i = int(np.searchsorted(self.users, user))
        if i < len(self.users) and self.users[i] == user:
            return slice(int(self.starts[i]), int(self.ends[i]))
        return slice(0, 0)

    def __len__(self) -> int:
        return len(self.users)


def _read(paths: list[AnyPath], columns: list[str]) -> pa.Table:
    return parquet_dataset(paths).to_table(columns=columns)


class FeatureTable:
    def __init__(self, bundle: Bundle):
        started = time.time()
        self.bundle = bundle
        run, vm, features = bundle.run, bundle.vm, bundle.features
        info = SplitInfo.load(run)
        if features.splits_fingerprint != info.fingerprint:
            raise VersionMismatchError(f"features {features.fingerprint} were built from splits "
                                       f"{features.splits_fingerprint}, the run holds splits {info.fingerprint}")
        self.context_names = list(info.categorical)
        if [idx(c) for c in self.context_names] != list(vm.context_columns):
            raise VersionMismatchError(f"VM {vm.model_version} reads context {vm.context_columns}, the splits have "
                                       f"{[idx(c) for c in self.context_names]}")
        self.vocab = {c: info.vocab(run, c) for c in (USER_ID, ITEM_ID, *self.context_names)}
        self.category_vocab = info.vocab(run, CATEGORY)
        self.spec = JoinSpec.from_manifest(features)
        self.vertical = features.vertical
        self._load_events(run)
        self.with_seq = vm.store_version is not None
        self.store_rows = 0
        self.store_chain: list[str] = []  # the store version, then each delta's, as loaded
        self.newest_event_ts: Optional[int] = None
        self.row_bytes = features.bytes_per_row
        if self.with_seq:
            self._load_store(bundle)
        self.loaded_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.load_seconds = round(time.time() - started, 2)

    # -- loading ----------------------------------------------------------------------------
    def _load_events(self, run) -> None:
        paths = []
        for name in SPLITS:
            paths += sorted(split_paths(run, name).rglob("*.parquet"))  # the committed split
        if not paths:
            raise MissingInputError(f"no split files under {run.splits}")
        cols = [EVENT_ID, USER_ID, ITEM_ID, TS, LABEL, SURFACE, idx(ITEM_ID), idx(CATEGORY), *self.context_names]
        t = _read(paths, cols)
        ev = {c: t[c].to_numpy() for c in cols}
        batches = appended_batches(run)
        self.log_head = batches[-1].name if batches else None  # the newest appended batch loaded
        appended = [f for batch in batches for f in sorted(committed(batch).glob("*.parquet"))]
        if appended:  # events logged after the split (`loopfm logs append`): ids through the run's vocabulary
            a = _read(appended, [CATEGORY, *(c for c in cols if c not in (idx(ITEM_ID), idx(CATEGORY)))])
            new = {c: a[c].to_numpy() for c in a.column_names}
            new[idx(ITEM_ID)] = self.vocab[ITEM_ID].lookup(new[ITEM_ID])
            new[idx(CATEGORY)] = self.category_vocab.lookup(new[CATEGORY])
            ev = {c: np.concatenate([ev[c], new[c]]) for c in cols}
        self.appended_count = len({f.parent for f in appended})
        # item catalog: raw item id -> category index of the item's latest event
        order = np.lexsort((ev[EVENT_ID], ev[TS], ev[ITEM_ID]))
        items = ev[ITEM_ID][order]
        last = np.append(items[1:] != items[:-1], True)
        self.catalog_items = items[last].astype(np.int64)
        self.catalog_category = ev[idx(CATEGORY)][order][last].astype(np.int64)
        # each user's latest categorical context values (defaults for requests that omit them)
        order = np.lexsort((ev[EVENT_ID], ev[TS], ev[USER_ID]))
        users = ev[USER_ID][order]
        last = np.append(users[1:] != users[:-1], True)
        self.context_users = users[last].astype(np.int64)
        self.context_latest = {c: ev[c][order][last].astype(np.int64) for c in self.context_names}
        # every event per user by (ts, event_id): history, user counters and rawseq slots
        order = np.lexsort((ev[EVENT_ID], ev[TS], ev[USER_ID]))
        self.history = {c: np.asarray(ev[c][order], dtype=np.int64) for c in USER_EVENT_COLUMNS}
        self.users = _PerUser(ev[USER_ID][order])
        vertical = ev[SURFACE] == self.vertical
        self.items = ItemHistory(ev[ITEM_ID][vertical], ev[TS][vertical], ev[LABEL][vertical])
        self.events = len(ev[EVENT_ID])

    def _load_store(self, bundle: Bundle) -> None:
        f = bundle.features
        path = bundle.store_dir
        if path is None or not (as_path(path) / "manifest.json").is_file():
            raise MissingInputError(f"no store at {path} (the VM {bundle.vm.model_version} reads store version "
                                    f"{bundle.vm.store_version})")
        manifest = open_store(path, {"width": f.width, "dtype": f.dtype})
        if manifest.store_version != bundle.vm.store_version:
            raise VersionMismatchError(
                f"store at {path} is version {manifest.store_version}, but VM {bundle.vm.model_version} was "
                f"trained on store version {bundle.vm.store_version}: serve the VM with its own store")
        # the store and its deltas (`embed --incremental`), every link checked
        chain = open_chain(bundle.run, path, manifest)
        self.store_manifest = manifest
        self.store_chain = [m.store_version for _, m in chain]
        self.newest_event_ts = chain_max_ts(chain)
        table = run_backend(bundle.run).scan([(fs_path(p), m) for p, m in chain],
                                             [USER_ID, TS, EVENT_ID, SURFACE, Z])
        user, ts, event_id, surface = (table[c].to_numpy() for c in (USER_ID, TS, EVENT_ID, SURFACE))
        z = codec.binary_to_rows(table[Z], self.row_bytes)
        keep = np.ones(len(ts), dtype=bool) if f.surfaces == "all" else np.isin(surface, f.surfaces)
        order = np.lexsort((event_id[keep], ts[keep], user[keep]))
        self.store_ts = ts[keep][order].astype(np.int64)
        self.store_surface = surface[keep][order]
        self.store_z = np.ascontiguousarray(z[keep][order])
        self.store_users = _PerUser(user[keep][order])
        self.store_rows = int(len(self.store_ts))

    # -- serving ----------------------------------------------------------------------------
    def user_features(self, user_id: int, t: int) -> dict:
        """The user's part of a VM example at time t (one row), as the features stage stores it,
        plus the user counters that `dense_features` combines with each candidate's."""
        spec, at = self.spec, np.array([t], dtype=np.int64)
        seq = np.zeros(spec.seq_len * spec.row_bytes, dtype=np.uint8)
        n_seq = 0
        if self.with_seq:
            rows = self.store_users.rows(user_id)
            store = {TS: self.store_ts[rows], SURFACE: self.store_surface[rows], "z": self.store_z[rows]}
            packed, valid = stored_sequence(at, store, spec)
            seq, n_seq = packed[0], int(valid[0])
        rows = self.users.rows(user_id)
        events = {c: v[rows] for c, v in self.history.items()}
        on_vertical = events[SURFACE] == self.vertical
        user = vertical_history(at, {c: v[on_vertical] for c, v in events.items()}, spec)
        raw = raw_sequence(at, events, spec)
        return {**{c: user[c][0] for c in HISTORY_COLUMNS}, **{c: raw[c][0] for c in RAW_COLUMNS},
                "counts": {k: user[k] for k in ("user_n", "user_pos", "recent_n", "recent_pos")},
                SEQ_Z: seq.tobytes(), SEQ_LEN_VALID: np.int32(n_seq),
                "cold_start": n_seq == 0 and user["user_n"][0] == 0 and not raw["raw_labels"][0].any()}

    def context_indices(self, user_id: int, context: dict) -> dict[str, int]:
        """`<col>_idx` of every context column: the request's value, else the user's latest, else OOV."""
        out = {}
        i = int(np.searchsorted(self.context_users, user_id))
        known = i < len(self.context_users) and self.context_users[i] == user_id
        for c in self.context_names:
            if c in context:
                out[idx(c)] = int(self.vocab[c].lookup(np.array([context[c]]))[0])
            elif known:
                out[idx(c)] = int(self.vocab[c].lookup(self.context_latest[c][i : i + 1])[0])
            else:
                out[idx(c)] = OOV_INDEX
        return out

    def item_indices(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(item_id_idx, category_idx) of raw item ids; unknown items and categories -> OOV."""
        items = np.asarray(items, dtype=np.int64)
        item_idx = self.vocab[ITEM_ID].lookup(items)
        pos = np.minimum(np.searchsorted(self.catalog_items, items), max(len(self.catalog_items) - 1, 0))
        found = (self.catalog_items[pos] == items) if len(self.catalog_items) else np.zeros(len(items), dtype=bool)
        category = np.where(found, self.catalog_category[pos] if len(self.catalog_items) else OOV_INDEX, OOV_INDEX)
        return item_idx, category.astype(np.int64)

    def features(self, user_id: int, items: list[int], context: Optional[dict] = None) -> dict:
        """One request's features: the user row once, the candidates' indices, versions and flags."""
        context = context or {}
        t = int(context.get(TS_KEY, time.time()))
        user = self.user_features(user_id, t)
        items = np.asarray(items, dtype=np.int64)
        item_idx, category_idx = self.item_indices(items)
        item_n, item_pos = self.items.counts(items, t, self.spec.lag)
        counts = {k: np.repeat(v, len(items)) for k, v in user["counts"].items()}
        return {
            "user": {
                USER_ID: int(user_id),
                idx(USER_ID): int(self.vocab[USER_ID].lookup(np.array([user_id]))[0]),
                **{c: user[c] for c in (*HISTORY_COLUMNS, *RAW_COLUMNS, SEQ_Z, SEQ_LEN_VALID)},
                **self.context_indices(user_id, context),
            },
            idx(ITEM_ID): item_idx,
            idx(CATEGORY): category_idx,
            DENSE: dense_features(counts, item_n, item_pos, self.spec),
            "store_version": self.bundle.store_version,
            "store_head": self.store_head,
            "log_head": self.log_head,
            "cold_start": bool(user["cold_start"]),
            "oov_items": int((item_idx == OOV_INDEX).sum()),
            "ts": t,
        }

    @property
    def store_head(self) -> Optional[str]:
        """The last link of the chain this table holds: its newest delta, or the store version
        itself. Each answer names it and `log_head`, so with `model_version` it says exactly which
        model and which state of the store and log scored, across refreshes and reloads."""
        return self.store_chain[-1] if self.store_chain else None

    def describe(self) -> dict:
        newest = self.newest_event_ts
        return {
            "store_version": self.bundle.store_version, "store_head": self.store_head, "log_head": self.log_head,
            "store_rows": self.store_rows,
            "store_deltas": max(len(self.store_chain) - 1, 0), "appended_batches": self.appended_count,
            "newest_event_ts": newest, "staleness_s": None if newest is None else round(time.time() - newest, 1),
            "users_with_history": int(max(len(self.users), len(self.store_users) if self.with_seq else 0)),
            "events": self.events, "context_columns": self.context_names, "loaded_at": self.loaded_at,
            "load_seconds": self.load_seconds,
        }


def on_disk(bundle: Bundle) -> tuple:
    """What a table was loaded from, cheaply: the store's deltas and the log's appended batches."""
    deltas = delta_paths(bundle.run, bundle.store_version) if bundle.store_version else []
    return tuple(p.name for p in deltas), tuple(p.name for p in appended_batches(bundle.run))


class LiveTable:
    """One `FeatureTable` (the store version the VM names, with its deltas), kept current: loaded
    at start and reloaded in the background when a delta or an appended batch lands.

    At most every `refresh_interval_s` a request looks at the disk (two directory listings); on a
    change a new table is built in a thread while the old one keeps answering, then swapped in, so
    no request waits or fails. `refresh()` does the same at once (`loopfm serve refresh`). A plain
    object, not a deployment: it lives in the replica that scores, so features never cross a hop.
    """

    def __init__(self, bundle: Bundle, refresh_interval_s: float = 30.0):
        self.bundle = bundle
        self.loaded_from = on_disk(self.bundle)
        self.table = FeatureTable(self.bundle)
        self.refresh_interval_s = refresh_interval_s
        self.checked_at = time.monotonic()
        self.reloading: Optional[asyncio.Task] = None
        self.refresh_error: Optional[str] = None

    def current(self) -> FeatureTable:
        """The table to answer from now; starts a background look at the disk when one is due."""
        if self.refresh_interval_s and time.monotonic() - self.checked_at > self.refresh_interval_s:
            self.checked_at = time.monotonic()
            if self.reloading is None or self.reloading.done():
                self.reloading = asyncio.get_running_loop().create_task(self._reload_if_changed())
        return self.table

    async def features(self, user_id: int, items: list[int], context: dict) -> dict:
        return self.current().features(user_id, items, context)

    async def _reload_if_changed(self) -> bool:
        now = await asyncio.to_thread(on_disk, self.bundle)
        if now == self.loaded_from:
            return False
        try:
            table = await asyncio.to_thread(FeatureTable, self.bundle)
        except Exception as err:  # a bad delta or batch: keep serving the table we have, say why
            self.refresh_error = f"{type(err).__name__}: {err}"
            logger.exception("feature lookup: reload failed; still serving the table loaded at %s",
                             self.table.loaded_at)
            return False
        self.table, self.loaded_from, self.refresh_error = table, now, None
        logger.info("feature lookup: reloaded %s (%d store rows, %d deltas)", self.bundle.store_version,
                    table.store_rows, len(now[0]))
        return True

    async def refresh(self) -> dict:
        """Reload now if the disk changed (waiting for a reload already running); the new state."""
        if self.reloading is not None and not self.reloading.done():
            await self.reloading
        self.checked_at = time.monotonic()
        self.reloading = asyncio.get_running_loop().create_task(self._reload_if_changed())
        await self.reloading
        return await self.describe()

    async def describe(self) -> dict:
        return {**self.table.describe(), "refresh_error": self.refresh_error}
