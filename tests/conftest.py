"""Shared fixtures: one local Ray per test session, progress bars off, W&B offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    """A session-wide local Ray with more logical CPUs than cores (DESIGN section 8)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.shuffle_strategy = "sort_shuffle_pull_based"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_config():
    from loopfm.config import load_config

    cfg = load_config(SMOKE)
    return cfg.updated({"ray.progress_bars": False})
