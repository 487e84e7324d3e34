"""`loopfm features`: the point-in-time join as one streaming Ray Data job.

    splits (vertical events, tagged train/valid/test) ∪ store rows (every surface)
      -> groupby(user_id).map_groups(join one user)   (sort-based shuffle, set by init_ray)
      -> write_parquet(partition_cols=[split])        (one write pass)
      -> features/<fingerprint>/{train,valid,test}/ + manifest.json

Both inputs are cast to one schema (columns the other side lacks are null), so a user's events
and store rows meet in one group. Memory: the shuffle holds every event and store row once (in
Ray's object store, spilled to disk when it is larger); the sequences, L times bigger, exist one
user group at a time and go straight to parquet, never examples x L x width at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.datasets.schema import LABEL, SPLITS, SURFACE, TS, USER_ID, idx
from loopfm.datasets.splits import SplitInfo, split_of, split_paths
from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.features.join import JoinSpec, join_user
from loopfm.features.reader import HIST_ITEMS, KD_LOGIT, SEQ_LEN_VALID, SEQ_Z, FeaturesManifest
from loopfm.features.resolve import resolve_store
from loopfm.rundir import RunDir, atomic_output, is_complete, write_manifest
from loopfm.store import codec
from loopfm.store.schema import EVENT_ID, FM_LOGIT, Z, StoreManifest

SPLIT = "split"
FROM_STORE = "from_store"


def features_stage(cfg: LoopFMConfig, run: RunDir, args=None, fm_version: Optional[str] = None) -> FeaturesManifest:
    """`loopfm features`: build (or find current) the VM examples of `data.vertical`."""
    from loopfm.runtime import init_ray, log

    info = SplitInfo.load(run)
    store_path, store = resolve_store(cfg, run, fm_version)
    fingerprint = stable_hash(store.store_version, info.fingerprint, cfg.features, cfg.data.vertical)
    out = run.features(fingerprint)
    if is_complete(out, fingerprint):
        log.info("features: %s is current, skipped", out)
        return FeaturesManifest.read(out)

    init_ray(cfg.ray)
    spec = JoinSpec.from_config(cfg.features, codec.bytes_per_row(store.width, store.dtype))
    started = time.time()
    log.info("features: joining vertical %d with store %s (L=%d, lag=%d, retention=%s, surfaces=%s)",
             cfg.data.vertical, store.store_version, spec.seq_len, spec.lag, spec.retention, cfg.features.surfaces)
    with atomic_output(out) as tmp:
        examples = build_examples(run, store_path, spec, info, cfg.data.vertical)
        examples.write_parquet(str(tmp), partition_cols=[SPLIT])
        rows = _finish_partitions(tmp, store, cfg.data.vertical)
        manifest = FeaturesManifest(
            fingerprint=fingerprint,
            store_version=store.store_version,
            splits_fingerprint=info.fingerprint,
            vertical=cfg.data.vertical,
            rows=rows,
            seq_len=spec.seq_len,
            raw_seq_len=spec.raw_seq_len,
            width=store.width,
            dtype=store.dtype,
            bytes_per_row=spec.row_bytes,
            context_columns=[idx(c) for c in info.categorical],
            lag=spec.lag,
            retention=spec.retention,
            surfaces=cfg.features.surfaces,
            seconds=round(time.time() - started, 2),
        )
        write_manifest(tmp, manifest.to_dict())
    total = sum(rows.values())
    for name in SPLITS:
        log.info("features: %-5s %9d examples", name, rows[name])
    log.info("features: %d examples in %.1fs (%.0f events/s) -> %s", total, manifest.seconds,
             total / max(manifest.seconds, 1e-9), out)
    return manifest


def build_examples(run: RunDir, store_path: Path, spec: JoinSpec, info: SplitInfo, vertical: int):
    """The lazy Ray Dataset of examples (a `split` column says where each belongs)."""
    import ray
    from ray.data.expressions import col

    events_schema = pads.dataset(str(split_paths(run, "train")), format="parquet").schema.remove_metadata()
    schema = union_schema(events_schema)
    events = (
        ray.data.read_parquet([str(split_paths(run, name)) for name in SPLITS])
        .filter(expr=col(SURFACE) == vertical)
        .map_batches(event_rows, batch_format="pyarrow", fn_args=(schema, info.valid_start_ts, info.test_start_ts))
    )
    store = ray.data.read_parquet(str(store_path)).map_batches(store_rows, batch_format="pyarrow", fn_args=(schema,))
    return (
        events.union(store)
        .groupby(USER_ID)
        .map_groups(join_group, batch_format="pyarrow", fn_args=(spec, events_schema.names))
        .map_batches(contiguous, batch_format="pyarrow", batch_size=None)
    )


def union_schema(events_schema: pa.Schema) -> pa.Schema:
    """Event columns, then the split tag, then the store's own columns."""
    extra = [(SPLIT, pa.string()), (FROM_STORE, pa.bool_()), (FM_LOGIT, pa.float32()), (Z, pa.binary())]
    return pa.schema([*events_schema, *[pa.field(name, kind) for name, kind in extra]])


def event_rows(table: pa.Table, schema: pa.Schema, valid_start: int, test_start: int) -> pa.Table:
    """Split rows in the union schema, tagged with their split (by the split's own time boundaries)."""
    which = split_of(table[TS].to_numpy(), valid_start, test_start)
    return _conform(table, schema, {SPLIT: pa.array(np.asarray(SPLITS, dtype=object)[which], pa.string()),
                                    FROM_STORE: pa.array(np.zeros(table.num_rows, dtype=bool))})


def store_rows(table: pa.Table, schema: pa.Schema) -> pa.Table:
    return _conform(table, schema, {FROM_STORE: pa.array(np.ones(table.num_rows, dtype=bool))})


def _conform(table: pa.Table, schema: pa.Schema, given: dict[str, pa.Array]) -> pa.Table:
    """`table` in `schema`: given columns, then the table's own (cast), then nulls."""
    columns = []
    for f in schema:
        if f.name in given:
            columns.append(given[f.name])
        elif f.name in table.column_names:
            columns.append(table[f.name].cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def join_group(group: pa.Table, spec: JoinSpec, event_columns: list[str]) -> pa.Table:
    """map_groups fn: one user's union rows -> that user's examples."""
    is_store = group[FROM_STORE]
    events = group.filter(pc.invert(is_store)).select([*event_columns, SPLIT])
    store = group.filter(is_store)
    joined = join_user(
        {c: events[c].to_numpy() for c in (EVENT_ID, TS, LABEL, idx("item_id"))},
        {
            EVENT_ID: store[EVENT_ID].to_numpy(),
            TS: store[TS].to_numpy(),
            SURFACE: store[SURFACE].to_numpy(),
            FM_LOGIT: store[FM_LOGIT].to_numpy(),
            Z: codec.binary_to_rows(store[Z], spec.row_bytes),
        },
        spec,
    )
    hist_items = pa.FixedSizeListArray.from_arrays(pa.array(joined["hist_items"].ravel()), spec.raw_seq_len)
    return (
        events.append_column(HIST_ITEMS, hist_items)
        .append_column(SEQ_Z, codec.rows_to_binary(joined["seq_z"]))
        .append_column(SEQ_LEN_VALID, pa.array(joined["seq_len_valid"]))
        .append_column(KD_LOGIT, pa.array(joined["kd_logit"]))
    )


def contiguous(block: pa.Table) -> pa.Table:
    """One chunk per column: a block of per-user pieces otherwise makes the partitioned parquet
    writer loop over thousands of tiny record batches (20x slower, measured)."""
    return block.combine_chunks()


def _finish_partitions(tmp: Path, store: StoreManifest, vertical: int) -> dict[str, int]:
    """Rename `split=<name>/` to `<name>/`, count examples, refuse events the store lacks."""
    rows = {}
    for name in SPLITS:
        hive = tmp / f"{SPLIT}={name}"
        if not hive.is_dir():
            raise MissingInputError(f"split {name!r} has no events of vertical {vertical} (data.vertical)")
        hive.rename(tmp / name)
        kd = pads.dataset(str(tmp / name), format="parquet").to_table(columns=[KD_LOGIT])[KD_LOGIT]
        missing = kd.null_count + int(pc.sum(pc.is_nan(kd)).as_py() or 0)
        if missing:
            raise VersionMismatchError(
                f"store {store.store_version} has no FM logit for {missing} of {len(kd)} {name} events: "
                "it was built from other events (re-run `loopfm embed`)"
            )
        rows[name] = len(kd)
    return rows
