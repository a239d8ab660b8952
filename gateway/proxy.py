"""Forwards a request's original bytes to one endpoint and streams the answer back.

Fields the gateway does not know pass through untouched because the body is never re-encoded.
Connection errors and 5xx answers are retried on another endpoint, but only before the first
byte reaches the client; after that, a failure ends the stream with an OpenAI error event.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from modelfleet.protocol import error_body, unavailable

from .balancer import STRATEGIES, RequestView
from .metrics import GatewayMetrics
from .registry import Endpoint, Registry
from .upstream import Upstream, UpstreamError, UpstreamResponse
from .usage import UsageScanner

log = logging.getLogger(__name__)
PASS_HEADERS = {"content-type", "retry-after", "cache-control", "x-accel-buffering"}
FORWARD_HEADERS = {"content-type", "accept", "x-request-id", "user-agent", "openai-organization"}


class Proxy:
    def __init__(self, registry: Registry, upstream: Upstream, metrics: GatewayMetrics,
                 max_attempts: int = 3) -> None:
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.rng = random.Random()

    async def forward(self, path: str, body: bytes, headers: dict[str, str], model: str,
                      on_usage: Callable[[int], None] | None = None, key_name: str = "",
                      prefix: str = "") -> StreamingResponse:
        """Sends `body` to one endpoint of the (resolved) `model`; `on_usage` gets the tokens
        the response reports once it has been relayed."""
        routing = self.registry.meta.get(model, {})
        strategy_name = routing.get("strategy", "least-load")
        strategy = STRATEGIES.get(strategy_name, STRATEGIES["least-load"])
        view = RequestView(prefix=prefix, prefix_length=routing.get("prefix_length", 256),
                           load_factor=routing.get("load_factor", 1.25))
        tried: set[str] = set()
        send_headers = {k: v for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
        last_error = "no replica of the model is ready"
        for attempt in range(self.max_attempts):
            candidates = [e for e in self.registry.available(model) if e.url not in tried]
            if not candidates:
                break
            endpoint = strategy(candidates, view, self.rng)
            tried.add(endpoint.url)
            if attempt:
                self.metrics.retries.labels(model).inc()
            endpoint.inflight += 1
            started = time.monotonic()
            try:
                upstream = await self.upstream.post(endpoint.url + path, body, send_headers)
            except UpstreamError as exc:
                endpoint.inflight -= 1
                last_error = f"replica {endpoint.url} failed: {type(exc).__name__}"
                self._failed(endpoint)
                continue
            others_left = any(e.url not in tried for e in self.registry.available(model))
            if upstream.status >= 500 and attempt + 1 < self.max_attempts and others_left:
                upstream.close(completed=False)
                endpoint.inflight -= 1
                last_error = f"replica {endpoint.url} answered {upstream.status}"
                self._failed(endpoint)
                continue
            self.registry.record_success(endpoint)
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASS_HEADERS}
            out_headers["x-modelfleet-backend"] = endpoint.url
            out_headers["x-modelfleet-route"] = f"{strategy_name};attempt={attempt + 1}"
            self.metrics.first_byte.labels(model).observe(time.monotonic() - started)
            scanner = UsageScanner(len(body))
            relay = self._relay(upstream, endpoint, model, started, scanner, on_usage, key_name)
            return StreamingResponse(relay, status_code=upstream.status, headers=out_headers)
        raise unavailable(f"No ready replica for model `{model}` ({last_error}).", retry_after=2)

    def _failed(self, endpoint: Endpoint) -> None:
        if self.registry.record_failure(endpoint):
            self.metrics.ejections.labels(endpoint.model).inc()
            log.warning("ejected %s after repeated failures", endpoint.url)

    async def _relay(self, upstream: UpstreamResponse, endpoint: Endpoint, model: str, started: float,
                     scanner: UsageScanner, on_usage: Callable[[int], None] | None,
                     key_name: str) -> AsyncIterator[bytes]:
        streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")
        status = str(upstream.status)
        completed = False
        try:
            async for chunk in upstream.chunks():
                scanner.feed(chunk)
                yield chunk
            completed = True
        except UpstreamError as exc:
            status = "upstream_error"
            self._failed(endpoint)
            log.warning("replica %s failed mid-response: %s", endpoint.url, exc)
            if streaming:
                message = "The model replica failed while streaming; please retry the request."
                yield b"data: " + json.dumps(error_body(message, type="server_error", code="upstream_error")).encode()
                yield b"\n\n"
        finally:
            endpoint.inflight -= 1
            upstream.close(completed)
            tokens = scanner.tokens() if upstream.status == 200 else 0
            if on_usage is not None:
                on_usage(tokens)
            self.metrics.requests.labels(model, status, key_name).inc()
            self.metrics.tokens.labels(model, key_name).inc(tokens)
            self.metrics.latency.labels(model).observe(time.monotonic() - started)
