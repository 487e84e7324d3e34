"""The extractor pool over user chunks, shared by `loopfm embed` and `embed --incremental`.

A module of its own so that embed.py (which hands `--incremental` to incremental.py) and
incremental.py can both use it without importing each other.
"""

from __future__ import annotations

import ray

from loopfm.actors.extractor import ChunkExtractor, pool_args
from loopfm.config import LoopFMConfig
from loopfm.fm.checkpoint import FMManifest
from loopfm.runtime import use_gpu
from loopfm.weights import verified_bytes


def extractor_args(fm_dir, fm: FMManifest, cfg: LoopFMConfig) -> dict:
    """ChunkExtractor's constructor arguments for this FM: its verified weights as bytes, and
    whether it runs on the GPU (`ray.use_gpu`: the pool's actors and the driver's sample pass alike)."""
    return {"fm_weights": verified_bytes(fm_dir, fm.fm_version),
            "fm_manifest": {"fm": fm.fm, "vocab_sizes": fm.vocab_sizes, "num_surfaces": fm.num_surfaces},
            "layers": cfg.embed.layers, "gpu": use_gpu(cfg.ray)}


def extract_rows(chunks, cfg: LoopFMConfig, fm_args: dict, compressor: dict):
    """Store rows of every output position of `chunks`, through the extractor actor pool (lazy)."""
    args = pool_args(cfg.embed.num_actors, cfg.embed.actor_num_cpus, actor_gpus(cfg.embed.num_actors, fm_args["gpu"]),
                     cfg.embed.batch_size)
    args["fn_constructor_kwargs"].update(fm_args, compressor=compressor, dtype=cfg.embed.compress.dtype)
    return chunks.map_batches(ChunkExtractor, **args)


def actor_gpus(actors: int, gpu: bool) -> float:
    """GPUs per extractor actor: one each while the cluster has one for each, else an equal share of
    what it has (more actors than GPUs would otherwise wait forever for a whole one)."""
    if not gpu:
        return 0
    have = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return 1.0 if have >= actors or have == 0 else have / actors
