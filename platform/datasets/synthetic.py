"""The seeded multi-surface log generator (docs/DESIGN.md, 'Synthetic default'; docs/SYNTHETIC.md tells the story).

Generative process, per user u and event n:

  items      v_i = sqrt(rho) * c_cat(i) + sqrt(1 - rho) * eps_i        (latent, shared by surfaces)
             every item lives on one surface; b_i ~ N(0, item_bias_scale^2)
  users      p_u ~ N(0, I/k)                                         (stable long-term interest)
             q_u(n) = sqrt(1 - d) q_u(n-1) + sqrt(d) eta_n              (drifting short-term interest)
  activity   surface of each event ~ the user's surface mix (vertical share ~ Beta around
             vertical_share); times uniform over num_days, sorted
  exposure   with prob. personalization the item's category is drawn by the user's interest,
             otherwise the item is uniform on the surface
  click      logit = long_weight * sqrt(k) <p_u, v_i> + short_weight * sqrt(k) <q_u(n), v_i>
                     + b_i + base_logit + surface_offset_s + noise * N(0, 1);  label ~ Bernoulli
  taste      (only when taste_weight > 0) logit += taste_weight * sqrt(m) <g_u, f_i>, with
             f_i ~ N(0, I/m) per item and g_u ~ N(0, I/m) per user, m = taste_dim

The long-term interest is spread across every surface; a model that sees one surface's short
history recovers it poorly, one that sees the long cross-surface history (the FM) recovers it
well. `vertical_share`, `long_weight` and `events_per_user` move that gap.

The taste term is the FM capacity study's knob (docs/DESIGN.md, 'FM capacity study'): an item-level
interest, unrelated to categories, of `taste_dim` dimensions. An FM narrower than that cannot hold
the items' taste vectors, so a bigger FM has more to learn. Its draws come from their own streams,
(seed, 2) and (seed, 3, chunk), taken only when the weight is above 0: at 0 every other draw, and
so the log, is exactly what it was before the knob existed, and so is the generator's fingerprint.

Users are generated in chunks of `users_per_chunk`, one Ray task and one parquet file per chunk,
so 10M events never sit in memory at once. A chunk's output depends only on (seed, chunk index).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from loopfm.config import LoopFMConfig, SyntheticConfig, stable_hash
from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, SURFACE, TS, USER_ID
from loopfm.rundir import RunDir, read_manifest
from loopfm.runtime import log
from loopfm.skeleton import run_stage

SEGMENT = "user_segment"
NUM_SEGMENTS = 8
CATEGORY_RHO = 0.7
SECONDS_PER_DAY = 86_400
CHUNK_ID_SHIFT = 32  # event_id = chunk << 32 | row: unique without coordination between chunks
SURFACE_OFFSET_SD = 0.3  # click-logit offset of surfaces 1.. (surface 0 has none)
ACTIVITY_SIGMA = 0.6  # log-normal spread of events per user
MIX_CONCENTRATION = 4.0  # Beta concentration of a user's share of events on surface 0


@dataclass(frozen=True)
class World:
    """Everything shared by all users: items, categories, surfaces, segment directions."""

    item_vec: np.ndarray  # (num_items, k)
    item_cat: np.ndarray  # (num_items,)
    item_surface: np.ndarray  # (num_items,)
    item_bias: np.ndarray  # (num_items,)
    cat_vec: np.ndarray  # (num_categories, k)
    surface_offset: np.ndarray  # (num_surfaces,)
    segment_dirs: np.ndarray  # (NUM_SEGMENTS, k)
    items_by_surface_cat: dict  # (surface, category) -> item ids
    items_by_surface: dict  # surface -> item ids
    item_taste: Optional[np.ndarray] = None  # (num_items, taste_dim); None when taste_weight is 0


def make_world(cfg: SyntheticConfig) -> World:
    rng = np.random.default_rng([cfg.seed, 0])
    k, n_items, n_cats, n_surf = cfg.latent_dim, cfg.num_items, cfg.num_categories, cfg.num_surfaces
    cat_vec = rng.normal(0, 1 / np.sqrt(k), (n_cats, k))
    item_cat = rng.integers(0, n_cats, n_items)
    item_vec = np.sqrt(CATEGORY_RHO) * cat_vec[item_cat] + np.sqrt(1 - CATEGORY_RHO) * rng.normal(
        0, 1 / np.sqrt(k), (n_items, k)
    )
    item_surface = np.arange(n_items) % n_surf
    item_bias = rng.normal(0, cfg.item_bias_scale, n_items)
    surface_offset = np.concatenate([[0.0], rng.normal(0, SURFACE_OFFSET_SD, n_surf - 1)])
    segment_dirs = rng.normal(0, 1, (NUM_SEGMENTS, k))
    by_sc: dict = {}
    for s in range(n_surf):
        for c in range(n_cats):
            ids = np.flatnonzero((item_surface == s) & (item_cat == c))
            if len(ids):
                by_sc[(s, c)] = ids
    by_s = {s: np.flatnonzero(item_surface == s) for s in range(n_surf)}
    taste = None
    if cfg.taste_weight > 0:  # its own stream: the draws above stay what they were without the knob
        taste = np.random.default_rng([cfg.seed, 2]).normal(0, 1 / np.sqrt(cfg.taste_dim), (n_items, cfg.taste_dim))
    return World(item_vec, item_cat, item_surface, item_bias, cat_vec, surface_offset, segment_dirs, by_sc, by_s,
                 taste)


def num_chunks(cfg: SyntheticConfig) -> int:
    return -(-cfg.num_users // cfg.users_per_chunk)


def generate_chunk(cfg: SyntheticConfig, world: World, chunk: int) -> pa.Table:
    """Events of users [chunk * users_per_chunk, ...), sorted by (user, ts)."""
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    k = cfg.latent_dim
    first = chunk * cfg.users_per_chunk
    users = np.arange(first, min(first + cfg.users_per_chunk, cfg.num_users))
    n_users = len(users)

    # Activity: heavy-tailed event counts around events_per_user, a per-user surface mix.
    sigma = ACTIVITY_SIGMA
    counts = np.maximum(5, rng.lognormal(np.log(cfg.events_per_user) - sigma**2 / 2, sigma, n_users)).astype(int)
    mix = _surface_mix(rng, cfg, n_users)

    long_int = rng.normal(0, 1 / np.sqrt(k), (n_users, k))
    segment = np.argmax((long_int + rng.normal(0, 0.5 / np.sqrt(k), (n_users, k))) @ world.segment_dirs.T, axis=1)

    user_rows = np.repeat(np.arange(n_users), counts)
    total = len(user_rows)

    short_int = _short_interest(rng, counts, k, cfg.short_drift)  # (total, k), per event
    cum = np.cumsum(mix[user_rows], axis=1)
    surface = (rng.random(total)[:, None] > cum).sum(axis=1).clip(0, cfg.num_surfaces - 1)

    items = _expose(rng, cfg, world, long_int[user_rows] + short_int, surface)
    vec = world.item_vec[items]
    logit = (
        cfg.long_weight * np.sqrt(k) * np.einsum("nk,nk->n", long_int[user_rows], vec)
        + cfg.short_weight * np.sqrt(k) * np.einsum("nk,nk->n", short_int, vec)
        + world.item_bias[items]
        + cfg.base_logit
        + world.surface_offset[surface]
        + cfg.noise * rng.normal(size=total)
    )
    if world.item_taste is not None:
        logit += cfg.taste_weight * _taste(cfg, world, chunk, n_users, user_rows, items)
    label = (rng.random(total) < 1 / (1 + np.exp(-logit))).astype(np.int8)

    horizon = cfg.num_days * SECONDS_PER_DAY
    ts = np.empty(total, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for u in range(n_users):
        ts[offsets[u] : offsets[u + 1]] = np.sort(rng.integers(0, horizon, counts[u]))

    return pa.table(
        {
            EVENT_ID: (np.int64(chunk) << CHUNK_ID_SHIFT) + np.arange(total, dtype=np.int64),
            USER_ID: users[user_rows].astype(np.int64),
            ITEM_ID: items.astype(np.int64),
            CATEGORY: world.item_cat[items].astype(np.int64),
            SURFACE: surface.astype(np.int32),
            TS: ts,
            LABEL: label,
            SEGMENT: segment[user_rows].astype(np.int64),
        }
    )


def _taste(cfg: SyntheticConfig, world: World, chunk: int, n_users: int, user_rows: np.ndarray,
           items: np.ndarray) -> np.ndarray:
    """Per event, the unit-variance taste score sqrt(m) <g_u, f_i>; the users' g from the chunk's own stream."""
    m = cfg.taste_dim
    user_taste = np.random.default_rng([cfg.seed, 3, chunk]).normal(0, 1 / np.sqrt(m), (n_users, m))
    return np.sqrt(m) * np.einsum("nm,nm->n", user_taste[user_rows], world.item_taste[items])


def generator_fingerprint(cfg: SyntheticConfig) -> str:
    """What names a generated log: the config, less the taste knobs while the taste is off.

    At taste_weight 0 the log is the one written before the knob existed, so its fingerprint is too:
    run directories generated then stay current, and nothing downstream re-runs.
    """
    off = {"taste_weight", "taste_dim"} if cfg.taste_weight == 0 else set()
    return stable_hash(cfg.model_dump(mode="json", exclude=off))


def _surface_mix(rng: np.random.Generator, cfg: SyntheticConfig, n_users: int) -> np.ndarray:
    if cfg.num_surfaces == 1:
        return np.ones((n_users, 1))
    c = MIX_CONCENTRATION
    vertical = rng.beta(cfg.vertical_share * c, (1 - cfg.vertical_share) * c, n_users)
    rest = rng.dirichlet(np.ones(cfg.num_surfaces - 1), n_users) * (1 - vertical)[:, None]
    return np.concatenate([vertical[:, None], rest], axis=1)


def _short_interest(rng: np.random.Generator, counts: np.ndarray, k: int, drift: float) -> np.ndarray:
    """AR(1) per user: stationary N(0, I/k), innovation share `drift` per event.

    Vectorized over users, looping over positions (the longest user's event count).
    """
    eta = rng.normal(0, 1 / np.sqrt(k), (int(counts.sum()), k))
    out = np.empty_like(eta)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    keep, fresh = np.sqrt(1 - drift), np.sqrt(drift)
    state = eta[starts].copy()
    out[starts] = state
    for n in range(1, int(counts.max())):
        active = np.flatnonzero(counts > n)
        rows = starts[active] + n
        state[active] = keep * state[active] + fresh * eta[rows]
        out[rows] = state[active]
    return out


def _expose(rng, cfg: SyntheticConfig, world: World, interest: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Pick the shown item: interest-driven category with prob. `personalization`, else uniform."""
    total = len(surface)
    items = np.empty(total, dtype=np.int64)
    personal = rng.random(total) < cfg.personalization
    scores = interest @ world.cat_vec.T * np.sqrt(cfg.latent_dim) * 2.0
    gumbel = -np.log(-np.log(rng.random(scores.shape)))
    wanted_cat = np.argmax(scores + gumbel, axis=1)
    for s in range(cfg.num_surfaces):
        pool = world.items_by_surface[s]
        on_s = surface == s
        uniform = on_s & ~personal
        items[uniform] = rng.choice(pool, uniform.sum())
        for c in np.unique(wanted_cat[on_s & personal]):
            sel = on_s & personal & (wanted_cat == c)
            cat_pool = world.items_by_surface_cat.get((s, c), pool)
            items[sel] = rng.choice(cat_pool, sel.sum())
    return items


def _write_chunk(cfg_json: str, chunk: int, out_dir: str) -> int:
    cfg = SyntheticConfig.model_validate_json(cfg_json)
    table = generate_chunk(cfg, make_world(cfg), chunk)
    pq.write_table(table, f"{out_dir}/part-{chunk:05d}.parquet", row_group_size=65_536)  # a path or a URI
    return table.num_rows


def generate(cfg: SyntheticConfig, out_dir: Path, parallel: bool = True) -> dict:
    """Write the log as one parquet file per user chunk; returns a summary for the manifest."""
    cfg_json = cfg.model_dump_json()
    n = num_chunks(cfg)
    if parallel and ray.is_initialized():
        task = ray.remote(num_cpus=1)(_write_chunk)
        rows = _gather_with_progress([task.remote(cfg_json, c, str(out_dir)) for c in range(n)])
    else:
        rows = [_write_chunk(cfg_json, c, str(out_dir)) for c in range(n)]
    return {"rows": int(sum(rows)), "files": n, "categorical": [SEGMENT]}


def _gather_with_progress(refs: list) -> list:
    done: dict = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done[ready[0]] = ray.get(ready[0])
        log.info("data generate: %d/%d chunks written", len(done), len(refs))
    return [done[r] for r in refs]


def generate_stage(cfg: LoopFMConfig, run: RunDir) -> Path:
    """`loopfm data generate`: the synthetic log under <out>/data/source (skipped if current)."""
    fingerprint = generator_fingerprint(cfg.data.synthetic)

    def build(tmp: Path) -> dict:
        summary = generate(cfg.data.synthetic, tmp)
        log.info("data generate: %d events in %d files -> %s", summary["rows"], summary["files"], run.source)
        return {"fingerprint": fingerprint, "generator": "synthetic", **summary}

    run_stage("data generate", run.source, fingerprint, build, read=read_manifest, ray=cfg.ray)
    return run.source


def describe(path: Path) -> str:
    return json.dumps(json.loads((Path(path) / "manifest.json").read_text()), indent=2)
