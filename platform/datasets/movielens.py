"""MovieLens-100k as an event log (`data.source: movielens100k`), from the recbole wheel.

Why this source: it is a real public interaction log that installs from PyPI (the `recbole==1.2.1`
wheel ships `recbole/dataset_example/ml-100k/`), so a fresh clone can run the pipeline on real
data with no download at run time. Only the data files are used; recbole is never imported (its
dependency pins clash with ours: install it with `pip install --no-deps recbole==1.2.1`).

The atomic files are tab-separated with typed headers: `ml-100k.inter` (`user_id:token
item_id:token rating:float timestamp:float`, 100,000 ratings) and `ml-100k.item` (`item_id:token
movie_title:token_seq release_year:token class:token_seq`, genres space-separated). Mapping:

  label    = rating >= 4 (a rating is an explicit judgment; 4 and 5 are the positives)
  surface  = 0 (one surface: the log is the vertical); with `data.movielens.surfaces: genre_group`,
             the GENRE_GROUPS position of the item's first genre, so one FM and store can serve
             several verticals (`data.vertical: [0, 1, 2]`)
  category = the item's first genre, numbered as in MovieLens' `u.genre` (Action 1 .. Western 18);
             `unknown`, an unlisted genre or an item missing from `.item` give 0
  ts       = timestamp (seconds)
  user_id, item_id as given; event_id = the row's rank after sorting by (ts, user_id, item_id),
  so ids are stable whatever the file's row order.

The converted log is written once as parquet under `RUN/data/source/` (with a manifest whose
fingerprint names the input files and this mapping) and then read by the generic parquet reader,
so validation, the split and every later stage treat it like any other log.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loopfm.config import ColumnMapping, DataConfig, stable_hash
from loopfm.datasets.readers import Source, generic_layout, open_source
from loopfm.datasets.schema import CATEGORY, EVENT_ID, EVENT_SCHEMA, ITEM_ID, LABEL, SURFACE, TS, USER_ID
from loopfm.errors import DataValidationError, MissingInputError
from loopfm.rundir import read_manifest
from loopfm.skeleton import run_stage

SOURCE = "movielens100k"
INTER = "ml-100k.inter"
ITEM = "ml-100k.item"
PACKAGE_DIR = ("dataset_example", "ml-100k")
PIP_COMMAND = "pip install --no-deps recbole==1.2.1"
POSITIVE_RATING = 4.0
# MovieLens-100k's u.genre order: a genre's position is its category (0 = unknown / none).
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# `data.movielens.surfaces: genre_group`: surface = the position of the group holding the item's
# first genre, three groups of about a third of the ratings each (docs/DATA.md has the shares).
GENRE_GROUPS = (
    ("unknown", "Documentary", "Drama", "Film-Noir", "Musical", "Romance", "War", "Western"),
    ("Action", "Adventure", "Crime", "Fantasy", "Horror", "Mystery", "Sci-Fi", "Thriller"),
    ("Animation", "Children's", "Comedy"),
)
SURFACE_OF_CATEGORY = np.array([next(k for k, group in enumerate(GENRE_GROUPS) if genre in group) for genre in GENRES],
                               dtype=np.int32)
MAPPING_VERSION = 1  # bump when the mapping above changes, so converted logs are rebuilt
INTER_COLUMNS = {"user_id:token": USER_ID, "item_id:token": ITEM_ID, "rating:float": "rating",
                 "timestamp:float": "timestamp"}
ITEM_COLUMNS = {"item_id:token": ITEM_ID, "class:token_seq": "genres"}


def packaged_inter() -> Optional[Path]:
    """`ml-100k.inter` inside the installed recbole package, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*PACKAGE_DIR, INTER)
        if candidate.is_file():
            return candidate
    return None


def resolve_inter(path: Optional[str]) -> Path:
    """The `.inter` file: `data.path` (the file or a folder holding ml-100k.inter), else recbole's copy."""
    if path:
        given = Path(path)
        inter = given / INTER if given.is_dir() else given
        if not inter.is_file():
            raise MissingInputError(f"data.path {path!r}: no {INTER} there (source '{SOURCE}')")
        return inter.resolve()
    found = packaged_inter()
    if found is None:
        raise MissingInputError(
            f"source '{SOURCE}' reads {INTER} from the recbole wheel, which is not installed: run "
            f"`{PIP_COMMAND}` (data only; recbole is never imported), or set data.path to a folder holding {INTER}"
        )
    return found


def item_file(inter: Path) -> Optional[Path]:
    """The `.item` file beside the `.inter` one (same stem), if there is one."""
    candidate = inter.with_suffix(".item")
    return candidate if candidate.is_file() else None


def _read_atomic(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    """A recbole atomic file's wanted columns, as text, renamed; a missing column is a clear error."""
    # QUOTE_NONE: movie titles hold quotes that are text, not CSV quoting.
    frame = pd.read_csv(path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataValidationError(f"{path}: missing column(s) {missing}; the header has {list(frame.columns)}")
    return frame[list(columns)].rename(columns=columns)


def genre_categories(path: Optional[Path]) -> dict[int, int]:
    """item id -> category of its first genre (GENRES position; 0 for unknown or unlisted)."""
    if path is None:
        return {}
    items = _read_atomic(path, ITEM_COLUMNS)
    code = {name: i for i, name in enumerate(GENRES)}
    first = items["genres"].str.strip().str.split(" ").str[0].fillna("")
    return dict(zip(items[ITEM_ID].astype(np.int64), first.map(lambda g: code.get(g, 0)).astype(np.int64)))


def to_events(inter: Path, item: Optional[Path], surfaces: str = "one") -> pa.Table:
    """The ratings as contract events (`EVENT_SCHEMA`), sorted by (ts, user_id, item_id); `surfaces`
    as `data.movielens.surfaces` says (one: all on 0; genre_group: the group of the category)."""
    ratings = _read_atomic(inter, INTER_COLUMNS)
    try:
        user = ratings[USER_ID].astype(np.int64).to_numpy()
        item_id = ratings[ITEM_ID].astype(np.int64).to_numpy()
        rating = ratings["rating"].astype(np.float64).to_numpy()
        ts = ratings["timestamp"].astype(np.float64).to_numpy().astype(np.int64)
    except ValueError as err:
        raise DataValidationError(f"{inter}: a value is not a number ({err})") from err
    categories = genre_categories(item)
    category = np.array([categories.get(int(i), 0) for i in item_id], dtype=np.int64)
    order = np.lexsort((item_id, user, ts))  # last key sorts first: ts, then user, then item
    n = len(order)
    return pa.table(
        {
            EVENT_ID: pa.array(np.arange(n, dtype=np.int64)),
            USER_ID: pa.array(user[order]),
            ITEM_ID: pa.array(item_id[order]),
            CATEGORY: pa.array(category[order]),
            SURFACE: pa.array(SURFACE_OF_CATEGORY[category[order]] if surfaces == "genre_group"
                              else np.zeros(n, np.int32)),
            TS: pa.array(ts[order]),
            LABEL: pa.array((rating[order] >= POSITIVE_RATING).astype(np.int8)),
        },
        schema=EVENT_SCHEMA,
    )


def write_source(data: DataConfig, out: Path) -> str:
    """Convert the configured ml-100k files into `out/events.parquet` (skipped if current); the fingerprint."""
    inter = resolve_inter(data.path)
    item = item_file(inter)
    identity = [(str(p), os.path.getsize(p), os.path.getmtime(p)) for p in (inter, item) if p is not None]
    surfaces = data.movielens.surfaces
    # the default mapping hashes as it did before the option existed: converted logs stay current
    fingerprint = stable_hash(SOURCE, MAPPING_VERSION, identity, *([surfaces] if surfaces != "one" else []))

    def build(tmp: Path) -> dict:
        events = to_events(inter, item, surfaces)
        pq.write_table(events, tmp / "events.parquet")
        label = events[LABEL].to_numpy()
        return {"fingerprint": fingerprint, "source": SOURCE, "inter": str(inter), "item": str(item) if item else None,
                "rows": events.num_rows, "label_rate": float(label.mean()) if len(label) else None}

    run_stage("data validate: movielens", out, fingerprint, build, read=read_manifest, ray=None)
    return fingerprint


def open_movielens(data: DataConfig, out: Path) -> tuple[Source, str]:
    """The converted log as a generic parquet source, and what identifies its content."""
    fingerprint = write_source(data, out)
    layout = generic_layout(ColumnMapping(), categorical=[], sorted_by_ts=False)
    return open_source(str(out), "parquet", layout), fingerprint
