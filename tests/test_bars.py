"""BARS/FuxiCTR releases: small files in exactly the release formats, read through Ray Data."""

import json

import pytest

from loopfm.config import load_config
from loopfm.datasets.bars import LAYOUTS, release_files
from loopfm.datasets.ingest import validate_stage
from loopfm.datasets.readers import FILE_SHIFT, SRC, open_source
from loopfm.rundir import RunDir

TAOBAO_HEADER = (
    "clk,btag_his,cate_his,brand_his,userid,cms_segid,cms_group_id,final_gender_code,age_level,"
    "pvalue_level,shopping_level,occupation,new_user_class_level,adgroup_id,cate_id,campaign_id,"
    "customer,brand,price,pid,btag"
)
TAOBAO = {
    "train.csv": [
        "0,1^1^2,6406^4520,95471^1232,581738,0,5,2,5,,3,0,3,1,6406,83237,1,95471,170.0,430548_1007,1",
        "1,1,4520,1232,581738,0,5,2,5,,3,0,3,7,4520,1500,9,1232,20.5,430539_1007,1",
    ],
    "test.csv": ["0,,,,23,4,1,1,2,2,2,1,2,1,6406,83237,1,95471,170.0,430548_1007,1"],
}
KUAI_HEADER = "timestamp,user_id,item_id,is_click,is_like,is_follow,pos_items,neg_items"
KUAI = {
    "train.csv": ["1,3,100,1,1,0,5^6,7", "4,3,101,0,0,0,5^6^100,7"],
    "test.csv": ["9,2,102,1,0,1,,7^8"],
}
AMAZON_HEADER = "label,user_id,item_id,cate_id,item_history,cate_history"
AMAZON = {
    "train.csv": ["1,0,13179,738,19^302^45,2^7^7", "0,0,41,7,19,2", "1,0,5,9,19,2"],
    "test.csv": ["1,0,77,738,19^302^45^13179,2^7^7^738"],
}


def release(tmp_path, header, files):
    for name, rows in files.items():
        (tmp_path / name).write_text("\n".join([header, *rows]) + "\n")
    return tmp_path


def read(tmp_path, kind):
    source = open_source(str(tmp_path), "csv", LAYOUTS[kind], files=release_files(str(tmp_path)))
    return source, sorted(source.dataset().take_all(), key=lambda r: r[SRC])


@pytest.mark.timeout(120)
def test_taobao_ad_mapping_surfaces_and_row_order(ray_session, tmp_path):
    _, rows = read(release(tmp_path, TAOBAO_HEADER, TAOBAO), "taobao_ad")
    assert [r["user_id"] for r in rows] == [581738, 581738, 23]
    assert [r["item_id"] for r in rows] == [1, 7, 1] and [r["category"] for r in rows] == [6406, 4520, 6406]
    assert [r["label"] for r in rows] == [0, 1, 0]
    assert [r["surface"] for r in rows] == [0, 1, 0]  # the two ad placements (pid)
    test_start = 1 << FILE_SHIFT  # test.csv is file 1: all of it after all of train
    assert [r["ts"] for r in rows] == [0, 1, test_start] == [r["event_id"] for r in rows]
    assert [r["pvalue_level"] for r in rows] == [None, None, 2] and [r["brand"] for r in rows] == [95471, 1232, 95471]
    assert "price" not in rows[0] and "btag" not in rows[0] and "cate_his" not in rows[0]


@pytest.mark.timeout(120)
def test_kuaivideo_keeps_timestamps_and_drops_other_labels(ray_session, tmp_path):
    source, rows = read(release(tmp_path, KUAI_HEADER, KUAI), "kuaivideo")
    assert [(r["ts"], r["user_id"], r["item_id"], r["label"]) for r in rows] == [
        (1, 3, 100, 1), (4, 3, 101, 0), (9, 2, 102, 1)]
    assert not {"is_like", "is_follow", "pos_items"} & set(rows[0])
    assert [r["surface"] for r in rows] == [None] * 3 and source.layout.sorted_by_ts  # files are sorted by time


@pytest.mark.timeout(120)
def test_amazon_orders_a_users_rows_by_history_length(ray_session, tmp_path):
    _, rows = read(release(tmp_path, AMAZON_HEADER, AMAZON), "amazon_electronics")
    assert [r["ts"] for r in rows] == [3, 1, 1, (1 << FILE_SHIFT) + 4]
    assert [(r["item_id"], r["category"], r["label"]) for r in rows] == [
        (13179, 738, 1), (41, 7, 0), (5, 9, 1), (77, 738, 1)]
    assert len({r["event_id"] for r in rows}) == 4  # a positive and its negative share ts, not the id


@pytest.mark.timeout(120)
def test_taobao_validates_into_events_with_file_boundaries(ray_session, tmp_path):
    (tmp_path / "TaobaoAd_x1").mkdir()
    log = release(tmp_path / "TaobaoAd_x1", TAOBAO_HEADER, TAOBAO)
    cfg = load_config(None, ["data.source=taobao_ad", f"data.path={log}", "ray.progress_bars=false"])
    manifest = validate_stage(cfg, RunDir(tmp_path / "run"))
    assert manifest["rows"] == 3 and manifest["ts_unit"] == "order" and manifest["num_surfaces"] == 2
    assert manifest["files"] == [{"name": "train.csv", "rows": 2, "ts_start": 0},
                                 {"name": "test.csv", "rows": 1, "ts_start": 1 << FILE_SHIFT}]
    assert manifest["categorical"] == list(LAYOUTS["taobao_ad"].categorical)
    report = json.loads((tmp_path / "run" / "data" / "validation.json").read_text())
    assert report["rows_kept"] == 3 and sum(r["count"] for r in report["rules"].values()) == 0
