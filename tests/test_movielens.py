"""The movielens100k source on a small slice written in recbole's exact atomic-file format.

No recbole in CI: the fixture writes `ml-100k.inter` / `ml-100k.item` as the wheel ships them
(tab-separated, typed headers, quotes inside titles), and `data.path` points at the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import loopfm_in_process
from loopfm.config import load_config, stable_hash
from loopfm.datasets import movielens
from loopfm.errors import MissingInputError
from loopfm.rundir import read_manifest

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
ITEMS = [  # item id, title, year, genres (first genre -> category)
    (1, "Toy Story", "1995", "Animation Children's Comedy"),  # 3
    (2, 'The "Quoted" One', "1995", "Action Adventure Thriller"),  # 1
    (3, "Four Rooms", "1995", "Thriller"),  # 16
    (4, "Nobody Knows", "1996", "unknown"),  # 0
    (5, "Lone Star", "1996", "Western"),  # 18
]
EXPECTED_CATEGORY = {1: 3, 2: 1, 3: 16, 4: 0, 5: 18, 6: 0}  # item 6 is not in .item


def ratings(n_users: int = 6, per_user: int = 10) -> list[tuple[int, int, int, int]]:
    """(user, item, rating, ts) rows, not in time order, with a tie on ts across users."""
    rows = []
    for u in range(1, n_users + 1):
        for k in range(per_user):
            rows.append((u, 1 + (u + k) % 6, 1 + (u * 7 + k) % 5, 880_000_000 + 1000 * k + 10 * u))
    rows.append((99, 2, 4, 880_000_000 + 10))  # ts tie with user 1's first row
    rows.reverse()
    return rows


def write_slice(folder: Path) -> Path:
    """`ml-100k.inter` and `ml-100k.item` of `ratings()` and ITEMS in `folder`."""
    folder.mkdir()
    lines = [INTER_HEADER] + [f"{u}\t{i}\t{r}\t{ts}" for u, i, r, ts in ratings()]
    (folder / movielens.INTER).write_text("\n".join(lines) + "\n")
    items = [ITEM_HEADER] + ["\t".join(map(str, row)) for row in ITEMS]
    (folder / movielens.ITEM).write_text("\n".join(items) + "\n")
    return folder


@pytest.fixture
def ml_slice(tmp_path: Path) -> Path:
    return write_slice(tmp_path / "ml-100k")


def test_genre_group_surfaces_are_opt_in_and_the_default_keeps_its_fingerprint(tmp_path):
    folder = write_slice(tmp_path / "ml-100k")
    inter = movielens.resolve_inter(str(folder))
    item = movielens.item_file(inter)
    assert sorted(g for group in movielens.GENRE_GROUPS for g in group) == sorted(movielens.GENRES)
    one = movielens.to_events(inter, item).to_pandas()
    grouped = movielens.to_events(inter, item, "genre_group").to_pandas()
    # the first genre's group: Animation 2 (comedy), Action 1, Thriller 1, unknown 0, Western 0; item 6 not in .item: 0
    group = {1: 2, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0}
    assert grouped["surface"].tolist() == [group[i] for i in grouped["item_id"]]
    assert grouped.drop(columns="surface").equals(one.drop(columns="surface")) and (one["surface"] == 0).all()

    setting = ["data.source=movielens100k", f"data.path={folder}"]
    default = load_config(None, setting).data
    genres = load_config(None, [*setting, "data.movielens.surfaces=genre_group"]).data
    assert "movielens" not in default.model_dump() and genres.model_dump()["movielens"] == {"surfaces": "genre_group"}
    identity = [(str(p), os.path.getsize(p), os.path.getmtime(p)) for p in (inter, item)]
    # origin/main's conversion fingerprint, `stable_hash(SOURCE, MAPPING_VERSION, identity)`, for the default
    assert movielens.write_source(default, tmp_path / "one") == stable_hash(
        movielens.SOURCE, movielens.MAPPING_VERSION, identity)
    assert movielens.write_source(genres, tmp_path / "genres") != stable_hash(
        movielens.SOURCE, movielens.MAPPING_VERSION, identity)
    written = pq.read_table(tmp_path / "genres" / "events.parquet").to_pandas()
    assert written["surface"].tolist() == grouped["surface"].tolist()


def test_mapping_labels_categories_ts_ids(ml_slice):
    inter = movielens.resolve_inter(str(ml_slice))
    events = movielens.to_events(inter, movielens.item_file(inter)).to_pandas()
    rows = sorted(ratings(), key=lambda r: (r[3], r[0], r[1]))
    assert len(events) == len(rows)
    assert events["event_id"].tolist() == list(range(len(rows)))  # rank after sorting by (ts, user, item)
    assert events["user_id"].tolist() == [r[0] for r in rows]
    assert events["item_id"].tolist() == [r[1] for r in rows]
    assert events["ts"].tolist() == [r[3] for r in rows]
    assert events["label"].tolist() == [int(r[2] >= 4) for r in rows]
    assert events["category"].tolist() == [EXPECTED_CATEGORY[r[1]] for r in rows]
    assert (events["surface"] == 0).all()
    assert str(events["label"].dtype) == "int8" and str(events["surface"].dtype) == "int32"
    # the .inter file itself is also accepted as data.path; no .item beside it -> category 0
    alone = ml_slice.parent / "alone"
    alone.mkdir()
    (alone / movielens.INTER).write_text((ml_slice / movielens.INTER).read_text())
    bare = movielens.to_events(movielens.resolve_inter(str(alone / movielens.INTER)), None).to_pandas()
    assert (bare["category"] == 0).all() and bare["label"].tolist() == events["label"].tolist()


def test_default_path_needs_recbole_and_says_how(monkeypatch, tmp_path):
    cfg = load_config(None, ["data.source=movielens100k"])  # no data.path needed
    assert cfg.data.path is None
    with pytest.raises(Exception, match="needs data.path"):
        load_config(None, ["data.source=events"])
    monkeypatch.setattr(movielens, "packaged_inter", lambda: None)
    with pytest.raises(MissingInputError, match=r"pip install --no-deps recbole==1\.2\.1"):
        movielens.resolve_inter(None)
    with pytest.raises(MissingInputError, match="ml-100k.inter"):
        movielens.resolve_inter(str(tmp_path))


@pytest.mark.timeout(600)
def test_validate_and_split_through_the_cli(ray_session, ml_slice, tmp_path, capsys):
    run = tmp_path / "R"
    flags = ["--set", "data.source=movielens100k", "--set", f"data.path={ml_slice}"]
    for command in (["data", "validate"], ["data", "split"]):
        code, output = loopfm_in_process(*command, "--out", str(run), *flags, capsys=capsys)
        assert code == 0, output[-3000:]
    events, splits = read_manifest(run / "data" / "events"), read_manifest(run / "data" / "splits")
    n = len(ratings())
    assert events["rows"] == events["rows_read"] == n and events["num_surfaces"] == 1
    assert events["source"] == "movielens100k" and sum(splits["rows"].values()) == n
    parts = sorted((run / "data" / "events").glob("*.parquet"))
    table = pd.concat([pq.read_table(p).to_pandas() for p in parts]).sort_values("event_id")
    assert table["label"].tolist() == [int(r[2] >= 4) for r in sorted(ratings(), key=lambda r: (r[3], r[0], r[1]))]
    assert set(np.unique(table["category"])) <= set(EXPECTED_CATEGORY.values())
    code, output = loopfm_in_process("data", "validate", "--out", str(run), *flags, capsys=capsys)
    assert code == 0 and "is current, skipped" in output  # current: skipped
