"""The VM's side of scoring: requests' features -> one batched forward of the serving head.

`VMScorer` loads the checkpoint (`load_vm`: the model hash is re-checked) and scores a list of
requests in one forward: each request's user row is repeated once per candidate, the rows go
through `decode_batch`, the very function the training loop's collate step runs, so serving sees
the tensors training saw. The `@serve.batch` that gathers concurrent requests into one call is
`serve_apps.scoring.ScoringCore`'s, in the same replica as the feature lookup.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from loopfm.datasets.schema import CATEGORY, ITEM_ID, LABEL, USER_ID, idx
from loopfm.features.reader import DENSE, HISTORY_COLUMNS, KD_LOGIT, RAW_COLUMNS, SEQ_LEN_VALID, SEQ_Z, decode_batch
from loopfm.precision import autocast, gpu_precision
from loopfm.serve_apps.bundle import Bundle
from loopfm.training.checkpoint import load_vm

STALE = "stale"  # a request whose features came from another store version than this VM's


class VMScorer:
    def __init__(self, bundle: Bundle, device: str = "cpu"):
        self.bundle = bundle
        self.device = gpu_precision(device)
        self.model, self.manifest = load_vm(bundle.vm_dir)
        self.model.to(self.device)
        self.features = bundle.features
        self.with_seq = self.manifest.seq_width is not None
        self.loaded_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def assemble(self, requests: list[dict]) -> dict[str, np.ndarray]:
        """Feature rows of every candidate of every request, as the features stage writes them."""
        counts = np.array([len(r[idx(ITEM_ID)]) for r in requests])
        users = [r["user"] for r in requests]
        rows = {
            idx(ITEM_ID): np.concatenate([r[idx(ITEM_ID)] for r in requests]).astype(np.int64),
            idx(CATEGORY): np.concatenate([r[idx(CATEGORY)] for r in requests]).astype(np.int64),
            idx(USER_ID): np.repeat(np.array([u[idx(USER_ID)] for u in users], dtype=np.int64), counts),
            USER_ID: np.repeat(np.array([u[USER_ID] for u in users], dtype=np.int64), counts),
            SEQ_LEN_VALID: np.repeat(np.array([u[SEQ_LEN_VALID] for u in users], dtype=np.int32), counts),
            DENSE: np.concatenate([r[DENSE] for r in requests]).astype(np.float32),
        }
        for c in (*HISTORY_COLUMNS, *RAW_COLUMNS):
            rows[c] = np.repeat(np.stack([u[c] for u in users]).astype(np.int64), counts, axis=0)
        for c in self.manifest.context_columns:
            rows[c] = np.repeat(np.array([u[c] for u in users], dtype=np.int64), counts)
        rows[SEQ_Z] = np.repeat(np.array([u[SEQ_Z] for u in users], dtype=object), counts)
        n = int(counts.sum())
        rows[KD_LOGIT] = np.zeros(n, dtype=np.float32)  # the KD target is a training label: unused by the forward
        rows[LABEL] = np.zeros(n, dtype=np.float32)
        return rows

    @torch.inference_mode()
    def logits(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        batch = decode_batch(rows, self.features, self.manifest.seq_width, self.with_seq, self.manifest.rawseq)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in batch.items()}
        with autocast(self.device):
            logit = self.model(tensors)["logit"]
        return logit.float().cpu().numpy()

    def score(self, requests: list[dict]) -> list[dict]:
        """One forward for all `requests`; each gets its logits (or STALE, to be retried)."""
        fresh = [r.get("store_version") == self.manifest.store_version or not self.with_seq for r in requests]
        ok = [r for r, f in zip(requests, fresh) if f]
        out, start = [], 0
        logits = self.logits(self.assemble(ok)) if ok else np.zeros(0, dtype=np.float32)
        for r, f in zip(requests, fresh):
            if not f:
                out.append({STALE: True, "model_version": self.manifest.model_version})
                continue
            n = len(r[idx(ITEM_ID)])
            part = logits[start : start + n]
            out.append({"logits": part, "scores": 1.0 / (1.0 + np.exp(-part.astype(np.float64))),
                        "model_version": self.manifest.model_version,
                        "store_version": self.manifest.store_version, "store_head": r.get("store_head"),
                        "log_head": r.get("log_head"), "arm": self.manifest.arm,
                        "cold_start": r["cold_start"], "oov_items": r["oov_items"], "ts": r["ts"]})
            start += n
        return out

    def describe(self) -> dict:
        m = self.manifest
        return {"model_version": m.model_version, "arm": m.arm, "seed": m.seed, "vm": m.vm,
                "features_fingerprint": m.features_fingerprint, "store_version": m.store_version,
                "features_vertical": self.features.vertical, "seq_len": m.seq_len, "seq_width": m.seq_width,
                "raw_seq_len": m.raw_seq_len, "lag": self.features.lag, "retention": self.features.retention,
                "context_columns": list(m.context_columns), "test_metrics": m.metrics.get("test", {}),
                "vm_dir": str(self.bundle.vm_dir), "loaded_at": self.loaded_at}
