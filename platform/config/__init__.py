"""One typed config for every stage: `LoopFMConfig`, loaded from YAML plus `key.path=value` overrides."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import Field, ValidationError

from .base import ConfigError, Section, format_validation_error, register_root, stable_hash
from .compress import CompressConfig
from .data import ColumnMapping, DataConfig, MovieLensConfig, SplitConfig, SyntheticConfig, ValidationConfig
from .features import FeaturesConfig
from .fm import EmbedConfig, FMConfig
from .scale import FM_PRESETS, FMSize, ScaleConfig
from .serve import AutoscalingConfig, RayConfig, ServeConfig
from .tune import ParamSpec, TuneConfig, WandbConfig
from .vm import ARM_CHANNELS, ARMS, DEFAULT_ARMS, POOLINGS, VM_FEATURES, ExperimentConfig, TrainConfig, VMConfig


@register_root
class LoopFMConfig(Section):
    name: str = "default"
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    fm: FMConfig = Field(default_factory=FMConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    vm: VMConfig = Field(default_factory=VMConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def updated(self, overrides: dict[str, Any]) -> LoopFMConfig:
        """A copy with dotted-path overrides applied and re-validated (used by arms and tune)."""
        raw = self.model_dump(mode="json")
        for key, value in overrides.items():
            _set_path(raw, key, value)
        return validate_config(raw, source="overrides")

    def per_vertical(self) -> dict[int, LoopFMConfig]:
        """One config per vertical of `data.vertical`, each naming that vertical alone: what its
        feature set, VMs and report section are built from (this config itself for a single one)."""
        if isinstance(self.data.vertical, int):
            return {self.data.vertical: self}
        return {v: self.updated({"data.vertical": v}) for v in self.data.verticals}


def validate_config(raw: dict, source: str = "config") -> LoopFMConfig:
    try:
        return LoopFMConfig.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, source) from None


def parse_override(text: str) -> tuple[str, Any]:
    """`vm.pooling=mean` -> ("vm.pooling", "mean"); values parse as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = ()) -> LoopFMConfig:
    raw: dict = {}
    source = "config (built-in defaults)"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        source = f"config {p}"
    for text in overrides:
        key, value = parse_override(text)
        _set_path(raw, key, value)
    return validate_config(raw, source)


def _set_path(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


__all__ = [
    "ARMS", "ARM_CHANNELS", "DEFAULT_ARMS", "POOLINGS", "VM_FEATURES", "AutoscalingConfig", "ColumnMapping",
    "CompressConfig", "ConfigError", "DataConfig",
    "EmbedConfig", "ExperimentConfig", "FMConfig", "FMSize", "FM_PRESETS", "FeaturesConfig", "LoopFMConfig",
    "MovieLensConfig",
    "ParamSpec",
    "RayConfig", "ScaleConfig", "ServeConfig", "SplitConfig", "SyntheticConfig", "TrainConfig", "TuneConfig",
    "VMConfig", "ValidationConfig", "WandbConfig", "load_config", "parse_override", "stable_hash",
    "validate_config",
]
