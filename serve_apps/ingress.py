"""The HTTP ingress (FastAPI on Ray Serve): validation, then feature lookup -> VM, and the error contract.

Routes: `POST /v1/score`, `GET /healthz`, `GET /v1/models`, OpenAPI at `/docs` and `/openapi.json`.

Errors (body: `{"detail": "<field>: <problem>", "errors": [{"field", "message"}]}`):
- 400: the body is not valid JSON (`body: ...`);
- 422: a missing, unknown or mistyped field, an empty `items`, more than `serve.max_items` items,
  an unknown `context` key, an id outside int64 (the field is named, e.g. `items.2`, `context.ts`);
- 503: a backend failure (a replica restarting); never a 500, and the replicas keep serving.

Requests carry the lookup's answer straight into the VM deployment (`DeploymentResponse` passed as
an argument), so the features do not travel back through the ingress. If the VM was swapped for
one trained on another store version between the two calls (a reload in progress), the VM answers
"stale" and the ingress asks again (a few times, briefly), so a reload drops no request.
"""

import asyncio
import logging
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from loopfm.serve_apps.model import STALE
from loopfm.serve_apps.schemas import (
    TS, TS_LIMIT, ErrorResponse, Health, ModelInfo, ModelsResponse, ScoreRequest, ScoreResponse,
)

logger = logging.getLogger("ray.serve")

STALE_RETRY_S, STALE_WAIT_S = 30.0, 0.05  # longer than a rolling update of the lookup takes
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, ReplicaUnavailableError)

api = FastAPI(
    title="LoopFM scoring",
    version="1",
    description="Scores candidate items for a user with a LoopFM vertical model: the user's stored FM "
                "embeddings and raw history are looked up at the request time; the FM is never called.",
    responses={400: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)


def _field(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def error(status: int, errors: list[tuple[str, str]]) -> JSONResponse:
    detail = "; ".join(f"{f}: {m}" for f, m in errors)
    body = ErrorResponse(detail=detail, errors=[{"field": f, "message": m} for f, m in errors])
    return JSONResponse(status_code=status, content=body.model_dump())


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        msg = next(p for p in problems if p.get("type") == "json_invalid")
        reason = (msg.get("ctx") or {}).get("error", msg.get("msg", "invalid JSON"))
        return error(400, [("body", f"malformed JSON: {reason}")])
    out = []
    for p in problems:
        field = _field(p.get("loc", ()))
        if p.get("type") == "missing" and field == "body":
            out.append(("body", "a JSON object with user_id and items is required"))
        else:
            out.append((field, p.get("msg", "invalid")))
    return error(422, out)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error on %s: %r", request.url.path, exc)
    return error(503, [("backend", f"unexpected {type(exc).__name__}; retry")])


@serve.deployment(name="ScoringIngress")
@serve.ingress(api)
class ScoringIngress:
    def __init__(self, lookup: DeploymentHandle, model: DeploymentHandle, max_items: int,
                 context_columns: list[str], staleness_sla_s: Optional[float] = None):
        self.lookup, self.model = lookup, model
        self.max_items = max_items
        self.staleness_sla_s = staleness_sla_s
        self.context_keys = {TS, *context_columns}

    def _check(self, req: ScoreRequest) -> list[tuple[str, str]]:
        problems = []
        if len(req.items) > self.max_items:
            problems.append(("items", f"at most {self.max_items} items per request (serve.max_items), "
                                      f"got {len(req.items)}"))
        for key in req.context:
            if key not in self.context_keys:
                problems.append((f"context.{key}", f"unknown context key; allowed: {', '.join(sorted(self.context_keys))}"))
        ts = req.context.get(TS)
        if ts is not None and abs(ts) > TS_LIMIT:
            problems.append((f"context.{TS}", f"must be within +-2**62, got {ts}"))
        return problems

    @api.post("/v1/score", response_model=ScoreResponse, summary="score candidate items for a user")
    async def score(self, req: ScoreRequest):
        problems = self._check(req)
        if problems:
            return error(422, problems)
        context = dict(req.context)
        context.setdefault(TS, int(time.time()))  # one time for lookup and response
        give_up = time.monotonic() + STALE_RETRY_S
        retried = False
        while True:
            try:
                features = self.lookup.features.remote(req.user_id, req.items, context)
                out = await self.model.score.remote(features)
            except REPLICA_GONE as exc:  # the replica died mid-request: scoring is idempotent, try another once
                if retried:
                    logger.warning("score failed twice: %r", exc)
                    return error(503, [("backend", f"scoring failed ({type(exc).__name__}); retry")])
                retried = True
                continue
            except Exception as exc:  # anything else from a backend: a 503, never a 500
                logger.warning("score failed: %r", exc)
                return error(503, [("backend", f"scoring failed ({type(exc).__name__}); retry")])
            if not out.get(STALE):
                break
            if time.monotonic() > give_up:
                return error(503, [("store_version", "the store and the VM are being reloaded; retry")])
            await asyncio.sleep(STALE_WAIT_S)
        return ScoreResponse(
            scores=out["scores"].tolist(), logits=out["logits"].tolist(),
            model_version=out["model_version"], store_version=out["store_version"], arm=out["arm"],
            cold_start=out["cold_start"], oov_items=out["oov_items"], ts=out["ts"],
        )

    @api.get("/healthz", response_model=Health,
             summary="liveness: both backends answer; `degraded` (still 200) when the store is staler than serve.staleness_sla_s")
    async def healthz(self):
        try:
            model = await self.model.describe.remote()
            table = await self.lookup.describe.remote()
        except Exception as exc:
            return error(503, [("backend", f"backend unavailable ({type(exc).__name__})")])
        stale = table.get("staleness_s")
        degraded = self.staleness_sla_s is not None and stale is not None and stale > self.staleness_sla_s
        return Health(status="degraded" if degraded else "ok", model_version=model["model_version"],
                      store_version=model["store_version"], staleness_s=stale,
                      detail=f"newest stored event is {stale:.0f}s old, SLA {self.staleness_sla_s:.0f}s" if degraded else None)

    @api.get("/v1/models", response_model=ModelsResponse, summary="the served VM, its store and settings")
    async def models(self):
        try:
            model, table = await self.model.describe.remote(), await self.lookup.describe.remote()
        except Exception as exc:
            return error(503, [("backend", f"backend unavailable ({type(exc).__name__})")])
        info = ModelInfo(**{**model, **{k: table[k] for k in ("store_rows", "store_deltas", "appended_batches",
                                                              "newest_event_ts", "staleness_s", "users_with_history",
                                                              "refresh_error")},
                            "max_items": self.max_items, "staleness_sla_s": self.staleness_sla_s})
        return ModelsResponse(models=[info])
