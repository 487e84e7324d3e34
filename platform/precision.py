"""The numeric precision of every model forward: one policy for FM training, extraction and VM training.

On a CUDA device, matmuls in float32 may use TF32 (`set_float32_matmul_precision("high")`, and
cuDNN's TF32), and forwards run under bf16 autocast: weights and optimizer state stay float32,
the matmuls and attention take bf16 operands, and reductions, softmax and the losses stay float32
(autocast's own lists; the loops also turn the outputs to float32 before the loss). bf16 has
float32's exponent range, so no loss scaling is needed. On any other device nothing changes:
`autocast` is a no-op context and CPU runs compute exactly what they computed before.

    device = gpu_precision(device)          # once, where a stage picks its device
    with autocast(device):
        out = model(batch)
    loss = loss_fn(float32(out), batch)     # float32 outside the autocast region

No Ray here: models/, actors/ and the training loops all use it.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Union

import torch

AUTOCAST_DTYPE = torch.bfloat16


def uses_autocast(device: Union[torch.device, str]) -> bool:
    """Whether forwards on `device` run under bf16 autocast (CUDA only)."""
    return torch.device(device).type == "cuda"


def gpu_precision(device: Union[torch.device, str]) -> torch.device:
    """Allow TF32 for float32 matmuls and convolutions when `device` is CUDA (a process-wide
    setting, so it is made where a stage picks its device); returns the device."""
    device = torch.device(device)
    if uses_autocast(device):
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: Union[torch.device, str]) -> AbstractContextManager:
    """bf16 autocast on CUDA; elsewhere a context that does nothing."""
    device = torch.device(device)
    if not uses_autocast(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=AUTOCAST_DTYPE)


def float32(out):
    """A model's output (a tensor, or a dict of them) as float32, for the loss and the metrics."""
    if isinstance(out, dict):
        return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
    return out.float() if out.is_floating_point() else out


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
