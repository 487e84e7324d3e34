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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from loopfm.config import LoopFMConfig, SplitConfig, stable_hash
from loopfm.datasets.schema import CATEGORY, ITEM_ID, LABEL, SPLITS, SURFACE, TS, USER_ID, idx
from loopfm.datasets.vocab import Vocab, VocabBuilder
from loopfm.errors import MissingInputError
from loopfm.rundir import RunDir, atomic_output, is_complete, read_manifest, write_manifest

VOCAB_COLUMNS = (USER_ID, ITEM_ID, CATEGORY)


@dataclass
class SplitInfo:
    """What downstream stages need to know about the splits (their `manifest.json`)."""

    fingerprint: str
    valid_start_ts: int
    test_start_ts: int
    rows: dict[str, int]
    label_rate: dict[str, float]
    vocab_sizes: dict[str, int]
    categorical: list[str] = field(default_factory=list)
    num_surfaces: int = 1
    vertical: int = 0

    @classmethod
    def load(cls, run: RunDir) -> "SplitInfo":
        m = read_manifest(run.splits)
        if m is None:
            raise MissingInputError(f"no splits in {run.splits}: run `loopfm data split` first")
        return cls(**{k: m[k] for k in cls.__dataclass_fields__ if k in m})

    def vocab(self, run: RunDir, column: str) -> Vocab:
        return Vocab.load(run.splits / "vocab" / f"{column}.npy")


def split_paths(run: RunDir, name: str) -> Path:
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    return run.splits / name


def read_split(run: RunDir, name: str, columns: Optional[list[str]] = None):
    """One split as a Ray Dataset."""
    import ray

    path = split_paths(run, name)
    if not path.is_dir():
        raise MissingInputError(f"split {name!r} not found at {path}: run `loopfm data split` first")
    return ray.data.read_parquet(str(path), columns=columns)


def boundaries(ts: np.ndarray, cfg: SplitConfig) -> tuple[int, int]:
    """(valid_start, test_start) from quantiles of the event times or from fixed cut-offs."""
    if cfg.method == "cutoff":
        return int(cfg.valid_start_ts), int(cfg.test_start_ts)
    valid_start, test_start = np.quantile(ts, [cfg.valid_quantile, cfg.test_quantile], method="higher")
    return int(valid_start), int(test_start)


def split_of(ts: np.ndarray, valid_start: int, test_start: int) -> np.ndarray:
    """0 = train, 1 = valid, 2 = test, for each timestamp."""
    return (ts >= valid_start).astype(np.int8) + (ts >= test_start).astype(np.int8)


def _add_indices(vocabs_ref, batch: dict) -> dict:
    """map_batches fn: adds `<column>_idx` for every vocabulary column."""
    import ray

    for column, vocab in ray.get(vocabs_ref).items():
        batch[idx(column)] = vocab.lookup(batch[column])
    return batch


def split_stage(cfg: LoopFMConfig, run: RunDir, args=None) -> SplitInfo:
    """`loopfm data split`."""
    import ray
    from ray.data.expressions import col

    from loopfm.runtime import init_ray, log

    events = read_manifest(run.events)
    if events is None:
        raise MissingInputError(f"no validated events in {run.events}: run `loopfm data validate` first")
    fingerprint = stable_hash(events["fingerprint"], cfg.data.split, cfg.data.vertical)
    if is_complete(run.splits, fingerprint):
        log.info("data split: %s is current, skipped", run.splits)
        return SplitInfo.load(run)
    init_ray(cfg.ray)
    categorical = list(events.get("categorical", []))
    ds = ray.data.read_parquet(str(run.events))

    ts = np.concatenate([b[TS] for b in ds.select_columns([TS]).iter_batches(batch_format="numpy", batch_size=1 << 20)])
    valid_start, test_start = boundaries(ts, cfg.data.split)
    which = split_of(ts, valid_start, test_start)
    rows = {name: int((which == i).sum()) for i, name in enumerate(SPLITS)}
    empty = [name for name, n in rows.items() if n == 0]
    if empty:
        raise MissingInputError(f"split {empty} would be empty (boundaries {valid_start}, {test_start}); adjust data.split")

    in_split = {
        "train": col(TS) < valid_start,
        "valid": (col(TS) >= valid_start) & (col(TS) < test_start),
        "test": col(TS) >= test_start,
    }
    train = ds.filter(expr=in_split["train"])
    builders = {c: VocabBuilder() for c in (*VOCAB_COLUMNS, *categorical)}
    label_sum = {name: 0.0 for name in SPLITS}
    for batch in train.select_columns(list(builders)).iter_batches(batch_format="numpy", batch_size=1 << 18):
        for col, b in builders.items():
            b.add(batch[col])
    vocabs = {c: b.build() for c, b in builders.items()}

    with atomic_output(run.splits) as tmp:
        (tmp / "vocab").mkdir()
        for col, vocab in vocabs.items():
            vocab.save(tmp / "vocab" / f"{col}.npy")
        add_indices = functools.partial(_add_indices, ray.put(vocabs))
        for name, predicate in in_split.items():
            ds.filter(expr=predicate).map_batches(add_indices, batch_format="numpy").write_parquet(str(tmp / name))
            label_sum[name] = float(
                sum(b[LABEL].sum() for b in ray.data.read_parquet(str(tmp / name), columns=[LABEL]).iter_batches(batch_format="numpy"))
            )
        num_surfaces = int(ds.max(SURFACE)) + 1 if SURFACE in ds.schema().names else 1
        info = SplitInfo(
            fingerprint=fingerprint,
            valid_start_ts=valid_start,
            test_start_ts=test_start,
            rows=rows,
            label_rate={n: (label_sum[n] / rows[n]) for n in SPLITS},
            vocab_sizes={c: v.size for c, v in vocabs.items()},
            categorical=categorical,
            num_surfaces=num_surfaces,
            vertical=cfg.data.vertical,
        )
        write_manifest(tmp, asdict(info))
    for name in SPLITS:
        log.info("data split: %-5s %9d events, label rate %.4f", name, rows[name], info.label_rate[name])
    log.info("data split: boundaries valid_start_ts=%d test_start_ts=%d -> %s", valid_start, test_start, run.splits)
    return info


def describe(run: RunDir) -> str:
    return json.dumps(asdict(SplitInfo.load(run)), indent=2)
