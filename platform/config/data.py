"""Config of the event log: where it comes from, how it is validated and split by time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Optional, Union

from pydantic import (
    Field,
    PositiveInt,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from .base import ConfigError, Section


class ColumnMapping(Section):
    """Names of the contract's columns in the source log (docs/DESIGN.md, 'Events')."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    ts: str = "ts"
    label: str = "label"
    surface: Optional[str] = "surface"
    category: Optional[str] = Field("category", description="item category (FM token, VM feature)")
    event_id: Optional[str] = "event_id"
    categorical: list[str] = Field(default_factory=list, description="other categorical int columns (VM context)")

    @model_validator(mode="after")
    def _context_names_are_free(self) -> ColumnMapping:
        taken = {"event_id", "user_id", "item_id", "category", "surface", "ts", "label"}
        clash = sorted(taken.intersection(self.categorical))
        if clash:
            raise ValueError(f"categorical columns {clash} clash with contract column names; rename them")
        return self


class SyntheticConfig(Section):
    """The seeded multi-surface generator (docs/SYNTHETIC.md explains every knob)."""

    num_users: PositiveInt = 4000
    num_items: PositiveInt = 6000
    num_categories: PositiveInt = 60
    num_surfaces: PositiveInt = 3
    events_per_user: PositiveInt = 120
    num_days: PositiveInt = 14
    latent_dim: PositiveInt = 16
    long_weight: float = Field(1.5, ge=0, description="weight of the stable long-term interest")
    short_weight: float = Field(1.0, ge=0, description="weight of the drifting short-term interest")
    short_drift: float = Field(0.15, ge=0, le=1, description="per-event innovation of the short-term interest")
    item_bias_scale: float = Field(0.5, ge=0)
    noise: float = Field(0.5, ge=0, description="std of per-impression logit noise")
    base_logit: float = -2.5
    vertical_share: float = Field(0.3, gt=0, lt=1, description="mean share of a user's events on surface 0")
    personalization: float = Field(0.5, ge=0, le=1, description="share of impressions drawn from the user's interest")
    taste_weight: float = Field(0.0, ge=0, description="weight of a second, item-level long-term taste of "
                                "taste_dim dimensions (0: off, and the log is exactly what it was without it)")
    taste_dim: PositiveInt = Field(64, description="dimension of the item-level taste: above a small FM's "
                                   "d_model, so a bigger FM has more of the signal to learn")
    users_per_chunk: PositiveInt = 1000
    seed: int = 0


class ValidationConfig(Section):
    """strict: any defect fails the run; lenient: defective rows are dropped and reported."""

    strict: bool = False
    max_examples: PositiveInt = Field(5, description="example rows shown per rule")


class SplitConfig(Section):
    """Time split: train < valid < test, by quantiles of `ts` or by cut-off timestamps."""

    method: Literal["quantile", "cutoff"] = "quantile"
    valid_quantile: float = Field(0.7, gt=0, lt=1)
    test_quantile: float = Field(0.85, gt=0, lt=1)
    valid_start_ts: Optional[int] = None
    test_start_ts: Optional[int] = None

    @model_validator(mode="after")
    def _ordered(self) -> SplitConfig:
        if self.method == "quantile" and not self.valid_quantile < self.test_quantile:
            raise ValueError("valid_quantile must be < test_quantile")
        if self.method == "cutoff":
            if self.valid_start_ts is None or self.test_start_ts is None:
                raise ValueError("method 'cutoff' needs valid_start_ts and test_start_ts")
            if not self.valid_start_ts < self.test_start_ts:
                raise ValueError("valid_start_ts must be < test_start_ts")
        return self


class MovieLensConfig(Section):
    """Options of the MovieLens-100k source (`data.source: movielens100k`; docs/DATA.md)."""

    surfaces: Literal["one", "genre_group"] = Field(
        "one", description="one: every rating on surface 0 (the log is the vertical); genre_group: the "
        "surface is the group of the item's first genre (0 drama, 1 action, 2 comedy), for several verticals")


class DataConfig(Section):
    source: Literal[
        "synthetic", "events", "taobao_ad", "kuaivideo", "amazon_electronics", "movielens100k"
    ] = "synthetic"
    path: Optional[str] = Field(None, description="file, directory or glob of the source log "
                                "(movielens100k: default = the copy in the recbole wheel)")
    format: Literal["auto", "parquet", "csv"] = "auto"
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    sorted_by_ts: Optional[bool] = Field(
        None,
        description="the log promises each file is in ts order, so rows that break it are defects; "
        "None: as the source format promises (kuaivideo yes, others no)",
    )
    movielens: MovieLensConfig = Field(default_factory=MovieLensConfig)
    vertical: Union[int, list[int]] = Field(
        0, description="the surface a vertical model serves, or a list of surfaces: one FM and store, one "
        "feature set and VM per vertical (docs/ARCHITECTURE.md, 'Many verticals')")

    @field_validator("vertical", mode="before")
    @classmethod
    def _one_or_distinct(cls, value: Any) -> Union[int, list[int]]:
        """A surface id, or a non-empty list of distinct ones in the order the report follows; a
        one-element list is that vertical (the same run, fingerprints and report)."""
        items = value if isinstance(value, list) else [value]
        wrong = [v for v in items if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if wrong or not items:
            raise ValueError("must be a surface id (an int >= 0) or a non-empty list of them")
        repeated = sorted({v for v in items if items.count(v) > 1})
        if repeated:
            raise ValueError(f"surfaces {repeated} appear more than once")
        return items[0] if len(items) == 1 else list(items)

    @model_serializer(mode="wrap")
    def _added_later_shown_when_set(self, dump: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The dump (YAML, every hash of this section) leaves out `movielens` at its default: the
        configs and run directories written before it existed keep their hashes."""
        out = dump(self)
        if self.movielens == MovieLensConfig():
            out.pop("movielens", None)
        return out

    @model_validator(mode="after")
    def _path_when_not_synthetic(self) -> DataConfig:
        if self.source not in ("synthetic", "movielens100k") and not self.path:
            raise ValueError(f"source '{self.source}' needs data.path")
        return self

    @property
    def verticals(self) -> tuple[int, ...]:
        """Every vertical of `data.vertical`, in its order (one for a single int)."""
        return (self.vertical,) if isinstance(self.vertical, int) else tuple(self.vertical)

    def one_vertical(self, what: str) -> int:
        """The vertical of a stage that models one (`what` names it): a list is refused by name."""
        if isinstance(self.vertical, int):
            return self.vertical
        raise ConfigError(f"data.vertical: {what} works on one vertical, got {self.vertical}; "
                          f"pick one with --set data.vertical=<one of {self.vertical}>")

    def check_verticals(self, surfaces: Iterable[int]) -> None:
        """Refuse a vertical that is not among the log's `surfaces` (those holding events)."""
        present = sorted({int(s) for s in surfaces})
        absent = [v for v in self.verticals if v not in present]
        if absent:
            raise ConfigError(f"data.vertical: {self.vertical} names surface(s) {absent} with no events in the "
                              f"log; the surfaces present are {present}")
