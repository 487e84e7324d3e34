"""`loopfm data split`: time-based train/valid/test splits and the vocabularies built on train.

Boundaries are by time, never random: train has ts < valid_start, valid has
valid_start <= ts < test_start, test has ts >= test_start, so no future event leaks into
training. Vocabularies come from the train split only; ids first seen later map to OOV, as they
would at serving time.

Output (`<out>/data/splits/`): `train/ valid/ test/` parquet folders holding the event columns
plus `<column>_idx` vocabulary indices, `vocab/<column>.npy`, and `manifest.json` (`SplitInfo`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from loopfm.config import DataConfig, LoopFMConfig, SplitConfig, stable_hash
from loopfm.datasets.schema import CATEGORY, ITEM_ID, LABEL, SPLITS, SURFACE, TS, USER_ID, idx
from loopfm.datasets.vocab import Vocab, VocabBuilder
from loopfm.errors import MissingInputError
from loopfm.location import as_path, parquet_dataset
from loopfm.rundir import Manifest, RunDir, committed, read_manifest
from loopfm.runtime import init_ray, log
from loopfm.skeleton import current, publish

VOCAB_COLUMNS = (USER_ID, ITEM_ID, CATEGORY)
SPLIT_TAG = "_split"  # partition column of the one write pass; becomes the directory name


@dataclass
class SplitInfo(Manifest):
    """What downstream stages need to know about the splits (their `manifest.json`)."""

    MISSING = "no splits in {path}: run `loopfm data split` first"
    STAMP = True

    fingerprint: str
    valid_start_ts: int
    test_start_ts: int
    rows: dict[str, int]
    label_rate: dict[str, float]
    vocab_sizes: dict[str, int]
    categorical: list[str] = field(default_factory=list)
    num_surfaces: int = 1
    vertical: int = 0  # the first of `data.vertical`: the one its fingerprint hashes

    @classmethod
    def load(cls, run: RunDir) -> SplitInfo:
        return cls.read(run.splits)

    def vocab(self, run: RunDir, column: str) -> Vocab:
        return Vocab.load(committed(run.splits) / "vocab" / f"{column}.npy")


def split_paths(run: RunDir, name: str) -> Path:
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    return committed(run.splits) / name


def read_split(run: RunDir, name: str, columns: Optional[list[str]] = None):
    """One split as a Ray Dataset."""
    path = split_paths(run, name)
    if not path.is_dir():
        raise MissingInputError(f"split {name!r} not found at {path}: run `loopfm data split` first")
    return ray.data.read_parquet(str(path), columns=columns)


def boundaries(ts: Optional[np.ndarray], cfg: SplitConfig) -> tuple[int, int]:
    """(valid_start, test_start) from quantiles of the event times or from fixed cut-offs."""
    if cfg.method == "cutoff":
        return int(cfg.valid_start_ts), int(cfg.test_start_ts)
    valid_start, test_start = np.quantile(ts, [cfg.valid_quantile, cfg.test_quantile], method="higher")
    return int(valid_start), int(test_start)


def split_of(ts: np.ndarray, valid_start: int, test_start: int) -> np.ndarray:
    """0 = train, 1 = valid, 2 = test, for each timestamp."""
    return (ts >= valid_start).astype(np.int8) + (ts >= test_start).astype(np.int8)


def _train_stats(batch: dict, *, columns: tuple[str, ...], valid_start: int, test_start: int) -> pa.Table:
    """map_batches fn: one row per block with rows and positives per split and the train ids."""
    which = split_of(batch[TS], valid_start, test_start)
    train = which == 0
    stats = {
        "rows": [np.bincount(which, minlength=len(SPLITS)).tolist()],
        "positives": [np.bincount(which, weights=batch[LABEL], minlength=len(SPLITS)).astype(np.int64).tolist()],
    }
    for column in columns:
        stats[column] = pa.array([np.unique(batch[column][train])], pa.list_(pa.int64()))
    return pa.table(stats)


def _index_and_tag(batch: dict, *, vocabs_ref, valid_start: int, test_start: int) -> dict:
    """map_batches fn: `<column>_idx` for every vocabulary column and the split each row goes to."""
    for column, vocab in ray.get(vocabs_ref).items():
        batch[idx(column)] = vocab.lookup(batch[column])
    batch[SPLIT_TAG] = np.asarray(SPLITS)[split_of(batch[TS], valid_start, test_start)]
    return batch


def split_fingerprint(events_fingerprint: str, data: DataConfig) -> str:
    """What the splits depend on: the events, `data.split` and the first vertical of `data.vertical`.

    Their contents do not depend on the vertical (every surface's events are split and indexed);
    it is hashed because it always was, so the runs of a single `vertical: v` keep their splits,
    and only the first of a list, so a run that lists more verticals after its first keeps its
    splits, FM and store (docs/ARCHITECTURE.md, 'Many verticals').
    """
    return stable_hash(events_fingerprint, data.split, data.verticals[0])


def surfaces_present(path: Path) -> list[int]:
    """The surfaces that hold at least one event in the parquet files under `path` (one column read)."""
    table = parquet_dataset(sorted(as_path(committed(path)).rglob("*.parquet"))).to_table(
        columns=[SURFACE])
    return sorted(int(s) for s in pc.unique(table[SURFACE]).to_pylist())


def split_stage(cfg: LoopFMConfig, run: RunDir) -> SplitInfo:
    """`loopfm data split`: at most three passes, two of them over a few columns only."""
    events = read_manifest(run.events)
    if events is None:
        raise MissingInputError(f"no validated events in {run.events}: run `loopfm data validate` first")
    cfg.data.check_verticals(surfaces_present(run.events))
    fingerprint = split_fingerprint(events["fingerprint"], cfg.data)
    done = current("data split", run.splits, fingerprint, lambda _: SplitInfo.load(run))
    if done is not None:
        return done
    init_ray(cfg.ray)
    categorical = list(events.get("categorical", []))
    vocab_columns = (*VOCAB_COLUMNS, *categorical)
    ds = ray.data.read_parquet(str(committed(run.events)))

    ts = None
    if cfg.data.split.method == "quantile":  # pass 1 (quantiles only): the ts column
        batches = ds.select_columns([TS]).iter_batches(batch_format="numpy", batch_size=1 << 20)
        ts = np.concatenate([b[TS] for b in batches])
    valid_start, test_start = boundaries(ts, cfg.data.split)

    # pass 2: split sizes, label rates and the train vocabularies, reduced per block
    stats = functools.partial(_train_stats, columns=vocab_columns, valid_start=valid_start, test_start=test_start)
    rows = np.zeros(len(SPLITS), np.int64)
    positives = np.zeros(len(SPLITS), np.int64)
    builders = {c: VocabBuilder() for c in vocab_columns}
    per_block = ds.select_columns([TS, LABEL, *vocab_columns]).map_batches(stats, batch_format="numpy", batch_size=None)
    for block in per_block.iter_rows():
        rows += block["rows"]
        positives += block["positives"]
        for column, builder in builders.items():
            builder.add(block[column])
    counts = {name: int(n) for name, n in zip(SPLITS, rows)}
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise MissingInputError(
            f"split {empty} would be empty (valid_start_ts={valid_start}, test_start_ts={test_start}); "
            "adjust data.split"
        )
    vocabs = {c: b.build() for c, b in builders.items()}

    def build(tmp: Path) -> SplitInfo:  # pass 3: indices added, each row written to its split
        (tmp / "vocab").mkdir()
        for column, vocab in vocabs.items():
            vocab.save(tmp / "vocab" / f"{column}.npy")
        tag = functools.partial(
            _index_and_tag, vocabs_ref=ray.put(vocabs), valid_start=valid_start, test_start=test_start
        )
        ds.map_batches(tag, batch_format="numpy", batch_size=None).write_parquet(str(tmp), partition_cols=[SPLIT_TAG])
        for name in SPLITS:
            (tmp / f"{SPLIT_TAG}={name}").rename(tmp / name)  # on an object store: inside the attempt
        return SplitInfo(
            fingerprint=fingerprint,
            valid_start_ts=valid_start,
            test_start_ts=test_start,
            rows=counts,
            label_rate={name: float(p / n) for name, p, n in zip(SPLITS, positives, rows)},
            vocab_sizes={c: v.size for c, v in vocabs.items()},
            categorical=categorical,
            num_surfaces=int(events.get("num_surfaces", 1)),
            vertical=cfg.data.verticals[0],
        )

    info = publish(run.splits, build)
    for name in SPLITS:
        log.info("data split: %-5s %9d events, label rate %.4f", name, counts[name], info.label_rate[name])
    log.info("data split: boundaries valid_start_ts=%d test_start_ts=%d -> %s", valid_start, test_start, run.splits)
    return info


def describe(run: RunDir) -> str:
    return json.dumps(SplitInfo.load(run).to_dict(), indent=2)
