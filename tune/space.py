"""The search space: `tune.space` (ParamSpec per dotted config key) <-> Optuna distributions.

Optuna's categorical distribution only holds None, bool, int, float and str. Choices that are
anything else (`embed.layers: [[1], [2], [1, 2]]`) are sampled by a JSON label (`"[1, 2]"`) and
decoded back when the trial builds its config, so every config key can be searched.
"""

from __future__ import annotations

import json
from typing import Any

import optuna.distributions as od

from loopfm.config import LoopFMConfig, ParamSpec
from loopfm.store import codec

PRIMITIVE = (type(None), bool, int, float, str)


def _is_primitive(value: Any) -> bool:
    return isinstance(value, PRIMITIVE)


def encode_choice(value: Any) -> Any:
    """What Optuna samples for one categorical choice: the value itself, or its JSON label."""
    return value if _is_primitive(value) else json.dumps(value, sort_keys=True)


def needs_labels(spec: ParamSpec) -> bool:
    return spec.type == "categorical" and not all(_is_primitive(c) for c in spec.choices)


def to_distribution(spec: ParamSpec):
    """One ParamSpec as an Optuna distribution."""
    if spec.type == "categorical":
        return od.CategoricalDistribution([encode_choice(c) for c in spec.choices])
    if spec.type == "int":
        low, high = int(spec.low), int(spec.high)
        if (low, high) != (spec.low, spec.high):
            raise ValueError(f"int parameter needs whole bounds, got {spec.low}..{spec.high}")
        return od.IntDistribution(low, high)
    if spec.type == "loguniform":
        if spec.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {spec.low}")
        return od.FloatDistribution(spec.low, spec.high, log=True)
    return od.FloatDistribution(spec.low, spec.high)


def optuna_space(space: dict[str, ParamSpec]) -> dict:
    """`tune.space` as the `{name: distribution}` dict OptunaSearch takes (names = dotted keys)."""
    for key in space:
        if "/" in key:  # Tune (un)flattens config dicts on "/"
            raise ValueError(f"search key {key!r} must be a dotted config path without '/'")
    return {key: to_distribution(spec) for key, spec in space.items()}


def decode(params: dict[str, Any], space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Sampled params (as Optuna holds them) -> config overrides (the real values)."""
    out = {}
    for key, value in params.items():
        spec = space.get(key)
        if spec is not None and spec.type == "categorical":
            labels = {encode_choice(c): c for c in spec.choices}
            if value not in labels:
                raise ValueError(f"{key}: {value!r} is not one of the choices {spec.choices}")
            value = labels[value]
        elif spec is not None and spec.type == "int":
            value = int(value)
        out[key] = value
    return out


def validate_space(cfg: LoopFMConfig) -> None:
    """Every key is a config path, and every choice / bound gives a valid config."""
    space = cfg.tune.space
    if not space:
        raise ValueError("tune.space is empty: nothing to search")
    optuna_space(space)
    for key, spec in space.items():
        values = spec.choices if spec.type == "categorical" else [spec.low, spec.high]
        if spec.type == "int":
            values = [int(v) for v in values]
        for value in values:
            try:
                updated = cfg.updated({key: value})
            except Exception as err:  # ConfigError names the field
                raise ValueError(f"tune.space {key}={value!r} does not give a valid config: {err}") from None
            if _get(updated.model_dump(mode="json"), key) is _MISSING:
                raise ValueError(f"tune.space key {key!r} is not a config path")


_MISSING = object()


def _get(raw: dict, key: str):
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def serving_bytes(cfg: LoopFMConfig) -> int:
    """Bytes of stored FM embeddings one scoring request ships for its user: L x width (in the
    store's dtype, at the prefix width the VM reads)."""
    width = cfg.vm.loopfm_width or cfg.embed.compress.width
    return cfg.features.seq_len * codec.bytes_per_row(width, cfg.embed.compress.dtype)
