"""DIN: the DNN with the raw history pooled by target attention, the candidate item as query."""

from __future__ import annotations

from dataclasses import replace

from ..inputs import InputSpec
from .dnn import DNN


class DIN(DNN):
    def input_spec(self, spec: InputSpec) -> InputSpec:
        return replace(spec, history_pooling="attention")


VM = DIN
