"""`loopfm embed`: every event's FM representation, compressed, into a versioned store.

    splits -> user chunks (one shuffle) -> map_batches(ChunkExtractor actor pool) -> store/<version>/

First a sample of train events goes through the FM uncompressed to train the Matryoshka
autoencoder (stop-gradient by construction: the FM is frozen here); then one pass over every
chunk writes (event_id, user_id, ts, surface, fm_logit, z). The store version is
`stable_hash(fm_version, embed.layers, embed.compress, compressor hash)`, named once the compressor
is trained (`store.resolve.store_version`); the store is sealed (row count = event count, unique
ids, file hashes) inside a temp directory before it appears under that name. A store this config
already built from this FM (any compressor) is current: the stage finds it by its manifest.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from pathlib import Path

import numpy as np
import torch

from loopfm.actors.extractor import ChunkExtractor
from loopfm.config import LoopFMConfig
from loopfm.datasets.splits import SplitInfo
from loopfm.errors import MissingInputError, UnsupportedLocationError
from loopfm.fm.checkpoint import FMManifest
from loopfm.fm.chunks import build_chunks, keep_chunks
from loopfm.fm.extract import extract_rows, extractor_args
from loopfm.fm.incremental import incremental_embed
from loopfm.fm.train import TRAIN, Cutoffs, fm_fingerprint, split_cutoffs
from loopfm.models import autoencoder
from loopfm.ordering import ordered_data
from loopfm.rundir import RunDir, committed
from loopfm.runtime import init_ray, log
from loopfm.skeleton import publish
from loopfm.store import codec
from loopfm.store.parquet import seal
from loopfm.store.resolve import store_version, stores_of
from loopfm.store.schema import COMPRESSOR_FILE, StoreManifest
from loopfm.weights import MODEL_FILE


def embed_stage(cfg: LoopFMConfig, run: RunDir, incremental: bool = False, since: str = "last",
                cutoffs: Cutoffs = None) -> StoreManifest:
    """`loopfm embed` (with `cutoffs`: the store of the FM trained only on events before them;
    with `incremental`: only the log's events newer than `since`, as a delta)."""
    if incremental:
        if run.remote:
            raise UnsupportedLocationError(
                f"embed --incremental: the run directory {run.root} is a URI; a store's delta chain has one writer "
                "at a time (store.deltas.chain_lock), and an object store gives no lock that excludes a writer on "
                "another machine: run it on a local or mounted run directory")
        return incremental_embed(cfg, run, since)
    info = SplitInfo.load(run)
    fm_dir = run.fm(fm_fingerprint(cfg, info, cutoffs))
    if not (committed(fm_dir) / MODEL_FILE).is_file():
        raise MissingInputError(f"no FM for this config at {fm_dir}: run `loopfm fm train` first")
    fm = FMManifest.read(fm_dir)
    built = stores_of(cfg, run, fm.fm_version)
    if built:
        log.info("embed: store %s is current, skipped", built[-1][0])
        return built[-1][1]
    init_ray(cfg.ray)
    started = time.time()
    fm_args = extractor_args(fm_dir, fm, cfg)
    with ordered_data():  # the same sample, and the same chunks in every extractor call, on every run
        chunks = build_chunks(run, cfg, split_cutoffs(info, cutoffs)).materialize()

    sample = _raw_sample(chunks, cfg, ChunkExtractor(**fm_args, mode="raw"))
    compressor, stats = _train_compressor(sample, cfg, log)
    log.info("embed: compressor trained on %d train events (raw width %d -> %d), recon mse by prefix %s",
             len(sample), sample.shape[1], cfg.embed.compress.width, stats["recon_error"])

    total_events = sum(info.rows.values())
    blob = io.BytesIO()
    torch.save(compressor, blob)  # incremental embedding reuses it
    compressor_hash = hashlib.sha256(blob.getvalue()).hexdigest()
    version = store_version(fm.fm_version, cfg.embed, compressor_hash)
    out = run.store(version)
    def build(tmp: Path) -> StoreManifest:
        extract_rows(chunks, cfg, fm_args, compressor).write_parquet(str(tmp))
        (tmp / COMPRESSOR_FILE).write_bytes(blob.getvalue())
        return seal(tmp, StoreManifest(
            store_version=version, fm_version=fm.fm_version, checkpoint_hash=fm.fm_version,
            layers=list(cfg.embed.layers), raw_width=int(sample.shape[1]), width=cfg.embed.compress.width,
            prefix_widths=list(cfg.embed.compress.prefix_widths), dtype=cfg.embed.compress.dtype,
            recon_error=stats["recon_error"], quant_error=stats["quant_error"], compressor_hash=compressor_hash,
        ), expected_rows=total_events, stage="embed")

    manifest = publish(out, build)
    seconds = time.time() - started
    log.info("embed: %d events in %.1fs (%.0f events/s) -> store %s", manifest.rows, seconds,
             manifest.rows / max(seconds, 1e-9), out)
    return manifest


def _raw_sample(chunks, cfg: LoopFMConfig, extractor) -> np.ndarray:
    """Uncompressed e of about `compress.sample_events` train events (whole chunks, first ones).

    Runs in the driver: the sample is small, and an actor pool would cost a worker start-up.
    """
    train = chunks.map_batches(keep_chunks, batch_format="numpy", fn_args=((TRAIN,),))
    per_chunk = max(1, cfg.fm.chunk_len - cfg.fm.context)
    n_chunks = math.ceil(cfg.embed.compress.sample_events / per_chunk)
    batches = train.limit(n_chunks).iter_batches(batch_format="numpy", batch_size=cfg.embed.batch_size)
    parts = [extractor(batch)["e"] for batch in batches]
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if len(sample) < 10:
        raise MissingInputError(f"only {len(sample)} train events to fit the compressor on")
    return sample[: cfg.embed.compress.sample_events]


def _train_compressor(sample: np.ndarray, cfg: LoopFMConfig, log) -> tuple[dict, dict]:
    """Fit the autoencoder; measure reconstruction by prefix and the storage codec's error.

    Seeded by `fm.seed`, so the same FM and config train the same compressor on one machine; the
    store version hashes the trained weights too, for when they still come out different."""
    compress = cfg.embed.compress
    e = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    ae, stats = autoencoder.train_autoencoder(e, compress, seed=cfg.fm.seed,
                                              log=lambda line: log.info("embed: %s", line))
    with torch.no_grad():
        z = ae.encode(e).numpy()
        quant = {}
        for dtype in ("int4", "fp16"):
            zq = codec.decode(codec.encode(z, dtype), dtype, compress.width)
            quant[f"{dtype}_max_abs"] = float(np.abs(z - zq).max())
            quant[f"{dtype}_recon_mse"] = float(((ae.decode(torch.from_numpy(zq)) - e) ** 2).mean())
    buf = io.BytesIO()
    torch.save(ae.state_dict(), buf)
    spec = {"raw_width": int(e.shape[1]), "compress": compress.model_dump(mode="json"), "weights": buf.getvalue()}
    return spec, {"recon_error": stats["recon_error"], "quant_error": quant}
