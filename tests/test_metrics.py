"""AUC, GAUC, log loss and NE against numbers worked out by hand on tiny arrays."""

import math

import numpy as np
import pytest

from loopfm.evaluation.metrics import MetricAccumulator, auc, evaluate, gauc, logloss, ne


def test_auc_by_hand_with_a_tie():
    # positives score .9, .5; negatives .1, .5. Pairs (pos, neg): (.9,.1)=1 (.9,.5)=1 (.5,.1)=1
    # (.5,.5)=tie=1/2 -> 3.5 / 4.
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.5, 0.5]) == pytest.approx(0.875)


def test_auc_by_hand_without_ties():
    # pos .8 .4 .1, neg .6 .2: .8 beats both (2), .4 beats .2 (1), .1 beats none -> 3 / 6.
    assert auc([1, 1, 0, 0, 1], [0.8, 0.4, 0.6, 0.2, 0.1]) == pytest.approx(0.5)


def test_auc_all_tied_is_half_and_one_class_is_nan():
    assert auc([1, 0, 1, 0], [0.3] * 4) == pytest.approx(0.5)
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([], []))


def test_auc_matches_brute_force_on_random_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 7, 300).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(y, s) == pytest.approx(brute)


def test_labels_must_be_binary():
    with pytest.raises(ValueError):
        auc([1, 0.5], [0.1, 0.2])


def test_gauc_weights_by_impressions_and_skips_one_class_users():
    # user a: labels 1,0,0 scores .8,.3,.9 -> pos .8 beats .3 not .9 -> AUC 1/2, 3 impressions
    # user b: labels 1,0,1,0,1 scores .7,.2,.6,.6,.1 -> pos (.7,.6,.1) vs neg (.2,.6):
    #   1 + 1 + 1 + 1/2 + 0 + 0 = 3.5 / 6, 5 impressions
    # user c: labels 1,1 (one class) -> skipped, its 2 impressions are not in the weights
    # GAUC = (3 * 0.5 + 5 * 3.5/6) / 8 = 0.5520833...  (the unweighted mean would be 0.5417)
    rows = [("a", 1, .8), ("b", 1, .7), ("c", 1, .5), ("a", 0, .3), ("b", 0, .2), ("b", 1, .6),
            ("c", 1, .4), ("a", 0, .9), ("b", 0, .6), ("b", 1, .1)]
    u, y, s = zip(*rows)
    assert gauc(u, y, s) == pytest.approx(0.5520833333)
    # integer ids, shuffled order: same answer
    perm = np.random.default_rng(1).permutation(len(rows))
    ids = np.array([{"a": 7, "b": 3, "c": 11}[x] for x in u])
    assert gauc(ids[perm], np.array(y)[perm], np.array(s)[perm]) == pytest.approx(0.5520833333)


def test_gauc_nan_when_no_user_has_both_classes():
    assert math.isnan(gauc([1, 1, 2], [1, 1, 0], [0.2, 0.3, 0.4]))


def test_logloss_and_ne_by_hand():
    # -(ln .8 + ln .6 + ln .5 + ln .9) / 4 = 0.3831192; label rate 1/2 -> H = ln 2 = 0.6931472
    y, p = [1, 0, 1, 0], [0.8, 0.4, 0.5, 0.1]
    assert logloss(y, p) == pytest.approx(0.383119217824)
    assert ne(y, p) == pytest.approx(0.552724195625)


def test_ne_of_the_base_rate_predictor_is_one():
    # predicting the label rate everywhere: log loss = H(rate), so NE = 1 (rate 1/4 here)
    assert ne([1, 0, 0, 0, 1, 0, 0, 0], [0.25] * 8) == pytest.approx(1.0)
    assert math.isnan(ne([0, 0], [0.1, 0.2]))


def test_evaluate_from_logits_is_exact_and_ranks_logits():
    y = np.array([1, 0, 1, 0])
    z = np.log(np.array([0.8, 0.4, 0.5, 0.1]) / (1 - np.array([0.8, 0.4, 0.5, 0.1])))
    m = evaluate(y, z, user=[0, 0, 1, 1])
    assert m["logloss"] == pytest.approx(0.383119217824)
    assert m["ne"] == pytest.approx(0.552724195625)
    assert m["n"] == 4 and m["label_rate"] == 0.5
    assert m["auc"] == pytest.approx(1.0) and m["gauc"] == pytest.approx(1.0)
    # a confidently wrong logit of 50 costs 50 nats (clipping at eps=1e-7 would say ~16.1)
    assert evaluate([0], [50.0])["logloss"] == pytest.approx(50.0)
    # sigmoid(40) == sigmoid(41) == 1.0 in float64; ranking logits keeps them apart
    assert evaluate([0, 1], [40.0, 41.0])["auc"] == 1.0
    assert math.isnan(evaluate([0, 1], [0.0, 1.0])["gauc"])


def test_accumulator_over_batches_equals_one_shot():
    rng = np.random.default_rng(2)
    u, y, z = rng.integers(0, 20, 500), rng.integers(0, 2, 500), rng.normal(size=500)
    acc, other = MetricAccumulator(), MetricAccumulator()
    for lo in range(0, 300, 64):
        hi = min(lo + 64, 300)
        acc.add(u[lo:hi], y[lo:hi], z[lo:hi])
    other.add(u[300:], y[300:], z[300:])
    got = acc.merge(other).result()
    assert len(acc) == 500
    assert got == pytest.approx(evaluate(y, z, u), nan_ok=True)
    assert MetricAccumulator().result()["n"] == 0
