"""Config of the point-in-time join that builds VM examples from events and the store."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, PositiveInt, field_validator

from .base import Section


class FeaturesConfig(Section):
    """Point-in-time join rule of docs/DESIGN.md, 'Point-in-time rule' (docs/ARCHITECTURE.md, "Features")."""

    seq_len: PositiveInt = Field(32, description="L: stored FM embeddings per example")
    raw_seq_len: PositiveInt = Field(10, description="L_raw: the vertical's own last events (item, category, label)")
    lag: int = Field(0, ge=0, description="only embeddings with ts < t - lag")
    retention: Optional[PositiveInt] = Field(None, description="only embeddings with ts >= t - retention")
    surfaces: Union[Literal["all"], list[int]] = Field("all", description="surfaces whose embeddings enter")
    counter_window: PositiveInt = Field(20, description="events of the user's recent positive rate")
    prior_strength: float = Field(10.0, gt=0, description="pseudo-events of the train label rate that smooth "
                                  "every counter rate: (positives + a * prior) / (events + a)")

    @field_validator("surfaces")
    @classmethod
    def _surfaces(cls, value):
        if value == "all":
            return value
        if not value or any(s < 0 for s in value):
            raise ValueError("surfaces must be 'all' or a non-empty list of surface ids >= 0")
        return sorted(set(value))

    def surface_filter(self) -> Optional[tuple[int, ...]]:
        """The surfaces to keep, or None for all of them."""
        return None if self.surfaces == "all" else tuple(self.surfaces)
