"""`loopfm features`: the point-in-time join as three bucketed passes over disk (`buckets`).

    vertical events --by item--> per item bucket: + item counters (`join.counts_before`) --by user--+
    other surfaces' events (history for the rawseq control) -------------------------------by user--+--> _join/users/
    store rows (every surface) -------------------------------------------------------------by user--+
    per user bucket: its users joined (`join.join_users`) --by event id--> _join/examples/
    per example bucket: sorted by event_id -> write_parquet(partition_cols=[split])
      -> features/<fingerprint>/{train,valid,test}/ + manifest.json

All inputs are cast to one schema (columns the other side lacks are null), so a user bucket reads
a user's events and store rows in one table. Bucket boundaries are drawn from the data
(`ordering.sort_boundaries`: about ROWS_PER_PARTITION events each), so a fresh run writes the same
rows into the same files. Memory: each pass streams batches into bucket files and each task then
holds one bucket, so neither the object store nor any process holds the whole log; the sequences,
L times bigger than the log, exist one bucket's users at a time and go straight to disk. The
bucket files live in the stage's temp output (`_join/`) and are removed before it is published.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
from ray.data.expressions import col

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.datasets.schema import ITEM_ID, LABEL, SPLITS, SURFACE, TS, USER_ID, idx
from loopfm.datasets.splits import SplitInfo, split_of, split_paths, surfaces_present
from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.features.buckets import over_buckets, write_buckets
from loopfm.features.join import DENSE_NAMES, USER_EVENT_COLUMNS, JoinSpec, counts_before, join_users
from loopfm.features.reader import KD_LOGIT, LIST_COLUMNS, SEQ_LEN_VALID, SEQ_Z, FeaturesManifest
from loopfm.fm.checkpoint import FMManifest
from loopfm.fm.chunks import ROWS_PER_PARTITION, file_boundaries
from loopfm.fm.train import fm_fingerprint
from loopfm.location import AnyPath, remove_tree
from loopfm.ordering import ordered_data, sort_boundaries
from loopfm.rundir import MANIFEST, RunDir, check_rows
from loopfm.runtime import init_ray, log
from loopfm.skeleton import current, publish
from loopfm.store import codec
from loopfm.store.parquet import data_files
from loopfm.store.resolve import resolve_store
from loopfm.store.schema import EVENT_ID, FM_LOGIT, StoreManifest, Z

SPLIT = "split"
WORK = "_join"  # the bucket files, inside the temp output (see the module docstring)
FROM_STORE = "from_store"
ITEM_N, ITEM_POS = "item_n", "item_pos"  # the item counters, carried on vertical event rows into the user join


def features_verticals_stage(cfg: LoopFMConfig, run: RunDir,
                             fm_version: Optional[str] = None) -> dict[int, FeaturesManifest]:
    """`loopfm features`: one feature set per vertical of `data.vertical`, all from the one store
    (of `fm_version`; default: of the FM this config trains), each built or found current alone."""
    cfg.data.check_verticals(surfaces_present(run.splits))
    return {v: features_stage(vcfg, run, fm_version) for v, vcfg in cfg.per_vertical().items()}


def features_stage(cfg: LoopFMConfig, run: RunDir, fm_version: Optional[str] = None) -> FeaturesManifest:
    """The VM examples of the one vertical `data.vertical` names, built or found current (from the
    store of `fm_version`; default: of the FM this config trains)."""
    vertical = cfg.data.one_vertical("a feature set")
    info = SplitInfo.load(run)
    store_path, store = resolve_store(cfg, run, fm_version or configured_fm_version(cfg, run, info))
    fingerprint = features_fingerprint(cfg, info, store)
    out = run.features(fingerprint)
    done = current("features", out, fingerprint, FeaturesManifest.read)
    if done is not None:
        return done
    init_ray(cfg.ray)
    spec = JoinSpec.from_config(cfg.features, codec.bytes_per_row(store.width, store.dtype),
                                prior=vertical_label_rate(run, vertical))
    started = time.time()
    log.info("features: joining vertical %d with store %s (L=%d, lag=%d, retention=%s, surfaces=%s)",
             vertical, store.store_version, spec.seq_len, spec.lag, spec.retention, cfg.features.surfaces)
    ids = vertical_column(run, vertical, EVENT_ID)
    boundaries = sort_boundaries(np.concatenate(list(ids.values())), ROWS_PER_PARTITION)

    def build(tmp: Path) -> FeaturesManifest:
        work = tmp / WORK
        build_examples(run, store_path, spec, info, vertical, work, boundaries).write_parquet(
            str(tmp), partition_cols=[SPLIT])
        remove_tree(work)
        rows = _finish_partitions(run, tmp, store, vertical, {name: len(v) for name, v in ids.items()})
        return FeaturesManifest(
            fingerprint=fingerprint,
            store_version=store.store_version,
            splits_fingerprint=info.fingerprint,
            vertical=vertical,
            rows=rows,
            seq_len=spec.seq_len,
            raw_seq_len=spec.raw_seq_len,
            dense_names=list(DENSE_NAMES),
            counter_window=spec.counter_window,
            prior=spec.prior,
            prior_strength=spec.prior_strength,
            width=store.width,
            dtype=store.dtype,
            bytes_per_row=spec.row_bytes,
            context_columns=[idx(c) for c in info.categorical],
            lag=spec.lag,
            retention=spec.retention,
            surfaces=cfg.features.surfaces,
            seconds=round(time.time() - started, 2),
        )

    with ordered_data():  # the same rows in the same files on every run
        manifest = publish(out, build)
    total = sum(manifest.rows.values())
    for name in SPLITS:
        log.info("features: %-5s %9d examples", name, manifest.rows[name])
    log.info("features: %d examples in %.1fs (%.0f events/s) -> %s", total, manifest.seconds,
             total / max(manifest.seconds, 1e-9), out)
    return manifest


def features_fingerprint(cfg: LoopFMConfig, info: SplitInfo, store: StoreManifest) -> str:
    """What a feature set depends on: the store version (FM, layers, compressor settings and
    weights), the splits, the `features` section and the vertical."""
    return stable_hash(store.store_version, info.fingerprint, cfg.features, cfg.data.one_vertical("a feature set"))


def configured_fm_version(cfg: LoopFMConfig, run: RunDir, info: SplitInfo) -> Optional[str]:
    """The version of the FM this config trains, when it exists: its store is the one to read
    (a run directory may hold several FMs: replicates, ablations)."""
    fm_dir = run.fm(fm_fingerprint(cfg, info))
    return FMManifest.read(fm_dir).fm_version if (fm_dir / MANIFEST).is_file() else None


def vertical_column(run: RunDir, vertical: int, column: str) -> dict[str, np.ndarray]:
    """One column of the vertical's events, per split. Bucket boundaries are drawn from these keys
    (not sampled at random), so a fresh run writes the same rows into the same files; and each
    split's output must hold as many examples as its input holds vertical events."""
    return {name: pads.dataset(str(split_paths(run, name)), format="parquet").to_table(
        columns=[column], filter=pc.field(SURFACE) == vertical)[column].to_numpy() for name in SPLITS}


def vertical_label_rate(run: RunDir, vertical: int) -> float:
    """The train split's positive rate on the vertical: the prior every counter rate is smoothed toward."""
    table = pads.dataset(str(split_paths(run, "train")), format="parquet").to_table(
        columns=[LABEL], filter=pc.field(SURFACE) == vertical)
    return float(pc.mean(table[LABEL]).as_py() or 0.0) if table.num_rows else 0.0


def build_examples(run: RunDir, store_path: Path, spec: JoinSpec, info: SplitInfo, vertical: int,
                   work: AnyPath, boundaries: list[int]) -> ray.data.Dataset:
    """The lazy Ray Dataset of examples in event-id order (a `split` column says where each
    belongs), in one block per range of `boundaries`. Runs the passes before the last one, whose
    bucket files it leaves under `work`."""
    events_schema = pads.dataset(str(split_paths(run, "train")), format="parquet").schema.remove_metadata()
    schema = union_schema(events_schema)
    paths = [str(split_paths(run, name)) for name in SPLITS]
    users = file_boundaries(paths, ROWS_PER_PARTITION)  # about that many events per user bucket, and their store rows
    splits = ray.data.read_parquet(paths)
    vertical_events = splits.filter(expr=col(SURFACE) == vertical)
    log.info("features: bucketing the vertical's events by item, then every row by user")
    items = np.concatenate(list(vertical_column(run, vertical, ITEM_ID).values()))
    write_buckets(vertical_events, ITEM_ID, sort_boundaries(items, ROWS_PER_PARTITION), work / "items")
    write_buckets(over_buckets([work / "items"], example_rows, spec.lag, schema, info.valid_start_ts,
                               info.test_start_ts), USER_ID, users, work / "users" / "events", batch_rows=None)
    write_buckets(splits.filter(expr=col(SURFACE) != vertical).map_batches(
        history_rows, batch_format="pyarrow", fn_args=(schema,)), USER_ID, users, work / "users" / "history")
    store = ray.data.read_parquet([str(f) for f in data_files(store_path)])  # the files its manifest lists
    write_buckets(store.map_batches(
        store_rows, batch_format="pyarrow", fn_args=(schema,)), USER_ID, users, work / "users" / "store")
    log.info("features: joining each user bucket, then bucketing the examples by event id")
    write_buckets(over_buckets([work / "users" / part for part in ("events", "history", "store")], join_block, spec,
                               events_schema.names, vertical), EVENT_ID, boundaries, work / "examples",
                  batch_rows=None)
    return over_buckets([work / "examples"], by_event_id)


def example_rows(table: pa.Table, lag: int, schema: pa.Schema, valid_start: int, test_start: int) -> pa.Table:
    """One item bucket's vertical events (every item whole) as examples: item counters, split tag, union schema."""
    return event_rows(item_counters(table, lag), schema, valid_start, test_start)


def by_event_id(table: pa.Table) -> pa.Table:
    return table.sort_by(EVENT_ID).combine_chunks()  # one chunk per column: the partitioned writer loops over chunks


def item_counters(block: pa.Table, lag: int) -> pa.Table:
    """Each vertical event's item counters: impressions and positives of its item with ts < t - lag."""
    items, ts = block[ITEM_ID].to_numpy(), block[TS].to_numpy()
    n, pos = counts_before(items, ts, block[LABEL].to_numpy(), items, ts - lag)
    return block.append_column(ITEM_N, pa.array(n)).append_column(ITEM_POS, pa.array(pos))


def union_schema(events_schema: pa.Schema) -> pa.Schema:
    """Event columns, then the split tag, the item counters, then the store's own columns."""
    extra = [(SPLIT, pa.string()), (ITEM_N, pa.float64()), (ITEM_POS, pa.float64()), (FROM_STORE, pa.bool_()),
             (FM_LOGIT, pa.float32()), (Z, pa.binary())]
    return pa.schema([*events_schema, *[pa.field(name, kind) for name, kind in extra]])


def event_rows(table: pa.Table, schema: pa.Schema, valid_start: int, test_start: int) -> pa.Table:
    """Vertical rows in the union schema, tagged with their split (by the split's own time boundaries)."""
    which = split_of(table[TS].to_numpy(), valid_start, test_start)
    return _conform(table, schema, {SPLIT: pa.array(np.asarray(SPLITS, dtype=object)[which], pa.string()),
                                    FROM_STORE: pa.array(np.zeros(table.num_rows, dtype=bool))})


def history_rows(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Other surfaces' events: history only (no split tag, so never an example)."""
    return _conform(table, schema, {FROM_STORE: pa.array(np.zeros(table.num_rows, dtype=bool))})


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


def join_block(block: pa.Table, spec: JoinSpec, event_columns: list[str], vertical: int) -> pa.Table:
    """One user bucket (each of its users whole: events, history and store rows) -> their examples.

    The block is split into examples, events and store rows once, handed to `join.join_users` as
    numpy columns (one Python call per user there, on slices), and the output columns are built
    once for the whole block: a `map_groups` call per user cost a per-user Arrow filter and left
    one Arrow chunk per user in every output column.
    """
    is_store = block[FROM_STORE].to_numpy(zero_copy_only=False)
    events = block.filter(pa.array(~is_store))
    examples = events.filter(pc.is_valid(events[SPLIT])).select([*event_columns, SPLIT, ITEM_N, ITEM_POS])
    store = block.filter(pa.array(is_store))
    joined = join_users(
        {c: examples[c].to_numpy() for c in (USER_ID, EVENT_ID, TS, ITEM_N, ITEM_POS)},
        {c: events[c].to_numpy() for c in (USER_ID, *USER_EVENT_COLUMNS)},
        {
            USER_ID: store[USER_ID].to_numpy(),
            EVENT_ID: store[EVENT_ID].to_numpy(),
            TS: store[TS].to_numpy(),
            SURFACE: store[SURFACE].to_numpy(),
            FM_LOGIT: store[FM_LOGIT].to_numpy(),
            Z: codec.binary_to_rows(store[Z], spec.row_bytes),
        },
        spec,
        vertical,
    )
    out = examples.drop_columns([ITEM_N, ITEM_POS])
    for name in LIST_COLUMNS:
        values = joined[name]
        out = out.append_column(name, pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1]))
    return (
        out.append_column(SEQ_Z, codec.rows_to_binary(joined[SEQ_Z]))
        .append_column(SEQ_LEN_VALID, pa.array(joined[SEQ_LEN_VALID]))
        .append_column(KD_LOGIT, pa.array(joined[KD_LOGIT]))
        .combine_chunks()  # one chunk per column: the partitioned parquet writer loops over chunks
    )


def _finish_partitions(run: RunDir, tmp: Path, store: StoreManifest, vertical: int,
                       expected: dict[str, int]) -> dict[str, int]:
    """Rename `split=<name>/` to `<name>/`; refuse a split whose example count is not its vertical
    event count (`expected`: a row the shuffle or join lost or doubled), or events the store lacks."""
    rows = {}
    for name in SPLITS:
        hive = tmp / f"{SPLIT}={name}"
        if not hive.is_dir():
            raise MissingInputError(f"split {name!r} has no events of vertical {vertical} (data.vertical)")
        hive.rename(tmp / name)
        kd = pads.dataset(str(tmp / name), format="parquet").to_table(columns=[KD_LOGIT])[KD_LOGIT]
        check_rows("features", tmp / name, len(kd), expected[name],
                   f"one example per surface-{vertical} event of {split_paths(run, name)}")
        missing = kd.null_count + int(pc.sum(pc.is_nan(kd)).as_py() or 0)
        if missing:
            raise VersionMismatchError(
                f"store {store.store_version} has no FM logit for {missing} of {len(kd)} {name} events: "
                "it was built from other events (re-run `loopfm embed`)"
            )
        rows[name] = len(kd)
    return rows
