"""Readers for the BARS/FuxiCTR CSV releases: TaobaoAd_x1, KuaiVideo_x1, AmazonElectronics_x1.

`data.path` is the release directory (train.csv, valid.csv if present, test.csv). The files are
read in that order, so the file index in every row's `_src` is the release split: 0 train, then
valid, then test. Each release is a `Layout` (readers.py); docs/DATA.md explains the choices.

Two releases carry no timestamp, so ts is an *order*, not a clock (`ts_unit: order`):
  TaobaoAd_x1          ts = file index << 40 | row in file (rows assumed in time order)
  AmazonElectronics_x1 ts = file index << 40 | len(item_history): a user's k-th review comes
                       after the k reviews in its history; across users the order means nothing
KuaiVideo_x1 keeps its (relative) `timestamp`, and its files are sorted by it, so a row that
breaks that order is reported as a defect. The `^`-joined history columns are the releases'
precomputed sequences; the pipeline builds its own histories from events, so they are not read
(Amazon's item_history only for its length). No release column that is another label
(KuaiVideo's is_like, is_follow) or a numeric value (Taobao's price) becomes a feature.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loopfm.datasets.readers import FILE_SHIFT, Layout
from loopfm.errors import MissingInputError

RELEASE_FILES = ("train.csv", "valid.csv", "test.csv")

# Taobao's two ad placements (`pid`) are its surfaces; any other value lands on surface 2.
TAOBAO_PIDS = ("430548_1007", "430539_1007")


def release_files(path: str) -> list[Path]:
    """train.csv, valid.csv, test.csv of a release directory, in that order (a file alone works)."""
    root = Path(path)
    if root.is_file():
        return [root.resolve()]
    if not root.is_dir():
        raise MissingInputError(f"data.path {path!r} does not exist (expected a BARS release directory)")
    files = [root / name for name in RELEASE_FILES if (root / name).is_file()]
    if not files:
        raise MissingInputError(f"no {', '.join(RELEASE_FILES)} in {path!r}")
    return [f.resolve() for f in files]


def _order(file_index: int, within_file: np.ndarray) -> pa.Array:
    return pa.array((np.int64(file_index) << FILE_SHIFT) + within_file.astype(np.int64))


def _taobao_derive(table: pa.Table, file_index: int, first_row: int) -> dict[str, pa.Array]:
    rows = first_row + np.arange(table.num_rows)
    pid = pc.utf8_trim_whitespace(table["pid"].combine_chunks())
    surface = pc.fill_null(pc.index_in(pid, value_set=pa.array(TAOBAO_PIDS)), len(TAOBAO_PIDS))
    return {"ts": _order(file_index, rows), "surface": surface.cast(pa.int64())}


def _amazon_derive(table: pa.Table, file_index: int, first_row: int) -> dict[str, pa.Array]:
    history = pc.utf8_trim_whitespace(table["item_history"].combine_chunks()).fill_null("")
    items = pc.add(pc.count_substring(history, "^"), 1).to_numpy(zero_copy_only=False)
    length = np.where(pc.utf8_length(history).to_numpy(zero_copy_only=False) > 0, items, 0)
    return {"ts": _order(file_index, length)}


TAOBAO_AD = Layout(
    columns={"user_id": "userid", "item_id": "adgroup_id", "label": "clk", "category": "cate_id"},
    categorical=(
        "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",  # user profile
        "shopping_level", "occupation", "new_user_class_level",
        "campaign_id", "customer", "brand",  # ad profile
    ),
    derive=_taobao_derive,
    derived=("ts", "surface"),
    derived_from=("pid",),
    ts_unit="order",
)

KUAIVIDEO = Layout(
    columns={"user_id": "user_id", "item_id": "item_id", "label": "is_click", "ts": "timestamp"},
    sorted_by_ts=True,
)

AMAZON_ELECTRONICS = Layout(
    columns={"user_id": "user_id", "item_id": "item_id", "label": "label", "category": "cate_id"},
    derive=_amazon_derive,
    derived=("ts",),
    derived_from=("item_history",),
    ts_unit="order",
)

LAYOUTS = {"taobao_ad": TAOBAO_AD, "kuaivideo": KUAIVIDEO, "amazon_electronics": AMAZON_ELECTRONICS}
