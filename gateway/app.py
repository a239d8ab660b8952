"""The gateway's FastAPI app: model listing, health, metrics, and the proxied OpenAI paths."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelfleet.http import RequestIdMiddleware, install_error_handlers
from modelfleet.protocol import OpenAIError

from .metrics import GatewayMetrics
from .proxy import Proxy
from .registry import Registry
from .static import StaticDiscovery

PROXIED = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/edits",
           "/tokenize", "/detokenize"]


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    backends: dict[str, list[str]] = field(default_factory=dict)
    connect_timeout: float = 3.0
    read_timeout: float = 600.0
    max_connections: int = 4096


def make_client(settings: GatewaySettings) -> httpx.AsyncClient:
    """Explicit timeouts: a stream needs a long read timeout, a dead pod a short connect one."""
    timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout, write=30.0, pool=30.0)
    limits = httpx.Limits(max_connections=settings.max_connections, max_keepalive_connections=512)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


def model_of(body: bytes) -> str:
    """The only field the gateway reads from a request body."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from exc
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model:
        raise OpenAIError("You must provide a model parameter.", param="model", code="missing_model")
    return model


def create_app(settings: GatewaySettings, registry: Registry | None = None,
               client: httpx.AsyncClient | None = None) -> FastAPI:
    registry = registry or Registry()
    client = client or make_client(settings)
    metrics = GatewayMetrics(registry)
    proxy = Proxy(registry, client, metrics)
    discovery = StaticDiscovery(registry, settings.backends, client)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await discovery.probe_once()
        discovery.start()
        yield
        await discovery.stop()
        await client.aclose()

    app = FastAPI(title="modelfleet gateway", docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.state.registry = registry

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": registry.cards()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for card in registry.cards():
            if card["id"] == model_id:
                return card
        raise OpenAIError(f"The model `{model_id}` does not exist or you do not have access to it.", status=404,
                          param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        models = sorted({e.model for e in registry.endpoints.values() if e.available()})
        if not models:
            return JSONResponse({"status": "not ready", "models": []}, status_code=503)
        return {"status": "ready", "models": models}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.prom), media_type=CONTENT_TYPE_LATEST)

    async def forward(request: Request):
        body = await request.body()
        headers = dict(request.headers)
        rid = request.scope.get("state", {}).get("request_id")
        if rid:
            headers["x-request-id"] = rid
        return await proxy.forward(request.url.path, body, headers, model_of(body))

    for path in PROXIED:
        app.add_api_route(path, forward, methods=["POST"])
    return app
