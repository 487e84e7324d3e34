"""Drift views on known moves, and on real stores: a new FM moves the space far more than new days."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from loopfm.evaluation.drift import drift_stats


def _gauss(n: int, seed: int, width: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, width)) * np.linspace(0.2, 1.0, width)


def test_same_distribution_shows_no_drift():
    d = drift_stats(_gauss(4000, 0), _gauss(4000, 1))
    assert 0.45 < d["classifier_auc"] < 0.56
    assert d["centroid_shift"] < 0.06 and d["mean_shift"] < 0.06 and d["var_shift"] < 0.08


def test_each_view_sees_its_move():
    a = _gauss(4000, 0)
    shifted = drift_stats(a, _gauss(4000, 1) + 0.5)
    assert shifted["classifier_auc"] > 0.9 and shifted["centroid_shift"] > 0.5 * np.sqrt(8) * 0.9
    scaled = drift_stats(a, _gauss(4000, 1) * 2.0)
    assert scaled["var_shift"] > 1.2 and scaled["centroid_shift"] < 0.15  # variance moved, centroid did not


@pytest.mark.timeout(300)
def test_a_new_fm_drifts_more_than_new_days(smoke_config, smoke_embedded, tmp_path):
    from loopfm.evaluation.drift import drift_stage
    from loopfm.fm.embed import embed_stage
    from loopfm.fm.train import fm_train_stage
    from loopfm.rundir import RunDir

    source, _, store = smoke_embedded
    run = RunDir(tmp_path / "run")
    shutil.copytree(source.root, run.root)
    other_cfg = smoke_config.updated({"fm.seed": 1, "fm.num_workers": 0, "fm.epochs": 1})  # another FM: its own seed
    fm_train_stage(other_cfg, run)
    other = embed_stage(other_cfg, run)
    assert other.fm_version != store.fm_version

    rows = drift_stage(smoke_config, run, slices=3, stores=[store.store_version, other.store_version])
    days = [r for r in rows if r["comparison"].startswith("slice")]
    fm = [r for r in rows if r["comparison"].startswith("store")]
    assert len(days) == 2 and len(fm) == 1 and fm[0]["rows_old"] > 1000
    assert fm[0]["classifier_auc"] > 0.9
    assert fm[0]["classifier_auc"] > max(r["classifier_auc"] for r in days) + 0.1
    assert fm[0]["centroid_shift"] > 2 * max(r["centroid_shift"] for r in days)
    for name in ("drift.md", "drift.json", "drift.png"):
        assert (run.report / name).is_file()
