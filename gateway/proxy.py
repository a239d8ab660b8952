"""Forwards a request's original bytes to one endpoint and streams the answer back.

Fields the gateway does not know pass through untouched because the body is never re-encoded.
Connection errors and 5xx answers are retried on another endpoint, but only before the first
byte reaches the client; after that, a failure ends the stream with an OpenAI error event.

A streamed request also has a first-byte deadline: a worker sends a stream's headers as soon as
it has validated the request (before it queues or generates), so a replica that has not answered
within `first_byte_timeout` is stalled, and the request moves to another one. A non-streamed
answer only starts once it is complete, so it has no such deadline, only the read timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from modelfleet.protocol import error_body, sse, unavailable
from modelfleet.tracing import Tracing, end_span, end_upstream

from .metrics import GatewayMetrics
from .pool import Lease
from .registry import Endpoint, Registry
from .upstream import ReplicaLost, Upstream, UpstreamError, UpstreamResponse
from .usage import UsageScanner

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)
PASS_HEADERS = {"content-type", "retry-after", "cache-control", "x-accel-buffering"}
CLIENT_CLOSED = "499"  # nginx's status for a client that left before its answer was complete
# traceparent/tracestate: the client's W3C trace context, which a replica (vLLM too) continues;
# replaced by the gateway's own when it traces (modelfleet/tracing.py).
FORWARD_HEADERS = {"content-type", "accept", "x-request-id", "user-agent", "openai-organization", "traceparent",
                   "tracestate"}


class Proxy:
    def __init__(self, registry: Registry, upstream: Upstream, metrics: GatewayMetrics,
                 max_attempts: int = 3, first_byte_timeout: float = 15.0, tracing: Tracing | None = None) -> None:
        self.registry = registry
        self.tracing = tracing
        self.upstream = upstream
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.first_byte_timeout = first_byte_timeout
        self.rng = random.Random()

    async def forward(self, path: str, body: bytes, headers: dict[str, str], model: str,
                      on_usage: Callable[[int], None] | None = None, key_name: str = "",
                      prefix: str = "", stream: bool = False, received: float | None = None,
                      adapter: str | None = None) -> Relay:
        """Sends `body` to one endpoint of the (resolved) `model`, one holding `adapter` when the
        request names a LoRA adapter; `on_usage` gets the tokens the response reports once it
        has been relayed. `received` is when the gateway got the request, for time to first token."""
        received = received or time.monotonic()
        pool = self.registry.pool(model)
        strategy_name = pool.route.strategy
        tried: set[str] = set()
        send_headers = {k: v for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
        last_error = "no replica of the model is ready"
        for attempt in range(self.max_attempts):
            lease = pool.acquire(prefix, self.rng, exclude=tried, adapter=adapter)
            if lease is None:
                break
            endpoint = lease.endpoint
            tried.add(endpoint.url)
            if attempt:
                self.metrics.retries.labels(model).inc()
            started = time.monotonic()
            span = None if self.tracing is None else self.tracing.upstream(path, endpoint.url, strategy_name,
                                                                            attempt + 1, send_headers)
            try:
                upstream = await self._post(endpoint, endpoint.url + path, body, send_headers, stream)
            except asyncio.CancelledError:
                lease.release()  # the client left; aiohttp drops the connection, so the worker stops
                self.metrics.requests.labels(model, CLIENT_CLOSED, key_name).inc()
                end_span(span, "client_closed")
                raise
            except UpstreamError as exc:
                end_span(span, type(exc).__name__)
                lease.release()
                last_error = f"replica {endpoint.url} failed: {type(exc).__name__}"
                self.failed(endpoint)
                continue
            except BaseException:
                lease.release()
                raise
            others_left = bool(pool.available(exclude=tried, adapter=adapter))
            if upstream.status >= 500 and attempt + 1 < self.max_attempts and others_left:
                upstream.close(completed=False)
                end_upstream(span, upstream.status, str(upstream.status))
                lease.release()
                last_error = f"replica {endpoint.url} answered {upstream.status}"
                self.failed(endpoint)
                continue
            self.registry.record_success(endpoint)
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASS_HEADERS}
            out_headers["x-modelfleet-backend"] = endpoint.url
            out_headers["x-modelfleet-route"] = f"{strategy_name};attempt={attempt + 1}"
            if endpoint.deployment:  # which version answered, when several serve the name (spec.routing.weight)
                out_headers["x-modelfleet-deployment"] = endpoint.deployment
            self.metrics.routed.labels(model, endpoint.deployment).inc()
            self.metrics.first_byte.labels(model).observe(time.monotonic() - started)
            return Relay(upstream.status, out_headers, self, upstream, lease, model, received,
                         UsageScanner(len(body)), on_usage, key_name, span=span)
        raise unavailable(f"No ready replica for model `{model}` ({last_error}).", retry_after=2)

    async def _post(self, endpoint: Endpoint, url: str, body: bytes, headers: dict[str, str],
                    stream: bool) -> UpstreamResponse:
        """Sends the request and waits for the answer's headers. A stream gets them at once from
        a healthy worker, hence its deadline. A non-streamed answer comes whole at the end, so
        instead the wait ends if discovery finds the replica failing meanwhile (a wedged
        process, a failing readiness probe): the request then moves to another replica rather
        than waiting out the read timeout. A replica that is draining is left to finish."""
        if stream:
            async with asyncio.timeout(self.first_byte_timeout):
                return await self.upstream.post(url, body, headers)
        posting = asyncio.ensure_future(self.upstream.post(url, body, headers))
        lost = endpoint.lost_signal()
        try:
            await asyncio.wait((posting, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting = not posting.done()
            if waiting:
                posting.cancel()  # aiohttp drops the connection
        if waiting:
            raise ReplicaLost(f"{endpoint.url} was found failing while the request waited")
        return posting.result()

    def failed(self, endpoint: Endpoint) -> None:
        if self.registry.record_failure(endpoint):
            self.metrics.ejections.labels(endpoint.model).inc()
            log.warning("ejected %s after repeated failures", endpoint.url)


class ChunkFilter(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...


@dataclass
class Relay:
    """An upstream answer on its way to the client: its status, the headers to send, `read`
    for its bytes as they come, and `close`, which settles its books (in-flight count,
    connection, usage, metrics) exactly once, however the relay ended or if it never started.

    `read` is a plain coroutine rather than an async generator: it runs for every chunk of
    every stream, and each generator layer costs measurable gateway CPU (bench/gateway_overhead.py).
    """

    status: int
    headers: dict[str, str]
    proxy: Proxy
    upstream: UpstreamResponse
    lease: Lease  # the replica answering, counted on it until close
    model: str
    received: float
    scanner: UsageScanner
    on_usage: Callable[[int], None] | None
    key_name: str
    outcome: str = ""
    completed: bool = False
    ended: bool = False
    closed: bool = False
    first: float = 0.0
    last: float = 0.0
    # Rewrites the answer on its way (see DataPath): takes out the usage the gateway asked for
    # on the client's behalf, or rewords another engine's error. feed(b"") flushes.
    rewrite: ChunkFilter | None = None
    release: Callable[[], None] | None = None  # the capacity the request holds (see capacity.py)
    span: Span | None = None  # the upstream call's trace span, ended here (modelfleet/tracing.py)

    def __post_init__(self) -> None:
        self.streaming = self.upstream.headers.get("content-type", "").startswith("text/event-stream")
        self.endpoint = self.lease.endpoint

    async def read(self) -> bytes:
        """The next bytes to relay; b"" once the answer has ended."""
        if self.rewrite is not None:
            return await self._read_rewritten(self.rewrite)
        return await self._read()

    async def _read_rewritten(self, rewrite: ChunkFilter) -> bytes:
        while True:
            chunk = await self._read()
            out = rewrite.feed(chunk)
            if out or not chunk:
                return out

    async def _read(self) -> bytes:
        if self.ended:
            return b""
        try:
            chunk = await self.upstream.read()
        except UpstreamError as exc:
            return self._failed_midway(exc)
        if not chunk:
            self.completed = self.ended = True
            return b""
        scanner = self.scanner
        scanner.feed(chunk)
        self.last = self.endpoint.last_read = time.monotonic()
        if not self.first and self.streaming and scanner.events:
            self.first = self.last
            self.proxy.metrics.first_token.labels(self.model).observe(self.first - self.received)
        return chunk

    def _failed_midway(self, exc: BaseException) -> bytes:
        self.ended = True
        self.outcome = "upstream_error"
        self.proxy.failed(self.endpoint)
        log.warning("replica %s failed mid-response: %s", self.endpoint.url, exc)
        if not self.streaming:
            return b""
        message = "The model replica failed while streaming; please retry the request."
        return sse(error_body(message, type="server_error", code="upstream_error"))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        metrics, scanner = self.proxy.metrics, self.scanner
        self.lease.release()
        if self.release is not None:
            self.release()
        self.upstream.close(self.completed)
        tokens = scanner.tokens() if self.upstream.status == 200 else 0  # a stream cut short still used its tokens
        if self.on_usage is not None:
            self.on_usage(tokens)
        outcome = self.outcome or (str(self.upstream.status) if self.completed else CLIENT_CLOSED)
        metrics.requests.labels(self.model, outcome, self.key_name).inc()
        end_upstream(self.span, self.upstream.status, outcome)
        metrics.tokens.labels(self.model, self.key_name).inc(tokens)
        metrics.latency.labels(self.model).observe(time.monotonic() - self.received)
        if self.first and scanner.events > 1:
            # One observation per stream (its mean gap), not per event: the gateway relays
            # tens of thousands of events a second, and chunks arrive coalesced anyway.
            metrics.inter_token.labels(self.model).observe((self.last - self.first) / (scanner.events - 1))
