"""The HTTP contract of the scoring service: request and response bodies (pydantic, so /docs shows them).

Ids are raw ids as logged (the same `user_id` / `item_id` / categorical values as the event log),
never vocabulary indices: the service maps them (unknown -> the out-of-vocabulary index).
Integers are strict (no "12", no 12.0, no true) and bounded to int64, so a request that would
overflow numpy is a 422 naming the field, not a 500.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TS_LIMIT = 2**62  # keeps t - lag and t - retention inside int64

Id = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
TS = "ts"


class ScoreRequest(BaseModel):
    """`POST /v1/score`: one user, the candidate items to score, the request context."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": 17, "items": [3, 42, 99], "context": {"ts": 500000}}]},
    )

    user_id: Id = Field(description="raw user id; an unknown user is scored on the cold-start path (empty sequence)")
    items: list[Id] = Field(min_length=1, description="raw item ids to score, 1..serve.max_items; unknown ids "
                                                      "take the out-of-vocabulary embedding")
    context: dict[str, Id] = Field(
        default_factory=dict,
        description="`ts`: the request time (history strictly before it is used, as in training; default: now); "
                    "each categorical context column of the log (e.g. `user_segment`) as a raw value "
                    "(default: the user's latest logged value, else out-of-vocabulary)",
    )


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="click probability per item, in request order (sigmoid of `logits`)")
    logits: list[float] = Field(description="serving-head logit per item, in request order")
    model_version: str = Field(description="sha256 prefix of the VM checkpoint that scored")
    store_version: Optional[str] = Field(description="store version of the user's stored FM embeddings "
                                                     "(null for VMs without the LoopFM feature)")
    arm: str
    cold_start: bool = Field(description="true when the user has no history before `ts` (empty sequence)")
    oov_items: int = Field(description="how many of the items are unknown to the VM (out-of-vocabulary index)")
    ts: int = Field(description="the request time the history was cut at")


class ModelInfo(BaseModel):
    model_version: str
    arm: str
    seed: int
    vm: dict
    features_fingerprint: str
    store_version: Optional[str]
    store_rows: int
    store_deltas: int = Field(0, description="deltas of the store version loaded (`loopfm embed --incremental`)")
    appended_batches: int = Field(0, description="event batches appended to the log since the split, loaded")
    newest_event_ts: Optional[int] = Field(None, description="ts of the newest stored event")
    staleness_s: Optional[float] = Field(None, description="now minus `newest_event_ts`")
    staleness_sla_s: Optional[float] = None
    refresh_error: Optional[str] = Field(None, description="why the last background reload failed (the old table still serves)")
    users_with_history: int
    vertical: int
    seq_len: int
    seq_width: Optional[int]
    raw_seq_len: int
    lag: int
    retention: Optional[int]
    context_columns: list[str]
    test_metrics: dict
    vm_dir: str
    loaded_at: str
    max_items: int
    max_batch_size: int
    batch_wait_timeout_s: float


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str = Field(description="`ok`, or `degraded` when the store is staler than serve.staleness_sla_s")
    model_version: str
    store_version: Optional[str]
    staleness_s: Optional[float] = None
    detail: Optional[str] = None


class FieldError(BaseModel):
    field: str = Field(description="dotted path of the offending field, e.g. `items.3` or `context.ts`")
    message: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: `detail` is one readable line that names the field(s)."""

    detail: str
    errors: list[FieldError] = Field(default_factory=list)
