"""Config of the vertical model: its features, architecture, training and the experiment arms."""

from __future__ import annotations

import functools
import importlib.util
import pkgutil
from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from .base import Section

# The experiment's arms, defined once: arm -> the channels it switches on (kd, loopfm, rawseq).
# `rawseq` is LoopFM's control: the same sequence slots filled with raw tokens, no FM.
ARM_CHANNELS: dict[str, tuple[bool, bool, bool]] = {
    "base": (False, False, False),
    "kd": (True, False, False),
    "rawseq": (False, False, True),
    "kd_rawseq": (True, False, True),
    "loopfm": (False, True, False),
    "kd_loopfm": (True, True, False),
}
ARMS: tuple[str, ...] = tuple(ARM_CHANNELS)
DEFAULT_ARMS: tuple[str, ...] = ("base", "kd", "rawseq", "loopfm", "kd_loopfm")
Arm = Literal[ARMS]  # type: ignore[valid-type]
# The VM's own point-in-time features (every arm gets them): the vertical's label-aware history
# and the user/item counters.
VM_FEATURES: tuple[str, ...] = ("history", "counters")
VMFeature = Literal[VM_FEATURES]  # type: ignore[valid-type]
POOLINGS: tuple[str, ...] = ("mean", "sum", "attention")
Pooling = Literal[POOLINGS]  # type: ignore[valid-type]


@functools.cache
def vm_names() -> tuple[str, ...]:
    """The VM zoo's architectures, defined once: one module each in models/vm/ (every module but
    `base`), found without importing them, so the config needs no torch."""
    spec = importlib.util.find_spec("loopfm.models.vm")
    modules = pkgutil.iter_modules(spec.submodule_search_locations)
    return tuple(sorted(m.name for m in modules if m.name != "base" and not m.name.startswith("_")))


class DCNv2Settings(Section):
    """Read by `vm.model: dcnv2` only."""

    cross_layers: PositiveInt = 2


class VMConfig(Section):
    model: str = Field("dnn", description="the architecture: a module of models/vm/ (vm_names())")
    features: list[VMFeature] = Field(default_factory=lambda: list(VM_FEATURES),
                                      description="the VM's own point-in-time features (every arm)")
    embed_dim: PositiveInt = 16
    hidden: list[PositiveInt] = Field(default_factory=lambda: [128, 64])
    dropout: float = Field(0.1, ge=0, lt=1)
    pooling: Pooling = "attention"
    loopfm_width: Optional[PositiveInt] = Field(None, description="prefix of stored z to use; None = all")
    dcnv2: DCNv2Settings = Field(default_factory=DCNv2Settings)

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if model not in vm_names():
            raise ValueError(f"unknown VM {model!r}: one of {', '.join(vm_names())}")
        return model


class TrainConfig(Section):
    """One VM training run; `use_kd` / `use_loopfm` / `use_rawseq` are set per arm by the experiment."""

    use_kd: bool = False
    use_loopfm: bool = False
    use_rawseq: bool = False
    kd_lambda: float = Field(0.5, ge=0)
    kd_temperature: PositiveFloat = 1.0
    aux_head: bool = False
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 2e-3
    weight_decay: float = Field(0.0, ge=0, description="L2 on the dense layers (Adam's coupled decay)")
    embedding_l2: float = Field(1e-3, ge=0, description="L2 on the id embedding tables, as CTR libraries' "
                                "embedding_regularizer: rare ids shrink instead of memorizing their few labels")
    select_by: Literal["logloss", "auc"] = Field(
        "logloss", description="valid metric that picks the kept epoch and drives early stopping")
    patience: PositiveInt = 2
    num_workers: int = Field(0, ge=0, description="Ray Train workers; 0 = Train's local mode in the driver, which "
                             "suits the report's many small VMs (no worker-group start-up per fit)")
    seed: int = 0
    # "memory": each Train worker keeps the shards it streamed in the first epoch and shuffles them
    # in its own memory after; "stream": every epoch streams through Ray Data again (memory flat
    # at any size); "auto": memory when the feature splits are small next to this machine's memory.
    data_cache: Literal["auto", "memory", "stream"] = "auto"


    @model_validator(mode="after")
    def _one_sequence(self) -> TrainConfig:
        if self.use_loopfm and self.use_rawseq:
            raise ValueError("use_loopfm and use_rawseq are exclusive: rawseq is LoopFM's control")
        return self


class ExperimentConfig(Section):
    arms: list[Arm] = Field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: PositiveInt = Field(5, description="VM seeds, paired across arms")
    fm_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                                description="FM replicates: one FM, store and feature set per seed; every VM "
                                "seed is trained under each")
