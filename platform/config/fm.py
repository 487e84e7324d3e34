"""Config of the foundation model, its training, and extraction + compression into the store."""

from __future__ import annotations

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from .base import Section
from .compress import CompressConfig


class FMConfig(Section):
    """A causal transformer over each user's events on all surfaces (models/fm.py)."""

    d_model: PositiveInt = 64
    n_layers: PositiveInt = 2
    n_heads: PositiveInt = 4
    d_ff: PositiveInt = 256
    window: PositiveInt = Field(32, description="events each position attends to, per layer")
    chunk_len: PositiveInt = Field(
        128, description="events per training / extraction chunk; padding is computed too, "
        "so keep it near a typical history"
    )
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: PositiveInt = 5
    batch_size: PositiveInt = Field(32, description="chunks per step")
    lr: PositiveFloat = 1e-3
    weight_decay: float = Field(0.0, ge=0)
    patience: PositiveInt = 2
    num_workers: int = Field(1, ge=0, description="Ray Train workers (0 runs in the driver)")
    seed: int = Field(0, description="initialisation and data-order seed; experiment.fm_seeds sets it per replicate")

    @model_validator(mode="after")
    def _shapes(self) -> FMConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.chunk_len <= self.context:
            raise ValueError(
                f"chunk_len ({self.chunk_len}) must exceed the receptive field n_layers * (window - 1) = {self.context}"
            )
        return self

    @property
    def context(self) -> int:
        """Predecessors a position's output depends on: chunks overlap by this much."""
        return self.n_layers * (self.window - 1)


class EmbedConfig(Section):
    """Extraction through Ray Data actors: which layers, how many actors, how big a batch."""

    layers: list[int] = Field(default_factory=lambda: [1], description="0 = input tokens, k = output of block k")
    batch_size: PositiveInt = Field(64, description="user chunks per actor call")
    num_actors: PositiveInt = 1
    actor_num_cpus: PositiveFloat = 1.0
    compress: CompressConfig = Field(default_factory=CompressConfig)
