"""Shared pieces of the typed config: the strict base model and the error that names the key."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """A config section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True)


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad key path."""


def format_validation_error(err: ValidationError, source: str = "config") -> ConfigError:
    """Turn pydantic's error list into lines of `key.path: problem (allowed / got)`."""
    lines = [f"invalid {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(err.title, parent)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {path}: unknown key{hint}")
            continue
        got = e.get("input")
        got_text = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        lines.append(f"  {path}: {e['msg']}{got_text}")
    return ConfigError("\n".join(lines))


_MODELS: dict[str, type[BaseModel]] = {}


def register_root(model: type[BaseModel]) -> type[BaseModel]:
    """Remember the root model so unknown-key errors can list the allowed keys."""
    _MODELS[model.__name__] = model
    return model


def _allowed_keys(title: str, loc: tuple) -> list[str]:
    model = _MODELS.get(title)
    for part in loc:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(model.model_fields) if model is not None else []


def stable_hash(*parts: Any, length: int = 12) -> str:
    """Hash of JSON-able parts (config sections, versions): run ids and stage fingerprints."""
    payload = []
    for p in parts:
        payload.append(p.model_dump(mode="json") if isinstance(p, BaseModel) else p)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
