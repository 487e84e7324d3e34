"""Feature rows -> VM batch tensors, as the `collate_fn` of Ray Data's `iter_torch_batches`.

Ray 2.60 deprecates plain functions as `collate_fn`; it wants a `NumpyBatchCollateFn`. Usage:

    ds.iter_torch_batches(batch_size=512, collate_fn=VMBatchCollate(manifest, width=cfg.vm.loopfm_width))
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from loopfm.features.reader import FeaturesManifest, decode_batch


class VMBatchCollate(NumpyBatchCollateFn):
    def __init__(self, manifest: FeaturesManifest, width: Optional[int] = None, device: Optional[str] = None,
                 with_seq: bool = True):
        self.manifest, self.width, self.device, self.with_seq = manifest, width, device, with_seq

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        decoded = decode_batch(batch, self.manifest, self.width, self.with_seq)
        tensors = {k: _tensor(v) for k, v in decoded.items()}
        return tensors if self.device is None else {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy when numpy owns a writable buffer; Ray's read-only column views are copied."""
    return torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
