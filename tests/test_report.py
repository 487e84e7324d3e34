"""build_report on fabricated per-seed metrics (TR, decomposition, claims), and the written files."""

import json
import math
import statistics

import pytest
from matplotlib.image import imread

from loopfm.evaluation.report import build_report, write_ablation, write_report

# Three paired seeds per arm. Means: AUC base .700, kd .710, rawseq .712, loopfm .720, kd_loopfm .735;
# NE base .900, kd .880, rawseq .885, loopfm .870, kd_loopfm .840. FM: AUC .78, NE .80.
AUC = {"base": [.700, .702, .698], "kd": [.710, .713, .707], "rawseq": [.712, .713, .711],
       "loopfm": [.720, .724, .716], "kd_loopfm": [.735, .7405, .7295]}
NE = {"base": [.900, .902, .898], "kd": [.880, .881, .879], "rawseq": [.885, .886, .884],
      "loopfm": [.870, .872, .868], "kd_loopfm": [.840, .842, .838]}
FM = {"auc": 0.78, "gauc": 0.70, "logloss": 0.40, "ne": 0.80}
META = {"seeds": [0, 1, 2], "config_hash": "abc123", "machine": "test-box"}


def arms(auc=AUC, ne=NE, only=None):
    return {a: [{"seed": s, "auc": auc[a][s], "gauc": auc[a][s] - 0.05, "logloss": ne[a][s] / 2, "ne": ne[a][s]}
                for s in range(len(auc[a]))] for a in auc if only is None or a in only}


def claims(report):
    return {c["claim"].split(" (")[0].split(":")[0]: c for c in report["claims"]}


def test_tr_from_means_and_per_pair_with_ci():
    r = build_report(arms(), FM, META)
    # TR_NE from means: kd (.90-.88)/(.90-.80) = .2, loopfm .3, kd_loopfm .6
    # TR_AUC: kd (.71-.70)/(.78-.70) = .125, loopfm .25, kd_loopfm .4375
    assert r["tr"]["kd"] == pytest.approx({"ne": 0.2, "auc": 0.125})
    assert r["tr"]["loopfm"] == pytest.approx({"ne": 0.3, "auc": 0.25})
    assert r["tr"]["kd_loopfm"] == pytest.approx({"ne": 0.6, "auc": 0.4375})
    assert r["tr"]["rawseq"]["ne"] == pytest.approx(0.15)
    # per pair, kd on NE: .02/.10 = .2, .021/.102 = .2058824, .019/.098 = .1938776
    ps = r["tr_per_pair"]["kd"]["ne"]
    assert ps["values"] == pytest.approx([0.2, 0.2058824, 0.1938776])
    assert ps["mean"] == pytest.approx(0.19991997)
    lo, hi = ps["ci95"]  # mean ± t(.975, df 2) * sd / sqrt(3)
    assert (hi - lo) / 2 == pytest.approx(4.302653 * statistics.stdev(ps["values"]) / 3 ** 0.5, rel=1e-5)
    assert r["arms"]["base"]["auc"]["mean"] == pytest.approx(0.700)
    assert r["arms"]["kd"]["auc"]["std"] == pytest.approx(0.003)
    assert r["fm"]["auc"]["mean"] == 0.78 and r["fm"]["auc"]["n"] == 1
    assert r["decomposition"]["auc"] == pytest.approx(
        {"gain_kd": .01, "gain_loopfm": .02, "gain_both": .035, "interaction": .005})
    # kd - base on AUC = [.010, .011, .009]: mean .01, sd .001 -> t = 17.32 (df 2) -> p = .00332
    kd = r["comparisons"]["kd_vs_base"]["auc"]
    assert kd["p"] == pytest.approx(0.0033165, rel=1e-3) and kd["mean"] == pytest.approx(0.01)
    assert kd["ci95"] == pytest.approx([0.01 - 4.302653 * 0.001 / 3 ** 0.5, 0.01 + 4.302653 * 0.001 / 3 ** 0.5])
    assert r["fm_knowledge"]["loopfm_vs_rawseq"]["auc"]["mean"] == pytest.approx(0.008)
    assert r["meta"] == META


def test_claims_hold_only_with_evidence():
    c = claims(build_report(arms(), FM, META))
    assert all(x["verdict"] == "holds" for x in c.values()), c
    # interaction per pair is [.005, .0055, .0045] -> holds; TR double: (.6 - 1.5 * .2) per pair > 0 -> holds
    assert c["KD and LoopFM are complementary"]["verdict"] == "holds"
    assert c["FM knowledge over raw history"]["verdict"] == "holds"
    # the FM's claim pairs each base run with the one FM: .08 -> no variance in the FM, but base varies
    assert c["FM beats the base VM"]["verdict"] == "holds"


def test_a_gap_on_the_means_without_evidence_is_not_shown():
    """The old report ticked '+LoopFM beats +KD' from the means at p = .15; now it reads 'not shown'."""
    auc = dict(AUC, loopfm=[.730, .712, .736, .700, .720], kd=[.710, .713, .707, .712, .708],
               base=[.700, .702, .698, .701, .699], rawseq=[.712, .713, .711, .714, .710],
               kd_loopfm=[.7352, .7362, .7342, .7355, .7349])
    ne = {a: (v * 5)[:5] for a, v in NE.items()}
    r = build_report(arms(auc, ne), FM, META)
    c = claims(r)
    ev = r["comparisons"]["loopfm_vs_kd"]["auc"]
    assert ev["mean"] > 0 and ev["p"] > 0.05
    assert c["+LoopFM beats +KD"]["verdict"] == "not shown" and not c["+LoopFM beats +KD"]["holds"]
    assert "not shown" not in c["+KD+LoopFM beats +KD"]["verdict"]
    lo, hi = ev["ci95"]
    assert lo < 0 < hi and f"{ev['p']:.3g}" in c["+LoopFM beats +KD"]["evidence"]


def test_complementarity_is_a_test_of_the_interaction():
    """gain_both > max(gain_kd, gain_loopfm) is not complementarity; a noisy +0.0002 interaction is not shown."""
    auc = {"base": [.700, .705, .695, .702, .698], "kd": [.712, .713, .707, .716, .702],
           "loopfm": [.719, .725, .716, .722, .718], "kd_loopfm": [.7312, .7402, .7222, .7352, .7232]}
    ne = {a: [.9] * 5 for a in auc}
    r = build_report(arms(auc, ne), FM, META)
    c = claims(r)
    assert r["decomposition"]["auc"]["gain_both"] > max(r["decomposition"]["auc"]["gain_kd"],
                                                        r["decomposition"]["auc"]["gain_loopfm"])
    assert abs(r["interaction"]["auc"]["mean"]) < 0.001
    assert c["KD and LoopFM are complementary"]["verdict"] == "not shown"


def test_transfer_claims_need_an_fm_that_beats_the_base_vm():
    """An FM worse than the base VM makes every TR's denominator negative: no TR claim is judged then."""
    c = claims(build_report(arms(), dict(FM, auc=0.69, ne=0.95), META))
    assert c["FM beats the base VM"]["verdict"] == "reversed"
    tr = c["TR(+KD+LoopFM) >= 1.5 x TR(+KD) on NE"]
    assert tr["verdict"] == "not computed" and "does not beat the base VM" in tr["evidence"]


def test_a_significant_loss_reads_reversed():
    auc = dict(AUC, rawseq=[.730, .731, .729])  # raw history beats the FM's embeddings
    c = claims(build_report(arms(auc), FM, META))
    assert c["FM knowledge over raw history"]["verdict"] == "reversed"
    assert not c["FM knowledge over raw history"]["holds"]


def test_fm_replicates_pair_runs_by_replicate_and_seed():
    """Two FM replicates x 3 seeds: each run's TR uses its own replicate's FM; order does not matter."""
    def runs(values):
        return [{"fm_seed": r, "seed": s, "auc": values[r][s], "gauc": 0.6, "logloss": 0.4, "ne": 1 - values[r][s]}
                for r in range(2) for s in range(3)]
    base = runs([[.70, .71, .69], [.72, .73, .71]])
    kd = runs([[.71, .72, .70], [.74, .75, .73]])
    fm = [{"fm_seed": 0, "auc": .75, "gauc": .6, "logloss": .4, "ne": .25}, {"fm_seed": 1, "auc": .82, "gauc": .6,
                                                                               "logloss": .4, "ne": .18}]
    r = build_report({"base": base, "kd": kd}, fm, META)
    want = [.01 / .05, .01 / .04, .01 / .06, .02 / .10, .02 / .09, .02 / .11]  # each over its own FM's gap
    assert r["tr_per_pair"]["kd"]["auc"]["values"] == pytest.approx(want)
    assert r["arms"]["base"]["auc"]["n"] == 6 and r["fm"]["auc"]["mean"] == pytest.approx(0.785)
    shuffled = build_report({"base": base, "kd": list(reversed(kd))}, list(reversed(fm)), META)
    got, want_kd = shuffled["comparisons"]["kd_vs_base"]["auc"], r["comparisons"]["kd_vs_base"]["auc"]
    assert (got["mean"], got["p"], *got["ci95"]) == pytest.approx((want_kd["mean"], want_kd["p"], *want_kd["ci95"]))
    assert shuffled["tr_per_pair"]["kd"]["auc"]["values"] == pytest.approx(want)


def test_missing_arms_are_skipped_not_fatal():
    r = build_report(arms(only={"base", "loopfm"}), [FM], META)
    assert set(r["tr"]) == {"loopfm"} and r["decomposition"] == {}
    assert set(r["comparisons"]) == {"loopfm_vs_base"}
    c = claims(r)
    assert c["+LoopFM beats the base VM"]["holds"] and c["+LoopFM beats the base VM"]["computed"]
    for name in ("+LoopFM beats +KD", "KD and LoopFM are complementary", "FM knowledge over raw history"):
        assert not c[name]["computed"] and not c[name]["holds"] and c[name]["verdict"] == "not computed"
        assert "not computed" in c[name]["evidence"]
    assert any("'kd' not run" in n for n in r["notes"])
    # no FM at all: no TR, no crash
    r = build_report(arms(only={"base"}), None, META)
    assert r["tr"] == {} and not claims(r)["FM beats the base VM"]["computed"]


def test_seeds_pair_by_seed_key_not_by_position():
    a = arms()
    shuffled = {k: list(reversed(v)) if k == "kd" else v for k, v in a.items()}
    got, want = build_report(shuffled, FM, META)["comparisons"], build_report(a, FM, META)["comparisons"]
    for key in want:
        assert got[key]["auc"]["p"] == pytest.approx(want[key]["auc"]["p"], nan_ok=True), key
    # by position the reversed kd seeds would pair differently and give another p
    no_seed = {k: [{m: v for m, v in d.items() if m != "seed"} for d in runs] for k, runs in shuffled.items()}
    assert build_report(no_seed, FM, META)["comparisons"]["kd_vs_base"]["auc"]["p"] != pytest.approx(
        want["kd_vs_base"]["auc"]["p"])


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
    for text in ("base VM", "+KD", "+LoopFM", "+KD+LoopFM", "+raw history", "| FM |", "abc123", "test-box",
                 "holds", "not shown", "Transfer ratio", "interaction", "FM knowledge over raw history", "95% CI"):
        assert text in md
    for png in ("arms.png", "transfer.png"):
        img = imread(tmp_path / "report" / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0


def test_write_report_partial_has_no_transfer_plot(tmp_path):
    paths = write_report(build_report(arms(only={"base"}), None, META), tmp_path)
    assert {p.name for p in paths} == {"report.json", "report.md", "arms.png"}
    assert "not computed" in (tmp_path / "report.md").read_text()  # not-computed claims are marked as such


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
