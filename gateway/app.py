"""The gateway's app: the proxied OpenAI paths on the raw ASGI data path (datapath.py), and model
listing, health and metrics on FastAPI. Discovery and the key sources are handed in; this module
wires them together."""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelfleet.http import MAX_BODY_BYTES, RequestIdMiddleware, install_error_handlers
from modelfleet.openapi import openapi_document
from modelfleet.protocol import model_not_found
from modelfleet.tracing import GATEWAY_SERVICE, Tracing, from_environment

from .auth import ApiKey, KeyFileWatcher, KeyStore
from .capacity import Capacity
from .datapath import DataPath
from .limits import RateLimiter
from .load import LoadScraper
from .metrics import GatewayMetrics
from .proxy import Proxy
from .registry import Registry
from .responses_store import (
    DEFAULT_MAX_STORED,
    DEFAULT_TTL,
    Conversations,
    KubernetesStore,
    MemoryStore,
    install_routes,
)
from .static import StaticDiscovery
from .upstream import Probes, Upstream

log = logging.getLogger("modelfleet.gateway")


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
    first_byte_timeout: float = 15.0  # streams only; see proxy.py
    hold_timeout: float = 60.0  # static: a request waits this long for a backend that is starting
    probe_interval: float = 1.0  # static: seconds between readiness probes of each backend
    probe_timeout: float = 2.0  # static: a probe's wait for each step of its answer (see static.py)
    max_inflight_per_replica: int = 256  # past this, a burst gets 503 at once (see capacity.py)
    max_connections: int = 4096
    max_body_bytes: int = MAX_BODY_BYTES  # a larger request body gets 413
    responses_ttl: float = DEFAULT_TTL  # seconds a stored response is kept; 0: storing off
    responses_max: int = DEFAULT_MAX_STORED  # stored responses kept at most (oldest go first)


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


def response_store(settings: GatewaySettings) -> KubernetesStore | MemoryStore | None:
    """Secrets in the gateway's namespace when replicas share a cluster, memory for one gateway."""
    if settings.responses_ttl <= 0:
        return None
    if settings.discovery == "kubernetes":
        from .kube import own_namespace

        return KubernetesStore(own_namespace(), settings.responses_ttl, settings.responses_max)
    return MemoryStore(settings.responses_ttl, settings.responses_max)


def settle_garbage_collector() -> None:
    """Measured under bench/gateway_overhead.py at 64 streams, Python's cyclic collector took
    about 11% of the gateway's CPU, most of it re-scanning the objects that imports and
    start-up left behind (FastAPI, pydantic, the Kubernetes client). Those move to the
    permanent generation, and young collections run every 10,000 net allocations instead of
    700: request garbage is freed by reference counting, and what cycles remain wait a little
    longer. Gateway CPU per relayed event fell by about a tenth."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def create_app(settings: GatewaySettings, registry: Registry | None = None,
               probes: Probes | None = None, keys: KeyStore | None = None,
               limiter: RateLimiter | None = None, discovery=None, tracing: Tracing | None = None) -> DataPath:
    """The gateway as one ASGI app: the proxied paths on the raw data path, the rest on FastAPI.
    Traces go where the OTEL_* environment says (modelfleet/tracing.py) unless `tracing` is given.
    `probes` is the control calls' client (readiness, model cards, load scrapes; upstream.py)."""
    tracing = tracing or from_environment(GATEWAY_SERVICE)
    registry = registry or Registry()
    probes = probes or Probes()
    keys = keys or KeyStore()
    if discovery is None and settings.discovery == "kubernetes":
        discovery, replicas = kubernetes_discovery(settings, registry, keys)
        limiter = limiter or RateLimiter(replicas=replicas)
    limiter = limiter or RateLimiter()
    metrics = GatewayMetrics(registry)
    upstream = Upstream(settings.connect_timeout, settings.read_timeout, settings.max_connections)
    proxy = Proxy(registry, upstream, metrics, first_byte_timeout=settings.first_byte_timeout, tracing=tracing)
    discovery = discovery or StaticDiscovery(registry, settings.backends, probes, interval=settings.probe_interval,
                                             hold_timeout=settings.hold_timeout, probe_timeout=settings.probe_timeout)
    key_file = KeyFileWatcher(settings.api_keys, keys) if settings.api_keys else None
    if key_file:
        key_file.load()  # a broken file at start-up is the command's error, not a silent open gateway

    async def watch_key_file() -> None:
        while True:
            await asyncio.sleep(1.0)
            key_file.poll()

    scraper = LoadScraper(registry, probes)
    conversations = Conversations(response_store(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await discovery.start()
        scraper.start()
        conversations.start()
        tasks = [asyncio.create_task(watch_key_file())] if key_file else []
        settle_garbage_collector()
        yield
        scraper.stop()
        conversations.stop()
        for t in tasks:
            t.cancel()
        await discovery.stop()
        await upstream.close()
        await probes.close()

    # The document is ours (modelfleet/openapi.py): FastAPI's would list only the routes below.
    app = FastAPI(title="modelfleet gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    document = openapi_document("modelfleet gateway")
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

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

    install_routes(app, keys, conversations)

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

    @app.get("/openapi.json")
    async def openapi():
        return JSONResponse(document)

    return DataPath(app, keys=keys, registry=registry, limiter=limiter, discovery=discovery, proxy=proxy,
                    metrics=metrics, capacity=Capacity(settings.max_inflight_per_replica), responses=conversations,
                    tracing=tracing, max_body_bytes=settings.max_body_bytes)
