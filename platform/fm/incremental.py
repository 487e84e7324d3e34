"""`loopfm embed --incremental [--since TS|last]`: embed only the log's new events, as a store delta.

The same fixed FM checkpoint and the same compressor as the full store (the paper: a consistent
embedding space beats a fresher, drifting one). A user's causal state is continued, not
recomputed: each user with new events gets chunks that start `fm.context` events before the
first new one (the FM's whole receptive field; their `prev_label` tokens come from the events
before them) and output only the new events, so every new event's z equals what a full re-embed
of the union would give it (tests/test_incremental.py), at the cost of the increment plus one
receptive field per active user.

    store/<version>/ (full)  <-  store_deltas/<version>/0000-<hash>/  <-  0001-<hash>/ ...

Each delta is sealed like a store (rows = the new events, unique ids, file hashes) with
`base`, `parent` and `since` in its manifest, inside `atomic_output`, under the chain's lock
(`store.deltas.chain_lock`), held from reading the chain to publishing the delta.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import ray

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.datasets.append import appended_batches
from loopfm.datasets.schema import CATEGORY, ITEM_ID, LABEL, SPLITS, TS, USER_ID, idx
from loopfm.datasets.splits import SplitInfo, split_paths
from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.fm.checkpoint import FMManifest
from loopfm.fm.chunks import (
    EVENT_COLUMNS,
    ROWS_PER_PARTITION,
    block_chunks,
    chunk_users,
    file_boundaries,
    prev_labels,
    runs,
)
from loopfm.fm.extract import extract_rows, extractor_args
from loopfm.fm.train import fm_fingerprint
from loopfm.ordering import ordered_data, sort_boundaries
from loopfm.rundir import RunDir
from loopfm.runtime import init_ray, log
from loopfm.skeleton import publish
from loopfm.store.deltas import chain_lock, chain_max_ts, open_chain
from loopfm.store.parquet import file_hash, open_store, seal
from loopfm.store.resolve import resolve_store
from loopfm.store.schema import COMPRESSOR_FILE, StoreManifest
from loopfm.weights import load_weights


def log_events(run: RunDir, info: SplitInfo):
    """Every event of the log (splits + appended batches) in `EVENT_COLUMNS`, as a Ray Dataset."""
    ds = ray.data.read_parquet([str(split_paths(run, s)) for s in SPLITS], columns=EVENT_COLUMNS)
    batches = appended_batches(run)
    if batches:
        vocabs = {c: info.vocab(run, c) for c in (ITEM_ID, CATEGORY)}
        appended = ray.data.read_parquet([str(b) for b in batches], file_extensions=["parquet"])
        ds = ds.union(appended.map_batches(_index, batch_format="numpy", fn_args=(vocabs,))
                      .select_columns(EVENT_COLUMNS))
    return ds


def _index(batch: dict, vocabs: dict) -> dict:
    for column, vocab in vocabs.items():
        batch[idx(column)] = vocab.lookup(batch[column])
    return batch


def continued_chunks(batch: dict[str, np.ndarray], chunk_len: int, context: int, since: int,
                     cutoffs: tuple[int, int]) -> dict[str, np.ndarray]:
    """Block fn over whole users' (trimmed) events: chunks that output only the events after `since`.

    `prev_label` is computed over every row the trim kept, then each user's input starts `context`
    events before its first new one (the predecessors a new event's FM output depends on), so
    the output equals the full pass's: the oldest of those needs the label of the last event
    strictly before its timestamp, which may lie behind a run of ties (`tail_of_users` keeps it).
    """
    order = np.lexsort((batch["event_id"], batch[TS], batch[USER_ID]))
    rows = {k: np.asarray(v)[order] for k, v in batch.items()}
    user, ts = rows[USER_ID], rows[TS]
    rows["prev_label"] = prev_labels(user, ts, rows[LABEL])
    first, counts, rank = runs(user)
    old = np.add.reduceat((ts <= since).astype(np.int64), first) if len(user) else first
    keep = rank >= np.repeat(old - context, counts)
    chunks = block_chunks({k: v[keep] for k, v in rows.items()}, chunk_len, context, *cutoffs)
    chunks["out"] &= chunks["ts"] > since
    return chunks


def incremental_embed(cfg: LoopFMConfig, run: RunDir, since: str | int = "last") -> StoreManifest:
    """Write the delta holding every log event with ts > since (default: newer than the chain holds)."""
    base_path, base = resolve_store(cfg, run)
    with chain_lock(run, base.store_version):  # the chain stays as read until the delta is published
        return _extend_chain(cfg, run, base_path, since)


def _extend_chain(cfg: LoopFMConfig, run: RunDir, base_path, since: str | int) -> StoreManifest:
    base = open_store(base_path)  # as it is now: a compaction may have folded the chain while this waited
    chain = open_chain(run, base_path, base)
    stored_until = chain_max_ts(chain)
    since_ts = stored_until if since in (None, "last") else int(since)
    if since_ts < stored_until:
        raise VersionMismatchError(
            f"--since {since_ts} is before the newest stored event (ts {stored_until}): events in between are "
            "already in the store; compact and re-embed to change them")
    info, fm_args, compressor = _same_space(cfg, run, base_path, base)
    init_ray(cfg.ray)
    started = time.time()
    new_users, expected = _new_events(run, since_ts)
    if not expected:
        raise MissingInputError(f"the log holds no events after ts {since_ts}: run `loopfm logs append` first")
    trim = functools.partial(tail_of_users, users=new_users, since=since_ts, tail=cfg.fm.context + 1)
    deltas = chain[1:]
    parent = deltas[-1][1].store_version if deltas else base.store_version
    version = stable_hash(base.store_version, parent, since_ts, expected)
    out = run.store_deltas(base.store_version) / f"{len(deltas):04d}-{version}"

    def build(tmp: Path) -> StoreManifest:
        per_user = cfg.fm.context + 2  # a trimmed user: its receptive field, the label before it, a new event
        chunks = chunk_users(log_events(run, info).map_batches(trim, batch_format="numpy"), continued_chunks,
                             sort_boundaries(new_users, max(1, ROWS_PER_PARTITION // per_user)),
                             chunk_len=cfg.fm.chunk_len, context=cfg.fm.context, since=since_ts,
                             cutoffs=(info.valid_start_ts, info.test_start_ts))
        extract_rows(chunks, cfg, fm_args, compressor).write_parquet(str(tmp))
        return seal(tmp, StoreManifest(
            store_version=version, fm_version=base.fm_version, checkpoint_hash=base.checkpoint_hash,
            layers=base.layers, raw_width=base.raw_width, width=base.width, prefix_widths=base.prefix_widths,
            dtype=base.dtype, parent=parent, base=base.store_version, since=since_ts,
        ), expected_rows=expected, stage="embed --incremental")

    with ordered_data():
        manifest = publish(out, build)
    seconds = time.time() - started
    log.info("embed --incremental: %d events of %d users after ts %d in %.1fs -> delta %s", manifest.rows,
             len(new_users), since_ts, seconds, out)
    return manifest


def union_rows(cfg: LoopFMConfig, run: RunDir, context: int | None = None):
    """Store rows of every log event (splits + appended) from one full pass of the store's FM and
    compressor, as a lazy Ray Dataset: what the store and its deltas must equal, and what a full
    re-embed costs. A `context` below the FM's receptive field exists only to show that it matters."""
    base_path, base = resolve_store(cfg, run)
    info, fm_args, compressor = _same_space(cfg, run, base_path, base)
    files = [str(split_paths(run, s)) for s in SPLITS]
    files += [str(f) for batch in appended_batches(run) for f in sorted(batch.glob("*.parquet"))]
    with ordered_data():
        chunks = chunk_users(log_events(run, info), block_chunks, file_boundaries(files), chunk_len=cfg.fm.chunk_len,
                             context=cfg.fm.context if context is None else context,
                             valid_start=info.valid_start_ts, test_start=info.test_start_ts)
        return extract_rows(chunks, cfg, fm_args, compressor)


def _same_space(cfg: LoopFMConfig, run: RunDir, base_path, base: StoreManifest):
    """(split info, extractor args, compressor) of the FM and compressor that made store `base`, verified."""
    info = SplitInfo.load(run)
    fm_dir = run.fm(fm_fingerprint(cfg, info))
    fm = FMManifest.read(fm_dir)
    if fm.fm_version != base.fm_version:
        raise VersionMismatchError(f"store {base.store_version} was embedded by FM {base.fm_version}, but this "
                                   f"config's FM at {fm_dir} is {fm.fm_version}: an increment must use the same FM")
    if file_hash(base_path / COMPRESSOR_FILE) != base.compressor_hash:
        raise VersionMismatchError(f"{base_path / COMPRESSOR_FILE} does not match the hash in the store's manifest")
    return info, extractor_args(fm_dir, fm, cfg), load_weights(base_path / COMPRESSOR_FILE, base_path / COMPRESSOR_FILE)


def _new_events(run: RunDir, since: int) -> tuple[np.ndarray, int]:
    """(users with events after `since`, how many such events). Only appended batches can hold
    any: `since` is at or after the full store's newest event, and that store holds every split."""
    files = [str(f) for batch in appended_batches(run) for f in sorted(batch.glob("*.parquet"))]
    if not files:
        return np.zeros(0, np.int64), 0
    table = pads.dataset(files, format="parquet").to_table(columns=[USER_ID, TS], filter=pads.field(TS) > since)
    return np.unique(table[USER_ID].to_numpy()), table.num_rows


def tail_of_users(batch: dict, users: np.ndarray, since: int, tail: int) -> dict:
    """map_batches fn: rows of `users` that are new (ts > since), or among each user's last `tail`
    old rows in this block by (ts, event_id), or at the latest timestamp before the oldest of those
    (whose label is its `prev_label`, however many rows tie with it). `tail` >= 1.

    Exact across blocks: a block holds a subset of a user's old rows, so its `tail`-th newest row
    is no newer than the user's overall one, and the block keeps every row the user's overall trim
    would. The shuffle carries a few old rows per user per block instead of whole histories.
    """
    keep = np.isin(batch[USER_ID], users)
    old = keep & (batch[TS] <= since)
    rows = np.flatnonzero(old)
    # newest first per user
    order = rows[np.lexsort((-batch["event_id"][rows], -batch[TS][rows], batch[USER_ID][rows]))]
    user, ts = batch[USER_ID][order], batch[TS][order]
    first, counts, _ = runs(user)
    distinct = np.cumsum(np.r_[True, (user[1:] != user[:-1]) | (ts[1:] != ts[:-1])]) if len(user) else first
    newness = distinct - np.repeat(distinct[first], counts)  # 0 at a user's newest ts, 1 at the next older, ...
    oldest = first + np.minimum(counts, tail) - 1  # the user's tail-th newest row (or its oldest)
    keep &= ~old
    keep[order[newness <= np.repeat(newness[oldest] + 1, counts)]] = True
    return {k: v[keep] for k, v in batch.items()}
