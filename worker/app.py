"""The worker process: load one model, build its engine and app, serve it, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from modelfleet.cli import WorkerSettings  # the worker's settings and command line: one home
from modelfleet.http import (
    ClientGone,
    GuardedHttpToolsProtocol,
    JsonFastPath,
    RequestIdMiddleware,
    install_error_handlers,
)
from modelfleet.netutil import bind_socket
from modelfleet.protocol import OpenAIError
from modelfleet.tracing import WORKER_SERVICE, TracedWorker, Tracing, from_environment

from .adapters import LoraAdapters
from .allocator import keep_freed_memory
from .content_type import JsonOnly
from .engine import EngineConfig, GenerationEngine
from .loader import (
    ModelSourceError,
    detect,
    load_causal_lm,
    load_cross_encoder,
    load_sentence_transformer,
    local_model_dir,
    pick_device,
    pick_dtype,
)
from .metrics import WorkerMetrics
from .routes import build_router, fast_routes
from .service import ModelService

log = logging.getLogger("modelfleet.worker")


def load_service(settings: WorkerSettings) -> tuple[ModelService, WorkerMetrics]:
    """Everything slow happens here, before the port opens: a worker that is up can serve."""
    import torch

    path = local_model_dir(settings.source)
    info = detect(path, settings.max_model_len)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    torch.set_grad_enabled(False)
    engine = scorer = None
    if info.task == "score":
        from .embedder import CrossEncoderScorer

        model = load_cross_encoder(info, device)
        tokenizer, embedder, scorer = model.tokenizer, None, CrossEncoderScorer(model)
    elif info.sentence_transformers:
        from .embedder import SentenceEmbedder

        model = load_sentence_transformer(info, device, settings.prepack_weights)
        tokenizer = model.tokenizer
        embedder = SentenceEmbedder(model)
    else:
        from .embedder import CausalEmbedder

        model, tokenizer = load_causal_lm(info, device, dtype, settings.prepack_weights)
        config = EngineConfig(max_model_len=info.max_model_len, max_num_seqs=settings.max_num_seqs,
                              max_num_batched_tokens=settings.max_num_batched_tokens,
                              enable_prefix_caching=settings.enable_prefix_caching,
                              prefix_cache_bytes=int(settings.prefix_cache_gib * (1 << 30)),
                              kv_cache_bytes=None if settings.kv_cache_gib is None
                              else int(settings.kv_cache_gib * (1 << 30)),
                              fused_decode=settings.prepack_weights)
        engine = GenerationEngine(model, tokenizer, config, info.eos_token_ids)
        embedder = CausalEmbedder(engine, info.max_model_len)
    service = ModelService(settings.served_names, info, tokenizer, engine, embedder, settings.max_num_seqs,
                           str(dtype).replace("torch.", ""), device, scorer=scorer)
    if engine:
        service.lora = LoraAdapters(engine, settings.served_names, settings.max_loras, settings.max_lora_rank)
        try:
            service.lora.load_static(list(settings.lora_modules))
        except OpenAIError as exc:
            raise ModelSourceError(exc.message) from None
    elif settings.lora_modules:  # `modelfleet serve` hands its options to every model's workers
        log.warning("--lora-modules ignored: %s is not a generation model", service.name)
    metrics = WorkerMetrics(service.name, engine.stats if engine else None, lambda: service.draining)
    if engine:
        engine.observe = metrics.observe
    return service, metrics


def create_app(service: ModelService, metrics: WorkerMetrics, tracing: Tracing | None = None) -> JsonOnly | TracedWorker:
    # /openapi.json is served by the router from modelfleet/openapi.py, not FastAPI's generator.
    app = FastAPI(title=f"modelfleet worker: {service.name}", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client has gone

    app.include_router(build_router(service, metrics))
    app.add_middleware(RequestIdMiddleware)
    served = JsonOnly(JsonFastPath(app, fast_routes(service)))
    return served if tracing is None else TracedWorker(served, tracing, service.name)


class DrainingServer(uvicorn.Server):
    """On SIGTERM: report not ready, refuse new generation, let in-flight requests finish (up to
    the drain timeout), then stop. uvicorn alone would close the listener at once."""

    def __init__(self, config: uvicorn.Config, service: ModelService, drain_timeout: float) -> None:
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.service.draining and getattr(self, "loop", None):
            self.service.draining = True
            log.info("SIGTERM: draining for up to %.0fs", self.drain_timeout)
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))
            return
        super().handle_exit(sig, frame)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        engine = self.service.engine
        while time.monotonic() < deadline:
            busy = engine is not None and (engine.stats.running or engine.stats.waiting or engine.inbox)
            if not busy and not self.server_state.tasks:
                break
            await asyncio.sleep(0.1)
        self.should_exit = True


def serve(settings: WorkerSettings) -> None:
    sock = bind_socket(settings.host, settings.port)  # fail on a busy port before the slow load
    service, metrics = load_service(settings)
    keep_freed_memory()  # for the engine's steps; after the load, so a failed load stays one line
    if service.engine:
        service.engine.start()
    app = create_app(service, metrics, from_environment(WORKER_SERVICE))
    # Keep-alive longer than the gateway's pool keeps idle connections (30 s), so the gateway
    # never sends a request on a connection this worker is closing.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off", timeout_keep_alive=75,
                            http=GuardedHttpToolsProtocol)  # bounds slow and huge request heads
    server = DrainingServer(config, service, settings.drain_timeout)
    log.info("serving %s (%s, %s) on http://%s:%d", service.name, service.info.task, service.info.path,
             settings.host, settings.port)
    try:
        server.run(sockets=[sock])
    finally:
        if service.engine:
            service.engine.stop()
