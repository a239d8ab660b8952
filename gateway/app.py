"""The gateway's FastAPI app: keys and limits, model listing, health, metrics, and the proxied
OpenAI paths. Discovery and the key sources are handed in; this module wires them together."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelfleet.http import RequestIdMiddleware, install_error_handlers
from modelfleet.protocol import OpenAIError, model_not_found

from .auth import ApiKey, KeyFileWatcher, KeyStore
from .limits import RateLimiter
from .load import LoadScraper
from .metrics import GatewayMetrics
from .proxy import Proxy
from .registry import Registry
from .static import StaticDiscovery
from .upstream import Upstream

log = logging.getLogger("modelfleet.gateway")
PROXIED = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/edits",
           "/tokenize", "/detokenize"]


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    backends: dict[str, list[str]] = field(default_factory=dict)
    api_keys: Path | None = None
    discovery: str = "static"  # or "kubernetes"
    namespaces: list[str] = field(default_factory=list)  # kubernetes: watched namespaces, empty = all
    key_namespace: str | None = None  # kubernetes: where API-key Secrets live (default: own namespace)
    gateway_service: str | None = None  # kubernetes: own Service, to share rate limits between replicas
    connect_timeout: float = 3.0
    read_timeout: float = 600.0
    max_connections: int = 4096


def make_client(settings: GatewaySettings) -> httpx.AsyncClient:
    """Explicit timeouts: a stream needs a long read timeout, a dead pod a short connect one."""
    timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout, write=30.0, pool=30.0)
    limits = httpx.Limits(max_connections=settings.max_connections, max_keepalive_connections=512)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


def routing_fields(body: bytes) -> tuple[str, str]:
    """The only fields the gateway reads from a request body: the model, and the start of the
    conversation or prompt (for prefix affinity). The body itself is forwarded untouched."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from exc
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model:
        raise OpenAIError("You must provide a model parameter.", param="model", code="missing_model")
    return model, prompt_prefix(data)


def prompt_prefix(data: dict, limit: int = 4096) -> str:
    messages = data.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                parts.append(f"{m.get('role')}:{content if isinstance(content, str) else json.dumps(content)}")
            if sum(map(len, parts)) >= limit:
                break
        return "\n".join(parts)[:limit]
    for field_name in ("prompt", "input"):
        value = data.get(field_name)
        if isinstance(value, str):
            return value[:limit]
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0][:limit]
    return ""


def kubernetes_discovery(settings: GatewaySettings, registry: Registry, keys: KeyStore):
    """Discovery plus the other watched state, and the replica count that shares the limits."""
    from .cluster_sources import GatewayPeers, SecretKeys
    from .discovery import KubernetesDiscovery
    from .kube import own_namespace

    home = own_namespace()
    sources: list = [SecretKeys(keys, settings.key_namespace or home)]
    replicas = lambda: 1  # noqa: E731
    if settings.gateway_service:
        peers = GatewayPeers(home, settings.gateway_service)
        sources.append(peers)
        replicas = peers.count
    return KubernetesDiscovery(registry, settings.namespaces, extra_sources=sources), replicas


def create_app(settings: GatewaySettings, registry: Registry | None = None,
               client: httpx.AsyncClient | None = None, keys: KeyStore | None = None,
               limiter: RateLimiter | None = None, discovery=None) -> FastAPI:
    registry = registry or Registry()
    client = client or make_client(settings)
    keys = keys or KeyStore()
    if discovery is None and settings.discovery == "kubernetes":
        discovery, replicas = kubernetes_discovery(settings, registry, keys)
        limiter = limiter or RateLimiter(replicas=replicas)
    limiter = limiter or RateLimiter()
    metrics = GatewayMetrics(registry)
    upstream = Upstream(settings.connect_timeout, settings.read_timeout, settings.max_connections)
    proxy = Proxy(registry, upstream, metrics)
    discovery = discovery or StaticDiscovery(registry, settings.backends, client)
    key_file = KeyFileWatcher(settings.api_keys, keys) if settings.api_keys else None
    if key_file:
        key_file.load()  # a broken file at start-up is the command's error, not a silent open gateway

    async def watch_key_file() -> None:
        while True:
            await asyncio.sleep(1.0)
            key_file.poll()

    scraper = LoadScraper(registry, client)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await discovery.start()
        scraper.start()
        tasks = [asyncio.create_task(watch_key_file())] if key_file else []
        yield
        scraper.stop()
        for t in tasks:
            t.cancel()
        await discovery.stop()
        await upstream.close()
        await client.aclose()

    app = FastAPI(title="modelfleet gateway", docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.state.registry = registry

    def visible(key: ApiKey | None) -> list[dict]:
        return [c for c in registry.cards() if key is None or key.allows(c["id"])]

    @app.get("/v1/models")
    async def list_models(request: Request):
        return {"object": "list", "data": visible(keys.authenticate(request.headers))}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        for card in visible(keys.authenticate(request.headers)):
            if card["id"] == model_id:
                return card
        raise model_not_found(model_id)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Static: ready once a backend is. Kubernetes: ready once the watches have synced, even
        with no model yet, so gateway pods join their Service before the first model does."""
        models = sorted({e.model for e in registry.endpoints.values() if e.available()})
        if not discovery.ready():
            return JSONResponse({"status": "not ready", "models": models}, status_code=503)
        return {"status": "ready", "models": models}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.prom), media_type=CONTENT_TYPE_LATEST)

    async def forward(request: Request):
        started = time.monotonic()
        key: ApiKey | None = None
        name = "-"
        try:
            key = keys.authenticate(request.headers)
            body = await request.body()
            name, prefix = routing_fields(body)
            model = registry.resolve(name)
            if model is None:
                raise model_not_found(name)
            if key is not None and not key.allows(name):
                raise OpenAIError(f"Your API key is not allowed to use the model `{name}`.", status=403,
                                  type="permission_error", param="model", code="model_not_allowed")
            admission = limiter.admit(key)
            headers = dict(request.headers)
            headers["x-request-id"] = request.scope.get("state", {}).get("request_id", "")
            await discovery.wait_for(model)
            response = await proxy.forward(request.url.path, body, headers, model, admission.charge,
                                           key.name if key else "", prefix)
        except OpenAIError as exc:
            metrics.requests.labels(name, str(exc.status), key.name if key else "").inc()
            log.info("request refused", extra={"model": name, "status": exc.status,
                                               "key": key.name if key else None, "error": exc.code})
            raise
        response.headers.update(admission.headers)
        log.info("request routed", extra={"model": name, "status": response.status_code,
                                          "key": key.name if key else None,
                                          "backend": response.headers.get("x-modelfleet-backend"),
                                          "ms": round((time.monotonic() - started) * 1000, 1)})
        return response

    for path in PROXIED:
        app.add_api_route(path, forward, methods=["POST"])
    return app
