"""build_report on fabricated per-seed metrics (TR, decomposition, claims), and the written files."""

import json
import math

import pytest
from matplotlib.image import imread

from loopfm.evaluation.report import build_report, write_ablation, write_report

# Three paired seeds per arm. Means: AUC base .700, kd .710, loopfm .720, kd_loopfm .735;
# NE base .900, kd .880, loopfm .870, kd_loopfm .840. FM: AUC .78, NE .80.
AUC = {"base": [.700, .702, .698], "kd": [.710, .713, .707], "loopfm": [.720, .722, .718],
       "kd_loopfm": [.735, .736, .734]}
NE = {"base": [.900, .902, .898], "kd": [.880, .881, .879], "loopfm": [.870, .872, .868],
      "kd_loopfm": [.840, .842, .838]}
FM = {"auc": 0.78, "gauc": 0.70, "logloss": 0.40, "ne": 0.80}
META = {"seeds": [0, 1, 2], "config_hash": "abc123", "machine": "test-box"}


def arms(auc=AUC, ne=NE, only=None):
    return {a: [{"seed": s, "auc": auc[a][s], "gauc": auc[a][s] - 0.05, "logloss": ne[a][s] / 2, "ne": ne[a][s]}
                for s in range(3)] for a in auc if only is None or a in only}


def claims(report):
    return {c["claim"].split(" (")[0].split(":")[0]: c for c in report["claims"]}


def test_tr_from_means_and_per_seed():
    r = build_report(arms(), FM, META)
    # TR_NE from means: kd (.90-.88)/(.90-.80) = .2, loopfm .3, kd_loopfm .6
    # TR_AUC: kd (.71-.70)/(.78-.70) = .125, loopfm .25, kd_loopfm .4375
    assert r["tr"]["kd"] == pytest.approx({"ne": 0.2, "auc": 0.125})
    assert r["tr"]["loopfm"] == pytest.approx({"ne": 0.3, "auc": 0.25})
    assert r["tr"]["kd_loopfm"] == pytest.approx({"ne": 0.6, "auc": 0.4375})
    # per seed, kd on NE: .02/.10 = .2, .021/.102 = .2058824, .019/.098 = .1938776
    ps = r["tr_per_seed"]["kd"]["ne"]
    assert ps["values"] == pytest.approx([0.2, 0.2058824, 0.1938776])
    assert ps["mean"] == pytest.approx(0.19991997)
    assert r["arms"]["base"]["auc"]["mean"] == pytest.approx(0.700)
    assert r["arms"]["kd"]["auc"]["std"] == pytest.approx(0.003)
    assert r["fm"]["auc"]["mean"] == 0.78 and r["fm"]["auc"]["n"] == 1
    assert r["decomposition"]["auc"] == pytest.approx(
        {"gain_kd": .01, "gain_loopfm": .02, "gain_both": .035, "interaction": .005})
    assert r["decomposition"]["ne"] == pytest.approx(
        {"gain_kd": .02, "gain_loopfm": .03, "gain_both": .06, "interaction": .01})
    assert set(r["p_values"]) == {"kd_vs_base", "loopfm_vs_base", "kd_loopfm_vs_base", "kd_loopfm_vs_kd",
                                  "loopfm_vs_kd"}
    # kd - base on AUC = [.010, .011, .009]: mean .01, sd .001 -> t = 17.32 (df 2) -> p = .00332
    assert r["p_values"]["kd_vs_base"]["auc"] == pytest.approx(0.0033165, rel=1e-3)
    assert r["meta"] == META


def test_all_claims_hold_on_the_good_case():
    c = claims(build_report(arms(), FM, META))
    assert len(c) == 6
    assert all(x["holds"] and x["computed"] for x in c.values()), c
    assert "ratio 3.00" in c["TR(+KD+LoopFM) is about twice TR(+KD) on NE"]["evidence"]


def test_claims_fail_when_the_combination_underdelivers():
    # kd_loopfm AUC mean .715 (< loopfm .720) and NE .875 -> TR_NE .25 vs kd .2: ratio 1.25
    auc = dict(AUC, kd_loopfm=[.715, .716, .714])
    ne = dict(NE, kd_loopfm=[.875, .876, .874])
    c = claims(build_report(arms(auc, ne), FM, META))
    assert c["+LoopFM beats the base VM"]["holds"]
    assert c["+LoopFM beats +KD"]["holds"]
    assert not c["+KD+LoopFM is at least as good as +KD and as +LoopFM alone"]["holds"]
    assert not c["KD and LoopFM are complementary"]["holds"]  # gain_both .015 < gain_loopfm .02
    tr = c["TR(+KD+LoopFM) is about twice TR(+KD) on NE"]
    assert not tr["holds"] and tr["computed"] and "ratio 1.25" in tr["evidence"]
    # an FM worse than the base VM fails its claim
    bad_fm = dict(FM, auc=0.69)
    assert not claims(build_report(arms(), bad_fm, META))["FM beats the base VM"]["holds"]


def test_missing_arms_are_skipped_not_fatal():
    r = build_report(arms(only={"base", "loopfm"}), [FM, FM, FM], META)
    assert set(r["tr"]) == {"loopfm"} and r["decomposition"] == {}
    assert set(r["p_values"]) == {"loopfm_vs_base"}
    c = claims(r)
    assert c["+LoopFM beats the base VM"]["holds"] and c["+LoopFM beats the base VM"]["computed"]
    for name in ("+LoopFM beats +KD", "KD and LoopFM are complementary",
                 "TR(+KD+LoopFM) is about twice TR(+KD) on NE"):
        assert not c[name]["computed"] and not c[name]["holds"]
        assert "not computed" in c[name]["evidence"]
    assert any("'kd' not run" in n for n in r["notes"])
    # no FM at all: no TR, no crash
    r = build_report(arms(only={"base"}), None, META)
    assert r["tr"] == {} and not claims(r)["FM beats the base VM"]["computed"]


def test_seeds_pair_by_seed_key_not_by_position():
    a = arms()
    shuffled = {k: list(reversed(v)) if k == "kd" else v for k, v in a.items()}
    got, want = build_report(shuffled, FM, META)["p_values"], build_report(a, FM, META)["p_values"]
    for key in want:
        assert got[key] == pytest.approx(want[key], nan_ok=True), key
    # by position the reversed kd seeds would pair differently and give another p
    no_seed = {k: [{m: v for m, v in d.items() if m != "seed"} for d in runs] for k, runs in shuffled.items()}
    assert build_report(no_seed, FM, META)["p_values"]["kd_vs_base"]["auc"] != pytest.approx(
        want["kd_vs_base"]["auc"])


def test_write_report_files(tmp_path):
    auc = dict(AUC, kd_loopfm=[.715, .716, .714])
    r = build_report(arms(auc), FM, META)
    r["arms"]["base"]["gauc"]["mean"] = float("nan")  # undefined values become null, not invalid JSON
    paths = write_report(r, tmp_path / "report")
    names = {p.name for p in paths}
    assert names == {"report.json", "report.md", "arms.png", "transfer.png"}
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(names)  # no temp files left
    back = json.loads((tmp_path / "report" / "report.json").read_text())
    assert back["tr"]["kd"]["ne"] == pytest.approx(0.2)
    assert back["arms"]["base"]["gauc"]["mean"] is None
    assert [c["holds"] for c in back["claims"]] == [c["holds"] for c in r["claims"]]
    md = (tmp_path / "report" / "report.md").read_text()
    for text in ("base VM", "+KD", "+LoopFM", "+KD+LoopFM", "| FM |", "abc123", "test-box", "✓", "✗",
                 "Transfer ratio", "interaction"):
        assert text in md
    for png in ("arms.png", "transfer.png"):
        img = imread(tmp_path / "report" / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0


def test_write_report_partial_has_no_transfer_plot(tmp_path):
    paths = write_report(build_report(arms(only={"base"}), None, META), tmp_path)
    assert {p.name for p in paths} == {"report.json", "report.md", "arms.png"}
    assert "–" in (tmp_path / "report.md").read_text()  # not-computed claims are marked as such


def test_write_ablation(tmp_path):
    rows = [{"pooling": "mean", "auc": {"mean": 0.71, "std": 0.002}, "ne": 0.88},
            {"pooling": "sum", "auc": {"mean": 0.712, "std": 0.001}, "ne": 0.879},
            {"pooling": "attention", "auc": {"mean": 0.72, "std": 0.003}, "ne": float("nan")}]
    paths = write_ablation(rows, "pooling", tmp_path, "pooling")
    assert {p.name for p in paths} == {"pooling.md", "pooling.json", "pooling.png"}
    md = (tmp_path / "pooling.md").read_text()
    assert "attention" in md and "0.7200 ± 0.0030" in md and "n/a" in md
    assert json.loads((tmp_path / "pooling.json").read_text())["rows"][2]["ne"] is None
    assert imread(tmp_path / "pooling.png").shape[0] > 100
    assert math.isnan(rows[2]["ne"])  # the caller's rows are not mutated by the JSON cleaning
