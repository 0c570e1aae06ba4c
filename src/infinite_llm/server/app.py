"""The FastAPI app: vLLM's OpenAI endpoints plus ``/v1/cluster`` and ``/dashboard``.

POST /v1/completions       POST /v1/chat/completions      GET /v1/models
GET  /v1/cluster (memory map, cached rBlocks + debt ledger, JSON)   GET /dashboard (live view)
GET  /health               GET  /metrics (Prometheus)     GET /version
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from infinite_llm import __version__
from infinite_llm.llm_engine import LLMEngine
from infinite_llm.server.async_engine import AsyncLLMEngine, EngineDeadError, EngineOverloadedError
from infinite_llm.server.chat import create_chat_completion
from infinite_llm.server.completions import create_completion
from infinite_llm.server.dashboard import dashboard_html
from infinite_llm.server.errors import APIError, error_response, install_error_handlers
from infinite_llm.server.logprobs import LogprobFormatter
from infinite_llm.server.metrics import ServerMetrics
from infinite_llm.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from infinite_llm.server.serving import ServerState
from infinite_llm.server.settings import ServerSettings

logger = logging.getLogger(__name__)

# A snapshot waits for the step in progress; past these, answer with the previous one.
METRICS_SNAPSHOT_TIMEOUT_S = 1.0
CLUSTER_SNAPSHOT_TIMEOUT_S = 1.0


def create_app(
    engine: LLMEngine, settings: ServerSettings, on_started: Callable[[], None] | None = None
) -> FastAPI:
    """An app serving ``engine``; its engine thread starts and stops with the app's lifespan."""
    names = list(settings.served_model_names)
    metrics = ServerMetrics(names[0])
    async_engine = AsyncLLMEngine(
        engine, settings.max_waiting_requests, on_output=metrics.on_output
    )
    state = ServerState(
        engine=async_engine,
        served_model_names=names,
        metrics=metrics,
        formatter=LogprobFormatter(engine.tokenizer),
        model_source=engine.loaded.source.name,
        trust_request_chat_template=settings.trust_request_chat_template,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await async_engine.shutdown()

    app = FastAPI(title="infinite-llm", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(EngineOverloadedError)
    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        return error_response(503, str(exc))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(request, state)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        data = [
            {
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "infinite-llm",
                "root": state.model_source,
                "parent": None,
                "max_model_len": async_engine.max_model_len,
            }
            for name in names
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/cluster")
    async def cluster() -> JSONResponse:
        return JSONResponse(await _snapshot(state))

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            raise APIError(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        snapshot: dict[str, Any] | None = None
        with contextlib.suppress(EngineDeadError):  # a stopped engine: request metrics only
            snapshot, _ = await async_engine.cluster_snapshot(METRICS_SNAPSHOT_TIMEOUT_S)
        body = metrics.render(async_engine.num_running, async_engine.num_waiting, snapshot)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(dashboard_html(names[0]))

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)  # outermost: checked first
    return app


async def _snapshot(state: ServerState) -> dict[str, Any]:
    engine = state.engine
    try:
        snap, fresh = await engine.cluster_snapshot(CLUSTER_SNAPSHOT_TIMEOUT_S)
    except EngineDeadError as exc:
        raise APIError(503, str(exc)) from exc
    return _json_safe(
        {
            "model": state.served_model_names[0],
            "fresh": fresh,
            "age_s": engine.snapshot_age_s if not fresh else 0.0,
            "requests": {"running": engine.num_running, "waiting": engine.num_waiting},
            "num_step_errors": engine.num_step_errors,
            **{k: v for k, v in snap.items() if k != "taken_at"},
        }
    )


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity (an empty latency summary holds NaN): those become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
