"""Config of the Matryoshka compressor that turns raw FM activations into stored z."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from .base import Section


class CompressConfig(Section):
    """Matryoshka autoencoder: z = tanh(enc(e)); every prefix in prefix_widths reconstructs e."""

    width: PositiveInt = 32
    prefix_widths: list[PositiveInt] = Field(default_factory=lambda: [8, 16, 32])
    dtype: Literal["int4", "fp16"] = "int4"
    hidden: PositiveInt = 128
    epochs: PositiveInt = 20
    sample_events: PositiveInt = 50_000
    batch_size: PositiveInt = 1024
    lr: PositiveFloat = 2e-3

    @model_validator(mode="after")
    def _prefixes(self) -> CompressConfig:
        bad = [w for w in self.prefix_widths if w > self.width]
        if bad:
            raise ValueError(f"prefix_widths {bad} exceed width {self.width}")
        if self.dtype == "int4" and self.width % 2:
            raise ValueError("int4 packs two values per byte: width must be even")
        return self
