"""Config of the search over KD / LoopFM mixes: space, Optuna, ASHA and W&B."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from .base import Section
from .vm import POOLINGS, Arm


class ParamSpec(Section):
    """One searched parameter; the key in `space` is the dotted config path it sets."""

    type: Literal["float", "loguniform", "int", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _complete(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices'")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} needs low < high")
        return self


def _default_space() -> dict[str, ParamSpec]:
    c, f = "categorical", "float"
    return {
        "train.kd_lambda": ParamSpec(type=f, low=0.0, high=2.0),
        "train.kd_temperature": ParamSpec(type=c, choices=[1.0, 2.0, 4.0]),
        "train.aux_head": ParamSpec(type=c, choices=[False, True]),
        "features.seq_len": ParamSpec(type=c, choices=[8, 16, 32]),
        "vm.loopfm_width": ParamSpec(type=c, choices=[8, 16, 32]),
        "vm.pooling": ParamSpec(type=c, choices=list(POOLINGS)),
        "embed.layers": ParamSpec(type=c, choices=[[1], [2], [1, 2]]),
        "features.lag": ParamSpec(type=c, choices=[0, 3600]),
        "train.lr": ParamSpec(type="loguniform", low=5e-4, high=5e-3),
    }


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "loopfm"
    group: Optional[str] = None


class TuneConfig(Section):
    """`loopfm tune`: Optuna (TPE) proposes, ASHA stops poor trials early, W&B records every trial.

    Each trial trains the VM of `arm` (with `train.seed`) through the same code as `loopfm train`;
    `metric` is its validation AUC or NE at the epoch early stopping keeps. A trial trains on
    `train.num_workers` Train workers (at least 1: Train's local mode cannot run inside a Tune
    trial), each reserving 1 CPU; `trial_cpus` is what the trial process itself reserves (it only
    waits on Train and runs the embed/features stages, whose Ray Data tasks reserve their own).
    Budget: max_concurrent_trials x (trial_cpus + num_workers) must leave CPUs for Ray Data.
    """

    arm: Arm = "kd_loopfm"
    num_samples: PositiveInt = 16
    max_concurrent_trials: PositiveInt = 1
    trial_cpus: PositiveFloat = 0.5
    metric: Literal["auc", "ne"] = "auc"
    second_objective: Optional[Literal["serving_bytes"]] = None
    space: dict[str, ParamSpec] = Field(default_factory=_default_space)
    seed: int = 0
    grace_period: PositiveInt = 1
    reduction_factor: PositiveInt = 2
    wandb: WandbConfig = Field(default_factory=WandbConfig)
