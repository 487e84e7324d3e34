"""Config of the point-in-time join that builds VM examples from events and the store."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, PositiveInt

from .base import Section


class FeaturesConfig(Section):
    """Point-in-time join rule of DESIGN section 1.3."""

    seq_len: PositiveInt = Field(32, description="L: stored FM embeddings per example")
    raw_seq_len: PositiveInt = Field(10, description="L_raw: raw item ids of the vertical's own history")
    lag: int = Field(0, ge=0, description="only embeddings with ts < t - lag")
    retention: Optional[PositiveInt] = Field(None, description="only embeddings with ts >= t - retention")
    surfaces: Union[Literal["all"], list[int]] = "all"
