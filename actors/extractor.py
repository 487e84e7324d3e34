"""The FM extractor as a Ray Data callable class: user chunks in, store rows out.

One actor holds the FM (and the compressor) for its lifetime; each call runs one causal forward
over a batch of chunks and emits every output position's row, so extraction costs one FM pass
per chunk, never one per event. Weights arrive as bytes in the constructor arguments (through
Ray's object store), so actors on any node need no shared filesystem to start.

    args = pool_args(actors, num_cpus, num_gpus, batch_size)
    args["fn_constructor_kwargs"].update(fm_weights=..., fm_manifest=..., layers=..., compressor=...)
    ds.map_batches(ChunkExtractor, **args)
"""

from __future__ import annotations

import ctypes
import io
import sys
from typing import Optional

import numpy as np
import pyarrow as pa
import torch
from ray.data import ActorPoolStrategy

from loopfm.config import CompressConfig, FMConfig
from loopfm.fm.chunks import TOKENS
from loopfm.models.autoencoder import MatryoshkaAE
from loopfm.models.fm import CausalFM
from loopfm.precision import autocast, gpu_precision
from loopfm.store import codec
from loopfm.store.schema import ROW_SCHEMA


class ChunkExtractor:
    """`mode="store"`: rows of ROW_SCHEMA (z compressed and encoded);
    `mode="raw"`: the uncompressed e of train events (the compressor's training sample).

    `gpu`: run on CUDA (bf16 autocast, `loopfm.precision`) or on the CPU, as the stage's
    `ray.use_gpu` says (`extractor_args` passes it); None: CUDA whenever this process sees one.
    An actor without a GPU resource still sees every GPU of its node (Ray leaves
    CUDA_VISIBLE_DEVICES alone when it assigns none), so the stage says it explicitly."""

    def __init__(self, fm_weights: bytes, fm_manifest: dict, layers: list[int],
                 compressor: Optional[dict] = None, dtype: str = "int4", mode: str = "store",
                 retain_memory: bool = False, gpu: Optional[bool] = None):
        if retain_memory:  # pool_args sets it: the actor's process is ours alone
            retain_freed_memory()
        cuda = torch.cuda.is_available() and (gpu is None or gpu)
        self.device = gpu_precision("cuda" if cuda else "cpu")
        self.fm = CausalFM(FMConfig.model_validate(fm_manifest["fm"]), fm_manifest["vocab_sizes"],
                           fm_manifest["num_surfaces"])
        self.fm.load_state_dict(torch.load(io.BytesIO(fm_weights), weights_only=True))
        self.fm.to(self.device).eval()
        self.layers, self.dtype, self.mode = list(layers), dtype, mode
        self.ae = None
        if compressor is not None:
            self.ae = build_compressor(compressor).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]):
        # copies: Ray hands read-only arrays
        tokens = {name: torch.tensor(batch[name], dtype=torch.long, device=self.device) for name in TOKENS}
        with autocast(self.device):
            logit, emb = self.fm.extract(tokens, self.layers)
        mask = batch["out"] & (batch["split"] == 0) if self.mode == "raw" else batch["out"]
        out = torch.as_tensor(mask, device=self.device)
        e = emb[out].float()  # float32 from here on (bf16 under autocast)
        if self.mode == "raw":  # the compressor's training sample: train events only
            return {"e": e.cpu().numpy()}
        z = self.ae.encode(e).cpu().numpy()
        users = np.broadcast_to(batch["user_id"][:, None], mask.shape)
        return pa.Table.from_arrays(
            [
                pa.array(batch["event_id"][mask], pa.int64()),
                pa.array(users[mask], pa.int64()),
                pa.array(batch["ts"][mask], pa.int64()),
                pa.array(batch["surface"][mask].astype(np.int32), pa.int32()),
                pa.array(logit[out].float().cpu().numpy(), pa.float32()),
                codec.rows_to_binary(codec.encode(z, self.dtype)),
            ],
            schema=ROW_SCHEMA,
        )


def pool_args(actors: int, num_cpus: float, num_gpus: float, batch_size: int) -> dict:
    """`map_batches` arguments that run ChunkExtractor on a fixed pool of `actors`.

    `enable_true_multi_threading=True` runs each call on the actor's main thread. Ray Data's
    default runs the callable class on a helper thread so that batching can overlap the call, but
    with one call in flight per actor nothing overlaps. The helper thread also allocates from its
    own glibc arena, which unmaps freed heaps every call. Measured at the default config: about
    300k page faults and 1 s of system time per 480k events, calls 25% slower than a bare loop.
    """
    return {"compute": ActorPoolStrategy(size=actors, enable_true_multi_threading=True),
            "num_cpus": num_cpus, "num_gpus": num_gpus, "batch_size": batch_size, "batch_format": "numpy",
            "fn_constructor_kwargs": {"retain_memory": True}}


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 256 << 20


def retain_freed_memory() -> bool:
    """Keep freed memory in this process's heap instead of giving it back to the OS (glibc only).

    Every call allocates the same large activations (MiBs each) and frees them. By default glibc
    serves blocks of that size with fresh mmaps, or trims them off the heap, so the next call
    page-faults all of them in again. With the mmap threshold at its 32 MiB maximum and a trim
    threshold of 256 MiB, they are reused. Returns whether the allocator accepted the setting.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others: nothing to tune
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def build_compressor(spec: dict):
    """A MatryoshkaAE from `{"raw_width", "compress" (CompressConfig JSON), "weights" (bytes)}`."""
    ae = MatryoshkaAE(spec["raw_width"], CompressConfig.model_validate(spec["compress"]))
    ae.load_state_dict(torch.load(io.BytesIO(spec["weights"]), weights_only=True))
    return ae

