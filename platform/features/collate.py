"""Feature rows -> VM batch tensors, as the `collate_fn` of Ray Data's `iter_torch_batches`.

The collate takes Arrow batches (`ArrowBatchCollateFn`, which Ray 2.60 recommends): converting to
numpy first would build a Python object per row for the packed `seq_z` bytes and the `hist_items`
lists, and on the training path that conversion costs more than the decode. Usage:

    ds.iter_torch_batches(batch_size=512, collate_fn=VMBatchCollate(manifest, width=cfg.vm.loopfm_width))
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from loopfm.features.reader import FeaturesManifest, arrow_columns, decode_batch


class VMBatchCollate(ArrowBatchCollateFn):
    def __init__(self, manifest: FeaturesManifest, width: Optional[int] = None, device: Optional[str] = None,
                 with_seq: bool = True, with_raw: bool = False):
        self.manifest, self.width, self.device = manifest, width, device
        self.with_seq, self.with_raw = with_seq, with_raw

    def __call__(self, table) -> dict[str, torch.Tensor]:
        return self.tensors(arrow_columns(table, self.manifest))

    def tensors(self, columns: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Numpy feature columns -> the VM batch as tensors on this collate's device."""
        return self.to_device(self.decode(columns))

    def decode(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Numpy feature columns -> the VM batch as numpy arrays, one row per example. Decoding is
        row-wise, so rows taken from a decoded shard (`take`) equal the decode of those rows."""
        return decode_batch(columns, self.manifest, self.width, self.with_seq, self.with_raw)

    def take(self, decoded: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of `rows` from arrays `decode` made: what `tensors` gives for those rows."""
        return self.to_device({k: v[rows] for k, v in decoded.items()})

    @property
    def key(self) -> tuple:
        """What decides the decoded arrays (VMs with equal keys can share one decoded shard)."""
        return (self.manifest.fingerprint, self.width, self.with_seq, self.with_raw)

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tensors = {k: _tensor(v) for k, v in arrays.items()}
        return tensors if self.device is None else {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy when numpy owns a writable buffer; read-only views of Arrow buffers are copied."""
    return torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
