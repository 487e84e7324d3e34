"""Config of the vertical model: its features, architecture, training and the experiment arms."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt

from .base import Section

Arm = Literal["base", "kd", "loopfm", "kd_loopfm"]
ARMS: tuple[str, ...] = ("base", "kd", "loopfm", "kd_loopfm")


class VMConfig(Section):
    model: Literal["dnn", "deepfm", "dcnv2", "din"] = "dnn"
    embed_dim: PositiveInt = 16
    hidden: list[PositiveInt] = Field(default_factory=lambda: [128, 64])
    dropout: float = Field(0.0, ge=0, lt=1)
    cross_layers: PositiveInt = 2
    pooling: Literal["mean", "sum", "attention"] = "attention"
    loopfm_width: Optional[PositiveInt] = Field(None, description="prefix of stored z to use; None = all")


class TrainConfig(Section):
    """One VM training run; `use_kd` / `use_loopfm` are set per arm by the experiment."""

    use_kd: bool = False
    use_loopfm: bool = False
    kd_lambda: float = Field(0.5, ge=0)
    kd_temperature: PositiveFloat = 1.0
    aux_head: bool = False
    epochs: PositiveInt = 4
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 2e-3
    weight_decay: float = Field(0.0, ge=0)
    patience: PositiveInt = 2
    num_workers: int = Field(1, ge=0)
    seed: int = 0
    # "memory": each Train worker keeps the shards it streamed in the first epoch and shuffles them
    # in its own memory after; "stream": every epoch streams through Ray Data again (memory flat
    # at any size); "auto": memory when the feature splits are small next to this machine's memory.
    data_cache: Literal["auto", "memory", "stream"] = "auto"


class ExperimentConfig(Section):
    arms: list[Arm] = Field(default_factory=lambda: list(ARMS))
    seeds: PositiveInt = 3
