"""What every VM shares: its input fields, its head and the ExFM auxiliary head.

A zoo model writes only what is different, in two methods (FuxiCTR's `BaseModel` split):
`build` creates its interaction layers over the concatenated fields and returns the width of
the hidden vector it hands the head; `interact` maps the fields to that vector, plus an extra
logit term where the model has one (DeepFM's first and second order). Modules are created in
the order inputs, interaction, head, auxiliary head, so a seed gives the same weights as ever.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from loopfm.config import VMConfig

from ..inputs import InputSpec, VMInputs
from ..layers import vm_output


class VMBase(nn.Module):
    def __init__(self, cfg: VMConfig, spec: InputSpec, aux_head: bool = False):
        super().__init__()
        self.inputs = VMInputs(self.input_spec(spec), cfg.embed_dim)
        out_dim = self.build(cfg, self.inputs.num_fields * cfg.embed_dim)
        self.head = nn.Linear(out_dim, 1)
        self.aux = nn.Linear(out_dim, 1) if aux_head else None

    def input_spec(self, spec: InputSpec) -> InputSpec:
        """The inputs this model reads; a model may fix a choice of the spec (DIN's attention)."""
        return spec

    def build(self, cfg: VMConfig, in_dim: int) -> int:
        """Create the interaction layers over `in_dim` concatenated field features; return the
        width of the hidden vector `interact` produces."""
        raise NotImplementedError

    def interact(self, fields: list[torch.Tensor],
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Fields [(B, D)] * F -> (hidden (B, out_dim), an extra (B, 1) logit term or None)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h, extra = self.interact(self.inputs(batch), batch)
        logit = self.head(h) if extra is None else extra + self.head(h)
        return vm_output(logit, h, self.aux)
