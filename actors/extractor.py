"""The FM extractor as a Ray Data callable class: user chunks in, store rows out.

One actor holds the FM (and the compressor) for its lifetime; each call runs one causal forward
over a batch of chunks and emits every output position's row, so extraction costs one FM pass
per chunk, never one per event. Weights arrive as bytes in the constructor arguments (through
Ray's object store), so actors on any node need no shared filesystem to start.

    ds.map_batches(ChunkExtractor, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=n),
                   num_cpus=..., num_gpus=..., batch_size=...)
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from loopfm.fm.chunks import TOKENS
from loopfm.store import codec
from loopfm.store.schema import ROW_SCHEMA


class ChunkExtractor:
    """`mode="store"`: rows of ROW_SCHEMA (z compressed and encoded);
    `mode="raw"`: the uncompressed e of train events (the compressor's training sample)."""

    def __init__(self, fm_weights: bytes, fm_manifest: dict, layers: list[int],
                 compressor: Optional[dict] = None, dtype: str = "int4", mode: str = "store"):
        from loopfm.config import FMConfig
        from loopfm.models.fm import CausalFM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
        tokens = {name: torch.tensor(batch[name], dtype=torch.long, device=self.device) for name in TOKENS}  # copies: Ray hands read-only arrays
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logit, emb = self.fm.extract(tokens, self.layers)
        mask = batch["out"] & (batch["split"] == 0) if self.mode == "raw" else batch["out"]
        out = torch.as_tensor(mask, device=self.device)
        e = emb[out].float()
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


def build_compressor(spec: dict):
    """A MatryoshkaAE from `{"raw_width", "compress" (CompressConfig JSON), "weights" (bytes)}`."""
    from loopfm.config import CompressConfig
    from loopfm.models.autoencoder import MatryoshkaAE

    ae = MatryoshkaAE(spec["raw_width"], CompressConfig.model_validate(spec["compress"]))
    ae.load_state_dict(torch.load(io.BytesIO(spec["weights"]), weights_only=True))
    return ae

