"""The HTTP contract of the scoring service: request and response bodies (pydantic, so /docs shows them).

Ids are raw ids as logged (the same `user_id` / `item_id` / categorical values as the event log),
never vocabulary indices: the service maps them (unknown -> the out-of-vocabulary index).
Integers are JSON numbers with no fraction (no "12", no true, no 12.5) and bounded to int64, so a
request that would overflow numpy is a 422 naming the field, not a 500. `12.0` is the integer 12, as
JSON Schema's `integer` says; a number written with a fraction or an exponent above 2**53 is
refused, since the parsed double may no longer be the integer the client meant.

The request schema says exactly what the server accepts, so a client (or a fuzzer) generating
from `/openapi.json` never sends a schema-valid request that is then refused: `items` carries
`maxItems` = `serve.max_items`, `context` lists its keys (`ts` within +-2**62, each categorical
column within int64, nothing else) and `vertical` lists the verticals served (required when there
are several). Those limits come from the deployment's arguments, so the ingress sets them
(`ScoreRequest.limit`) before it serves; one ingress runs per replica process.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, field_validator
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TS_LIMIT = 2**62  # keeps t - lag and t - retention inside int64

EXACT_FLOAT = 2**53  # every integer up to here is exactly a double


def _whole(value: Any) -> Any:
    """A float with no fraction is the integer it spells (JSON Schema's `integer`), when exact."""
    if isinstance(value, float) and value.is_integer():
        if abs(value) > EXACT_FLOAT:
            raise PydanticCustomError("int_inexact", "an integer above 2**53 must be written without a fraction "
                                                     "or exponent, got {value}", {"value": value})
        return int(value)
    return value


Id = Annotated[StrictInt, BeforeValidator(_whole), Field(ge=INT64_MIN, le=INT64_MAX)]
TS = "ts"
DEFAULT_MAX_ITEMS = 1000
INT64_BOUNDS = {"minimum": INT64_MIN, "maximum": INT64_MAX}
EXAMPLE = {"user_id": 17, "items": [3, 42, 99], "context": {"ts": 500000}}


def _exact_limits(schema: dict[str, Any], cls: type[ScoreRequest]) -> None:
    """The deployment's limits in the JSON schema: what a generator reads is what the server takes.

    FastAPI's OpenAPI models hold bounds as floats; `exact_bounds` turns them back into integers.
    """
    schema["examples"] = [EXAMPLE]
    props = schema["properties"]
    props["user_id"].update(INT64_BOUNDS)
    props["items"]["items"].update(INT64_BOUNDS)
    props["items"]["maxItems"] = cls.max_items
    context = props["context"]
    context["properties"] = {
        TS: {"type": "integer", "minimum": -TS_LIMIT, "maximum": TS_LIMIT},
        **{c: {"type": "integer", **INT64_BOUNDS} for c in cls.context_columns},
    }
    context["additionalProperties"] = False
    served = {"type": "integer", "enum": list(cls.verticals)}
    about = props["vertical"].get("description", "")
    if len(cls.verticals) > 1:
        props["vertical"] = {**served, "description": about}
        schema["required"] = [*schema.get("required", []), "vertical"]
    else:
        props["vertical"] = {"anyOf": [served, {"type": "null"}], "description": about}


_EXACT = {float(b): b for b in (INT64_MIN, INT64_MAX, -TS_LIMIT, TS_LIMIT)}


def exact_bounds(node: Any) -> Any:
    """`minimum`/`maximum` of the int64 and ts bounds as exact integers, in place.

    FastAPI's OpenAPI models store bounds as floats, and the float nearest 2**63 - 1 is 2**63: the
    published schema would accept one value past int64 that the server refuses.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("minimum", "maximum") and isinstance(value, float) and value in _EXACT:
                node[key] = _EXACT[value]
            else:
                exact_bounds(value)
    elif isinstance(node, list):
        for value in node:
            exact_bounds(value)
    return node


class ScoreRequest(BaseModel):
    """`POST /v1/score`: one user, the candidate items to score, the request context."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exact_limits)

    max_items: ClassVar[int] = DEFAULT_MAX_ITEMS
    context_columns: ClassVar[tuple[str, ...]] = ()
    verticals: ClassVar[tuple[int, ...]] = (0,)

    user_id: Id = Field(description="raw user id; an unknown user is scored on the cold-start path (empty sequence)")
    items: list[Id] = Field(min_length=1, description="raw item ids to score, 1..serve.max_items; unknown ids "
                                                      "take the out-of-vocabulary embedding")
    context: dict[str, Id] = Field(
        default_factory=dict,
        description="`ts`: the request time (history strictly before it is used, as in training; default: now); "
                    "each categorical context column of the log (e.g. `user_segment`) as a raw value "
                    "(default: the user's latest logged value, else out-of-vocabulary)",
    )

    vertical: Optional[Id] = Field(None, description="the vertical (surface) whose VM scores; optional when the app "
                                                      "serves one, required when it serves several (GET /v1/models)")

    @classmethod
    def limit(cls, max_items: int, context_columns: list[str], verticals: Optional[list[int]] = None) -> None:
        """Set the deployment's limits (validation and schema), before the first request."""
        cls.max_items, cls.context_columns = max_items, tuple(context_columns)
        if verticals is not None:
            cls.verticals = tuple(verticals)

    @field_validator("items", mode="before")
    @classmethod
    def _at_most_max_items(cls, value: Any) -> Any:
        """Counted before any element is validated: a long list is refused without converting it."""
        if isinstance(value, list) and len(value) > cls.max_items:
            raise PydanticCustomError("too_long", "at most {limit} items per request (serve.max_items), got {got}",
                                      {"limit": cls.max_items, "got": len(value)})
        return value


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="click probability per item, in request order (sigmoid of `logits`)")
    logits: list[float] = Field(description="serving-head logit per item, in request order")
    model_version: str = Field(description="sha256 prefix of the VM checkpoint that scored")
    store_version: Optional[str] = Field(description="store version of the user's stored FM embeddings "
                                                     "(null for VMs without the LoopFM feature)")
    store_head: Optional[str] = Field(None, description="the newest store delta the features were read from (the "
                                                        "store version when it has none; null without the LoopFM "
                                                        "feature)")
    log_head: Optional[str] = Field(None, description="the newest appended log batch the history was read from (null: "
                                                      "the split log only); with `model_version` and `store_head`, "
                                                      "exactly which model and data scored")
    arm: str
    vertical: int = Field(description="the vertical whose VM scored")
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
    store_head: Optional[str] = Field(None, description="the newest delta loaded (the store version when none)")
    log_head: Optional[str] = Field(None, description="the newest appended log batch loaded")
    store_rows: int
    store_deltas: int = Field(0, description="deltas of the store version loaded (`loopfm embed --incremental`)")
    appended_batches: int = Field(0, description="event batches appended to the log since the split, loaded")
    newest_event_ts: Optional[int] = Field(None, description="ts of the newest stored event")
    staleness_s: Optional[float] = Field(None, description="now minus `newest_event_ts`")
    staleness_sla_s: Optional[float] = None
    refresh_error: Optional[str] = Field(
        None, description="why the last background reload failed (the old table still serves)")
    users_with_history: int
    vertical: int = Field(description="the vertical this VM serves (the request's `vertical`)")
    features_vertical: int = Field(description="the surface the VM's features were joined for")
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
    model_version: Optional[str] = Field(description="the served VM (null when the app serves several: see "
                                                     "`model_versions`)")
    model_versions: dict[str, str] = Field(default_factory=dict, description="vertical -> the VM that serves it")
    store_version: Optional[str]
    staleness_s: Optional[float] = None
    detail: Optional[str] = None


class FieldError(BaseModel):
    field: str = Field(description="dotted path of the offending field, e.g. `items.3` or `context.ts`")
    message: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body, the framework's own errors included: `detail` is one readable line that
    names the field(s); `request_id` is the `X-Request-ID` header of the response (and of the
    server's log line for a 5xx)."""

    detail: str
    errors: list[FieldError] = Field(default_factory=list)
    request_id: Optional[str] = Field(None, description="the request's id, as in the X-Request-ID response header")
