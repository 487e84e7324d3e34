"""TR, gain decomposition, paired tests and summaries against hand-computed numbers."""

import math

import pytest
from scipy import stats

from loopfm.evaluation.transfer import gain_decomposition, improvement, paired_ttest, summarize, transfer_ratio


def test_improvement_is_positive_when_better_whatever_the_direction():
    assert improvement({"ne": 0.90}, {"ne": 0.85}, "ne") == pytest.approx(0.05)
    assert improvement({"logloss": 0.40}, {"logloss": 0.45}, "logloss") == pytest.approx(-0.05)
    assert improvement({"auc": 0.70}, {"auc": 0.72}, "auc") == pytest.approx(0.02)
    assert improvement(0.70, 0.69, "gauc") == pytest.approx(-0.01)
    with pytest.raises(ValueError):
        improvement(1.0, 2.0, "accuracy")


def test_transfer_ratio_by_hand():
    # NE: (0.90 - 0.85) / (0.90 - 0.80) = 0.5 ; AUC: (0.72 - 0.70) / (0.78 - 0.70) = 0.25
    base, ch, fm = {"ne": 0.90, "auc": 0.70}, {"ne": 0.85, "auc": 0.72}, {"ne": 0.80, "auc": 0.78}
    assert transfer_ratio(base, ch, fm, "ne") == pytest.approx(0.5)
    assert transfer_ratio(base, ch, fm, "auc") == pytest.approx(0.25)
    # a channel that hurts has negative TR; one that beats the FM has TR > 1
    assert transfer_ratio(base, {"ne": 0.95}, fm, "ne") == pytest.approx(-0.5)
    assert transfer_ratio(base, {"ne": 0.75}, fm, "ne") == pytest.approx(1.5)
    # no FM-VM gap: undefined
    assert math.isnan(transfer_ratio(base, ch, {"ne": 0.90, "auc": 0.70}, "ne"))
    assert math.isnan(transfer_ratio(base, ch, {"ne": 0.90, "auc": 0.70}, "auc"))


def test_gain_decomposition_by_hand():
    # AUC: base .70, kd .71, loopfm .72, both .735 -> gains .01 .02 .035, interaction +.005
    g = gain_decomposition({"auc": .70}, {"auc": .71}, {"auc": .72}, {"auc": .735}, "auc")
    assert g == pytest.approx({"gain_kd": .01, "gain_loopfm": .02, "gain_both": .035, "interaction": .005})
    # NE (lower is better): base .90, kd .88, loopfm .87, both .86 -> gains .02 .03 .04, interaction -.01
    g = gain_decomposition({"ne": .90}, {"ne": .88}, {"ne": .87}, {"ne": .86}, "ne")
    assert g == pytest.approx({"gain_kd": .02, "gain_loopfm": .03, "gain_both": .04, "interaction": -.01})


def test_paired_ttest_equals_the_manual_formula():
    a, b = [1.0, 2.0, 3.0, 4.0], [1.1, 2.3, 2.9, 4.5]
    # d = a - b = [-.1, -.3, .1, -.5]: mean -.2, sd (ddof 1) = sqrt(.2 / 3) = .2581989
    # t = -.2 / (.2581989 / sqrt 4) = -1.5491933, df 3, p = 2 * P(T3 > 1.5491933) = 0.2191
    t = -0.2 / (math.sqrt(0.2 / 3) / 2)
    assert t == pytest.approx(-1.5491933)
    assert paired_ttest(a, b) == pytest.approx(2 * stats.t.sf(abs(t), 3))
    assert paired_ttest(a, b) == pytest.approx(0.21910204, abs=1e-7)
    assert paired_ttest(b, a) == pytest.approx(paired_ttest(a, b))


def test_paired_ttest_undefined_cases_are_nan():
    assert math.isnan(paired_ttest([0.7], [0.6]))  # one pair
    assert math.isnan(paired_ttest([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]))  # constant difference
    # a NaN pair is dropped: leaves one pair -> NaN; leaves enough -> a real p
    assert math.isnan(paired_ttest([0.7, float("nan")], [0.6, 0.5]))
    assert paired_ttest([1.0, 2.0, 3.0, 4.0, float("nan")], [1.1, 2.3, 2.9, 4.5, 9.0]) == pytest.approx(0.21910204)
    with pytest.raises(ValueError):
        paired_ttest([1.0, 2.0], [1.0])


def test_summarize():
    s = summarize([1.0, 2.0, 3.0])
    assert {k: s[k] for k in ("mean", "std", "n", "values")} == {
        "mean": 2.0, "std": 1.0, "n": 3, "values": [1.0, 2.0, 3.0]}
    assert s["ci95"] == pytest.approx([2.0 - 4.302653 / math.sqrt(3), 2.0 + 4.302653 / math.sqrt(3)])
    one = summarize([5.0])
    assert (one["mean"], one["std"], one["n"]) == (5.0, 0.0, 1) and all(math.isnan(b) for b in one["ci95"])
    s = summarize([1.0, float("nan"), 3.0])  # NaN visible in values, left out of the statistics
    assert (s["mean"], s["n"], len(s["values"])) == (2.0, 2, 3)
    assert s["std"] == pytest.approx(math.sqrt(2))
    assert math.isnan(summarize([])["mean"]) and summarize([])["n"] == 0
