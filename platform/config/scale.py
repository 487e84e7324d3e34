"""Config of the FM capacity study (`loopfm scale`): the FM shapes it trains, one FM per shape.

Each size replaces the shape keys of the `fm` section (d_model, n_layers, n_heads, d_ff) and
nothing else, so every FM of the study shares its data, window, epochs and seed, and each gets
its own fingerprint, store and feature set. Whether a shape fits the rest of the config (its
receptive field inside `fm.chunk_len`, `embed.layers` inside its blocks) is checked when the study
starts (`loopfm.training.scale.size_configs`), not here: a root-level check would refuse every
other command as soon as `fm.window` or `embed.layers` was overridden past a size of the study.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, PositiveInt, field_validator, model_validator

from .base import Section
from .fm import FMConfig

SHAPE_KEYS: tuple[str, ...] = ("d_model", "n_layers", "n_heads", "d_ff")


def _default_shape() -> dict[str, int]:
    return {k: FMConfig.model_fields[k].default for k in SHAPE_KEYS}


# Named shapes. Item embeddings grow with d_model and blocks with d_model^2 x n_layers, so xs to
# xl spans more than the 30x in parameters the study asks for on any log with a few thousand
# items (the study prints the exact counts of the built FMs). "m" is the `fm` section's own
# default, so a study on a finished default run reuses that run's FM, store and VMs.
FM_PRESETS: dict[str, dict[str, int]] = {
    "xs": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32},
    "s": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 128},
    "m": _default_shape(),
    "l": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512},
    "xl": {"d_model": 256, "n_layers": 4, "n_heads": 8, "d_ff": 1024},
}


class FMSize(Section):
    """One FM shape of the study; `name` labels it in tables (default: the preset's name or dNxLk)."""

    name: Optional[str] = None
    d_model: PositiveInt
    n_layers: PositiveInt
    n_heads: PositiveInt
    d_ff: PositiveInt

    @model_validator(mode="after")
    def _shape(self) -> FMSize:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.name is None:
            self.name = f"d{self.d_model}xL{self.n_layers}"
        return self

    @property
    def shape(self) -> dict[str, int]:
        """The `fm` keys this size sets."""
        return {k: getattr(self, k) for k in SHAPE_KEYS}


class ScaleConfig(Section):
    """`loopfm scale`: FMs of growing size, each with its own store; TR of every channel against size."""

    fm_sizes: list[FMSize] = Field(
        default_factory=lambda: [FMSize(name=n, **FM_PRESETS[n]) for n in FM_PRESETS], min_length=2,
        description=f"FM shapes, each {{d_model, n_layers, n_heads, d_ff}} (optional name) or a preset "
                    f"name: {', '.join(FM_PRESETS)}")

    @field_validator("fm_sizes", mode="before")
    @classmethod
    def _presets(cls, sizes: Any) -> Any:
        if not isinstance(sizes, list):
            return sizes
        out = []
        for size in sizes:
            if isinstance(size, str):
                if size not in FM_PRESETS:
                    raise ValueError(f"unknown FM size preset {size!r}; presets: {', '.join(FM_PRESETS)}")
                size = {"name": size, **FM_PRESETS[size]}
            out.append(size)
        return out

    @model_validator(mode="after")
    def _distinct(self) -> ScaleConfig:
        shapes = [tuple(s.shape.values()) for s in self.fm_sizes]
        if len(set(shapes)) < len(shapes):
            raise ValueError("fm_sizes repeats a shape: each size must be a different FM")
        names = [s.name for s in self.fm_sizes]
        if len(set(names)) < len(names):
            raise ValueError(f"fm_sizes repeats a name: {names}")
        return self
