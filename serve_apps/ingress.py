"""The HTTP ingress (FastAPI on Ray Serve): validation, scoring, the error contract and the metrics.

Routes: `POST /v1/score`, `GET /healthz`, `GET /v1/models`, OpenAPI at `/docs` and `/openapi.json`.

Topologies (`serve.topology`):
- `fused` (default): the ingress replica holds the scoring core itself (`ScoringCore`: the feature
  tables and the VMs, `@serve.batch` on the forward), so a request is one hop from Serve's proxy:
  parse, look up, score, answer, in one process.
- `front`: the core runs as its own deployment (`ScoringBackend`) behind this ingress, one hop
  more. What the hop buys: a request whose backend replica dies mid-request (a crash, the OOM
  killer) is retried on another replica (scoring is idempotent), which the proxy never does for a
  request a replica already holds. For replicated deployments that must not drop a request.

Errors, every one in the same shape, the framework's own included
(`{"detail": "<field>: <problem>", "errors": [{"field", "message"}], "request_id"}`; the id is
also the response's `X-Request-ID` header, which Serve's proxy sets or takes from the request):
- 400: the body is not JSON (malformed, invalid UTF-8, nested too deep to parse) (`body: ...`);
- 404/405: no such route or method;
- 413: the body is longer than `max_body_bytes` (counted as it streams in, so a huge body is
  refused without being held whole in the ingress's memory);
- 422: a missing, unknown or mistyped field, an empty `items`, more than `serve.max_items` items,
  an unknown `context` key, an id outside int64, a vertical the app does not serve (the field is
  named, e.g. `items.2`, `context.ts`, `vertical`);
- 503: a backend that is gone or overloaded (a replica restarting): worth retrying;
- 500: a fault of the server itself (a bug): logged with its traceback and request id; retrying
  the same request would fail the same way, so it is not dressed up as a 503.

Metrics (`ray.serve.metrics`, on Ray's Prometheus endpoint as `ray_loopfm_serve_*`): requests and
errors by route and status, and the latency histogram by route, counted by the outermost middleware
(every answer, 413 and 500 included; the time inside the replica, not the proxy's), plus the core's
cold starts and store staleness (`serve_apps/scoring.py`).
"""

import asyncio
import json
import logging
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import GetTimeoutError, RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loopfm.serve_apps.schemas import (
    TS,
    TS_LIMIT,
    ErrorResponse,
    Health,
    ModelInfo,
    ModelsResponse,
    ScoreRequest,
    ScoreResponse,
    exact_bounds,
)
from loopfm.serve_apps.scoring import ScoringCore

logger = logging.getLogger("ray.serve")

RETRY_WAIT_S = 0.05
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)  # died or unreachable (ActorDiedError, ...)
REPLICA_TRIES = 4  # the router may pick the dead replica again before it learns of the death
OVERLOADED = (BackPressureError, RequestCancelledError, GetTimeoutError, asyncio.TimeoutError)
REQUEST_ID = "x-request-id"
BODY_BYTES_PER_ITEM = 64  # an int64 id is at most 20 characters: room for separators and spacing
MIN_BODY_BYTES = 64 << 10
ROUTES = ("/v1/score", "/healthz", "/v1/models", "/docs", "/openapi.json")
LATENCY_MS = [0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 2000, 5000]


def default_body_limit(max_items: int) -> int:
    """A body cap that a request of `max_items` full-width ids fits with room to spare."""
    return max(MIN_BODY_BYTES, max_items * BODY_BYTES_PER_ITEM)


class BodyLimit:
    """ASGI middleware: a body longer than `limit` is answered 413 as soon as it is known to be.

    FastAPI reads a body whole before validating it, so without a cap one request can make the
    ingress hold (and parse) any number of bytes. A declared Content-Length over the cap is refused
    before a byte is read; a streamed (chunked) body is counted as it arrives. The limit is set by
    the ingress's constructor (`BodyLimit.limit`): middleware is bound to the app at import.
    """

    limit = default_body_limit(1000)

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, f"{declared} bytes")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send, f"more than {self.limit} bytes")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        response = error(413, [("body", f"request body of {size} is over the limit of {self.limit} bytes "
                                        f"(max_body_bytes)")], Headers(scope=scope).get(REQUEST_ID))
        await response(scope, receive, send)

class ServingMetrics:
    """The ingress's Prometheus series (made in the replica: Serve adds its deployment/replica tags)."""

    def __init__(self):
        tags = ("route", "status")
        self.requests = metrics.Counter("loopfm_serve_requests", tag_keys=tags,
                                        description="HTTP requests answered, by route and status")
        self.errors = metrics.Counter("loopfm_serve_errors", tag_keys=tags,
                                      description="HTTP answers with a status of 400 or more, by route and status")
        self.latency = metrics.Histogram("loopfm_serve_latency_ms", boundaries=LATENCY_MS, tag_keys=("route",),
                                         description="time from the request reaching the replica to its answer")

    def record(self, path: str, status: int, ms: float) -> None:
        route = path if path in ROUTES else "other"  # a fuzzer's paths must not become series
        tags = {"route": route, "status": str(status)}
        self.requests.inc(tags=tags)
        if status >= 400:
            self.errors.inc(tags=tags)
        self.latency.observe(ms, tags={"route": route})


class RequestMetrics:
    """ASGI middleware, outermost of ours: counts every answer and its latency. Framework errors and
    the body cap's 413 included; an exception that escapes every handler counts as the 500 it becomes.
    `RequestMetrics.metrics` is set by the ingress's constructor (middleware is bound at import)."""

    metrics: Optional[ServingMetrics] = None

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.metrics is None:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix: its routes' own names
            path = path[len(root):]
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.record(path, status, (time.perf_counter() - started) * 1e3)


api = FastAPI(
    title="LoopFM scoring",
    version="1",
    description="Scores candidate items for a user with a LoopFM vertical model: the user's stored FM "
                "embeddings and raw history are looked up at the request time; the FM is never called.",
    responses={code: {"model": ErrorResponse} for code in (400, 404, 405, 413, 422, 500, 503)},
)
api.add_middleware(BodyLimit)
api.add_middleware(RequestMetrics)  # added last: outermost


def _openapi() -> dict:
    """FastAPI's schema with the integer bounds exact (see `exact_bounds`)."""
    if api.openapi_schema is None:
        api.openapi_schema = exact_bounds(FastAPI.openapi(api))
    return api.openapi_schema


api.openapi = _openapi


def _field(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: an error may quote a client's key, and a lone
    surrogate (valid in JSON text, not encodable as UTF-8) must not turn a 422 into a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error(status: int, errors: list[tuple[str, str]], request_id: Optional[str] = None) -> JSONResponse:
    detail = "; ".join(f"{f}: {m}" for f, m in errors)
    body = ErrorResponse(detail=detail, errors=[{"field": f, "message": m} for f, m in errors], request_id=request_id)
    return AsciiJSON(status_code=status, content=body.model_dump())


def request_id(request: Request) -> Optional[str]:
    """The id Serve's proxy gave the request (or took from the client's X-Request-ID)."""
    return request.headers.get(REQUEST_ID)


@api.exception_handler(StarletteHTTPException)
async def _framework(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own errors (a body that is not UTF-8 or nests too deep to parse,
    an unknown route or method) in the service's error shape."""
    field = "body" if exc.status_code == 400 else "path"
    response = error(exc.status_code, [(field, str(exc.detail))], request_id(request))
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    rid = request_id(request)
    if any(p.get("type") == "json_invalid" for p in problems):
        msg = next(p for p in problems if p.get("type") == "json_invalid")
        reason = (msg.get("ctx") or {}).get("error", msg.get("msg", "invalid JSON"))
        return error(400, [("body", f"malformed JSON: {reason}")], rid)
    out = []
    for p in problems:
        field = _field(p.get("loc", ()))
        if p.get("type") == "missing" and field == "body":
            out.append(("body", "a JSON object with user_id and items is required"))
        else:
            out.append((field, p.get("msg", "invalid")))
    return error(422, out, rid)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug of the server: a 500 the client can quote (request id), logged with its traceback."""
    rid = request_id(request)
    logger.error("request %s on %s failed: %r", rid, request.url.path, exc, exc_info=exc)
    return error(500, [("server", f"internal error ({type(exc).__name__}); quote request id {rid}")], rid)


class BackendGone(Exception):
    """The backend replica died on every try (`front` topology)."""


@serve.deployment(name="ScoringIngress")
@serve.ingress(api)
class ScoringIngress:
    """The app's HTTP face. `core_args`: the fused topology (this replica holds a `ScoringCore`);
    `backend`: the front topology (a handle to the `ScoringBackend` deployment)."""

    def __init__(self, verticals: list[int], max_items: int, context_columns: list[str],
                 staleness_sla_s: Optional[float] = None, max_body_bytes: Optional[int] = None,
                 core_args: Optional[dict] = None, backend: Optional[DeploymentHandle] = None):
        if (core_args is None) == (backend is None):
            raise ValueError("ScoringIngress takes core_args (fused) or backend (front), exactly one")
        self.core = ScoringCore(**core_args) if core_args is not None else None
        self.backend = backend
        self.verticals = sorted(int(v) for v in verticals)
        self.max_items = max_items
        self.staleness_sla_s = staleness_sla_s
        self.context_keys = {TS, *context_columns}
        ScoreRequest.limit(max_items, context_columns, self.verticals)
        BodyLimit.limit = max_body_bytes or default_body_limit(max_items)
        RequestMetrics.metrics = ServingMetrics()
        api.openapi_schema = None  # regenerated with these limits

    async def _call(self, method: str, *args):
        """`method` of the scoring core: in this process (fused), or on a backend replica (front),
        tried again on another replica when the one holding it died."""
        if self.core is not None:
            return await getattr(self.core, method)(*args)
        tries = 0
        while True:
            try:
                return await getattr(self.backend, method).remote(*args)
            except REPLICA_GONE as exc:  # died mid-request: scoring is idempotent, try another replica
                tries += 1
                if tries >= REPLICA_TRIES:
                    raise BackendGone(f"{type(exc).__name__} on {tries} tries") from exc
                await asyncio.sleep(RETRY_WAIT_S * tries)

    def _check(self, req: ScoreRequest) -> tuple[list[tuple[str, str]], Optional[int]]:
        problems = []
        for key in req.context:
            if key not in self.context_keys:
                problems.append((f"context.{key}",
                                 f"unknown context key; allowed: {', '.join(sorted(self.context_keys))}"))
        ts = req.context.get(TS)
        if ts is not None and abs(ts) > TS_LIMIT:
            problems.append((f"context.{TS}", f"must be within +-2**62, got {ts}"))
        served = ", ".join(map(str, self.verticals))
        vertical = req.vertical
        if vertical is None and len(self.verticals) == 1:
            vertical = self.verticals[0]
        elif vertical is None:
            problems.append(("vertical", f"required: this app serves several verticals ({served})"))
        elif vertical not in self.verticals:
            problems.append(("vertical", f"unknown vertical {vertical}; this app serves {served}"))
        return problems, vertical

    @api.post("/v1/score", response_model=ScoreResponse, summary="score candidate items for a user")
    async def score(self, req: ScoreRequest, request: Request):
        rid = request_id(request)
        problems, vertical = self._check(req)
        if problems:
            return error(422, problems, rid)
        context = dict(req.context)
        context.setdefault(TS, int(time.time()))  # one time for lookup and response
        try:
            out = await self._call("score", req.user_id, req.items, context, vertical)
        except BackendGone as exc:
            logger.warning("request %s: scoring failed: %s", rid, exc)
            return error(503, [("backend", f"scoring failed ({exc}); retry")], rid)
        except OVERLOADED as exc:  # busy or timed out: the client may retry
            logger.warning("request %s: backend overloaded: %r", rid, exc)
            return error(503, [("backend", f"backend busy ({type(exc).__name__}); retry")], rid)
        # built here and not through the response model: a second validation of every float
        # would cost more than the forward (the route still publishes ScoreResponse)
        return JSONResponse({
            "scores": out["scores"].tolist(), "logits": out["logits"].tolist(),
            "model_version": out["model_version"], "store_version": out["store_version"],
            "store_head": out["store_head"], "log_head": out["log_head"], "arm": out["arm"],
            "vertical": out["vertical"], "cold_start": out["cold_start"], "oov_items": out["oov_items"],
            "ts": out["ts"]})

    async def describe(self) -> list[dict]:
        """Every served VM with its table's state (`loopfm serve reload` reads it through a handle)."""
        return await self._call("describe")

    async def refresh(self) -> dict:
        """Reload the store deltas and appended log batches now (`loopfm serve refresh`)."""
        return await self._call("refresh")

    @api.get("/healthz", response_model=Health,
             summary="liveness: the scoring core answers; `degraded` (still 200) "
             "when the store is staler than serve.staleness_sla_s")
    async def healthz(self):
        try:
            models = await self.describe()
        except Exception as exc:  # noqa: BLE001 (a core that cannot describe itself is not healthy)
            return error(503, [("backend", f"backend unavailable ({type(exc).__name__})")])
        stale = max((m["staleness_s"] for m in models if m["staleness_s"] is not None), default=None)
        degraded = self.staleness_sla_s is not None and stale is not None and stale > self.staleness_sla_s
        versions = {str(m["vertical"]): m["model_version"] for m in models}
        return Health(status="degraded" if degraded else "ok",
                      model_version=models[0]["model_version"] if len(models) == 1 else None,
                      model_versions=versions, store_version=models[0]["store_version"], staleness_s=stale,
                      detail=f"newest stored event is {stale:.0f}s old, SLA {self.staleness_sla_s:.0f}s"
                      if degraded else None)

    @api.get("/v1/models", response_model=ModelsResponse,
             summary="the served VMs (one per vertical), their store and settings")
    async def models(self):
        try:
            models = await self.describe()
        except (BackendGone, *OVERLOADED) as exc:
            return error(503, [("backend", f"backend unavailable ({type(exc).__name__})")])
        return ModelsResponse(models=[ModelInfo(**m, max_items=self.max_items, staleness_sla_s=self.staleness_sla_s)
                                      for m in models])
