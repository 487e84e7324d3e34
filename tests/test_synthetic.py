"""The synthetic generator: deterministic, unique ids however it is chunked, rates that follow its model.

Expected rates are derived from the documented generative process (docs/SYNTHETIC.md), with
tolerances from the spread that process implies, never from a previous run's numbers.
"""

import numpy as np
import pyarrow.parquet as pq
import pytest

from loopfm.datasets import synthetic
from loopfm.datasets.schema import EVENT_ID, LABEL, SURFACE, USER_ID


@pytest.fixture
def cfg(smoke_config):
    return smoke_config.data.synthetic


def generate(cfg, out, **overrides):
    cfg = cfg.model_copy(update=overrides)
    out.mkdir(parents=True)
    synthetic.generate(cfg, out, parallel=False)
    return cfg, pq.read_table(sorted(out.glob("*.parquet")))


def test_same_seed_writes_identical_files(cfg, tmp_path):
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.parquet"))
    assert (names == sorted(p.name for p in (tmp_path / "b").glob("*.parquet"))
            and len(names) == synthetic.num_chunks(cfg))
    for name in names:
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))
    _, other_seed = generate(cfg, tmp_path / "c", seed=cfg.seed + 1)
    assert not other_seed.equals(pq.read_table(sorted((tmp_path / "a").glob("*.parquet"))))


@pytest.mark.parametrize("users_per_chunk", [37, 300])
def test_event_ids_are_unique_whatever_the_chunking(cfg, tmp_path, users_per_chunk):
    cfg, log = generate(cfg, tmp_path / "log", users_per_chunk=users_per_chunk)
    ids = log[EVENT_ID].to_numpy()
    assert len(np.unique(ids)) == len(ids)
    assert len(np.unique(log[USER_ID].to_numpy())) == cfg.num_users


def expected_click_rate(cfg, surface_offset: float) -> float:
    """E[sigmoid(logit)] when items are shown at random: the logit is about normal with mean
    base_logit + offset and variance long^2 + short^2 + bias^2 + noise^2 (each interest term
    sqrt(k) <p, v> has unit variance by construction)."""
    var = cfg.long_weight**2 + cfg.short_weight**2 + cfg.item_bias_scale**2 + cfg.noise**2
    z, w = np.polynomial.hermite_e.hermegauss(60)
    logit = cfg.base_logit + surface_offset + np.sqrt(var) * z
    return float((w / w.sum() / (1 + np.exp(-logit))).sum())


def test_click_rate_follows_the_logit_model_and_rises_with_personalization(cfg, tmp_path):
    random_cfg, random_log = generate(cfg, tmp_path / "random", personalization=0.0)
    rate = random_log[LABEL].to_numpy().mean()
    spread = 2 * synthetic.SURFACE_OFFSET_SD  # the world's surface offsets, two standard deviations
    assert expected_click_rate(random_cfg, -spread) < rate < expected_click_rate(random_cfg, spread)
    _, personal_log = generate(cfg, tmp_path / "personal", personalization=1.0)
    assert personal_log[LABEL].to_numpy().mean() > rate  # shown items match interests: more clicks


def test_surface_shares_follow_vertical_share(cfg, tmp_path):
    cfg, log = generate(cfg, tmp_path / "log")
    share = np.bincount(log[SURFACE].to_numpy(), minlength=cfg.num_surfaces) / log.num_rows
    # A user's vertical share V ~ Beta(mean vertical_share, concentration c); the rest is split by
    # a flat Dirichlet, so surface s > 0 gets (1 - V) D with D ~ Beta(1, S - 2).
    s, v, c = cfg.num_surfaces, cfg.vertical_share, synthetic.MIX_CONCENTRATION
    var_v = v * (1 - v) / (c + 1)
    mean = np.array([v] + [(1 - v) / (s - 1)] * (s - 1))
    second_moment_rest = (var_v + (1 - v) ** 2) * 2 / ((s - 1) * s)
    var = np.array([var_v] + [second_moment_rest - mean[1] ** 2] * (s - 1))
    weighting = np.exp(synthetic.ACTIVITY_SIGMA**2)  # shares are event-weighted; counts are log-normal
    tolerance = 4 * np.sqrt(var * weighting / cfg.num_users)
    assert (np.abs(share - mean) < tolerance).all(), (share, mean, tolerance)
