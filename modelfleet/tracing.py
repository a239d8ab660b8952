"""OpenTelemetry traces: one trace per request, across the gateway and the worker.

The gateway's server span continues the client's W3C trace context (`traceparent`,
`tracestate`); under it sit the hold for a replica (when there is one), the routing decision
and one client span per upstream attempt, whose context goes to the replica in `traceparent`.
The worker continues that trace with its own server span and, when the request is done, the
`queue`, `prefill` and `decode` spans, made after the fact from the times the engine thread
already keeps on the request (worker/sequence.py): OpenTelemetry is never called from the
engine thread.

Tracing is on when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
`OTEL_EXPORTER_OTLP_ENDPOINT`); everything else (sampler, headers, timeouts, resource
attributes) comes from the SDK's standard OTEL_* environment. Off, `from_environment` returns
None and the gateway and the worker keep their untraced code: no span objects, no header
parsing, one `is None` check per request.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

try:  # a dependency of the package, but the images install pinned lists: one without it only cannot trace
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind, StatusCode
except ImportError:  # pragma: no cover
    trace = None
if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
GATEWAY_SERVICE = "modelfleet-gateway"
WORKER_SERVICE = "modelfleet-worker"
# gen_ai.operation.name (OpenTelemetry's GenAI semantic conventions) by OpenAI path.
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/embeddings": "embeddings",
              "/v1/responses": "chat", "/v1/edits": "chat"}
# The engine's requests started by the worker request being served (see `track`).
_engine_requests: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("traced_requests", default=None)


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """An OTLP endpoint is set and neither the SDK nor its trace exporter is switched off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARS)


def from_environment(service_name: str, environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """A tracer exporting over OTLP/HTTP in batches, configured by the OTEL_* environment, or
    None when no endpoint is set. The service name is the process's (`modelfleet-gateway`,
    `modelfleet-worker`), so one shared environment still tells the two apart."""
    if not enabled(environ):
        return None
    if trace is None:
        raise RuntimeError("an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT) but OpenTelemetry is not installed: "
                           "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http")
    # Imported here: a process that does not trace never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))  # sampler: OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider.get_tracer("modelfleet"), provider)


_OFFSET_REFRESH_NS = 30 * 10**9
_offset: tuple[int, int] = (0, -_OFFSET_REFRESH_NS)  # (epoch minus monotonic, when it was read)


def _epoch_offset_ns() -> int:
    """Epoch minus monotonic nanoseconds. Reading both clocks at every conversion let a thread
    switch between the two reads shift a span by milliseconds (up to 65 ms measured under load),
    putting a child before its parent: the offset is read as the tightest of three bracketed
    reads, and read again every 30 s so that a step of the wall clock (NTP, a paused VM) does
    not shift a long-running process's spans against the SDK's own timestamps for good."""
    global _offset
    now = time.monotonic_ns()
    if now - _offset[1] < _OFFSET_REFRESH_NS:
        return _offset[0]
    best = None
    for _ in range(3):
        before, wall, after = time.monotonic_ns(), time.time_ns(), time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) // 2)
    _offset = (best[1], now)
    return best[1]


def wall_ns(monotonic: float) -> int:
    """A `time.monotonic()` reading (what the engine and the gateway keep) as epoch nanoseconds."""
    return _epoch_offset_ns() + int(monotonic * 1e9)


def end_span(span: Span | None, error: str | None = None, **attributes: Any) -> None:
    """Ends a span that may not exist (tracing off), with its last attributes and an error."""
    if span is None:
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        span.set_attribute("error.type", error)
        span.set_status(StatusCode.ERROR, error)
    span.end()


def end_upstream(span: Span | None, status: int, outcome: str) -> None:
    """Ends an upstream call's span with the replica's status and how the relay ended (the
    gateway's request metric's `status` label: a status, "499" or "upstream_error")."""
    if span is not None:
        error = outcome if status >= 500 or outcome == "upstream_error" else None
        end_span(span, error, **{"http.response.status_code": status, "modelfleet.outcome": outcome})


def track(state: Any) -> None:
    """Notes an engine request (worker/sequence.py RequestState) started by the request being
    traced, for its queue, prefill and decode spans; nothing when the worker does not trace."""
    states = _engine_requests.get()
    if states is not None:
        states.append(state)


class Tracing:
    """The spans modelfleet makes, on one tracer (tests hand in one from an in-memory SDK)."""

    def __init__(self, tracer: Tracer, provider: Any = None) -> None:
        self.tracer = tracer
        self.provider = provider  # the SDK's TracerProvider, which also flushes at exit

    def flush(self, timeout_millis: int = 30_000) -> bool:
        """Exports what the batch processor holds now (a test, or a caller that cannot wait)."""
        return self.provider is None or self.provider.force_flush(timeout_millis)

    # -- both sides ---------------------------------------------------------------------------

    @contextmanager
    def server(self, path: str, headers: Mapping[str, str], send: Send) -> Iterator[tuple[Span, Send]]:
        """The request's server span, continuing the caller's trace context and current until
        the response has been sent; yields it and a `send` that records the response status."""
        parent = propagate.extract(headers)
        span = self.tracer.start_span(f"POST {path}", parent, kind=SpanKind.SERVER, attributes={
            "http.request.method": "POST", "http.route": path, "url.path": path,
            "modelfleet.request_id": headers.get("x-request-id", ""),
        })
        operation = OPERATIONS.get(path)
        if operation:
            span.set_attribute("gen_ai.operation.name", operation)

        async def traced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
                    span.set_attribute("error.type", str(status))
            await send(message)

        token = context.attach(trace.set_span_in_context(span, parent))
        try:
            yield span, traced_send
        except BaseException as exc:
            # A client that leaves cancels the request: a span of its own kind, not an error.
            span.set_attribute("error.type", type(exc).__name__)
            raise
        finally:
            context.detach(token)
            span.end()

    # -- the gateway --------------------------------------------------------------------------

    @staticmethod
    def admitted(model: str, key_name: str) -> None:
        """The request passed its key and rate limits."""
        span = trace.get_current_span()
        span.set_attribute("gen_ai.request.model", model)
        span.add_event("admitted", {"modelfleet.key": key_name})

    @staticmethod
    def refused(model: str, status: int, code: str | None) -> None:
        span = trace.get_current_span()
        span.set_attributes({"gen_ai.request.model": model, "error.type": code or str(status)})

    def hold(self, model: str, started: float, ended: float) -> None:
        """The time the request waited for a replica of `model` to become ready (monotonic)."""
        span = self.tracer.start_span("hold", start_time=wall_ns(started), attributes={"gen_ai.request.model": model})
        span.end(end_time=wall_ns(ended))

    def upstream(self, path: str, url: str, policy: str, attempt: int, headers: MutableMapping[str, str]) -> Span:
        """One attempt at a replica: the routing decision as an event on the request's span,
        and a client span whose context goes to the replica in `headers` (traceparent)."""
        attributes = {"server.address": url, "modelfleet.route.policy": policy, "modelfleet.route.attempt": attempt}
        trace.get_current_span().add_event("route", attributes)
        span = self.tracer.start_span("upstream", kind=SpanKind.CLIENT, attributes={
            **attributes, "http.request.method": "POST", "url.full": url + path})
        propagate.inject(headers, trace.set_span_in_context(span))
        return span

    # -- the worker ---------------------------------------------------------------------------

    def engine_spans(self, span: Span, states: list[Any]) -> None:
        """`queue`, `prefill` and `decode` under `span` for each engine request, from the times
        the engine thread recorded (monotonic), and the request's token counts."""
        parent = trace.set_span_in_context(span)
        now = time.monotonic()
        for state in states:
            started, first, finished = state.prefill_started, state.first_token_at, state.finished_at
            self._child("queue", parent, state.arrival, started or now)
            if started is not None:
                self._child("prefill", parent, started, first or now, {
                    "gen_ai.usage.input_tokens": len(state.request.prompt_ids),
                    "modelfleet.cached_tokens": state.cached_tokens})
            if first is not None:
                self._child("decode", parent, first, finished or now,
                            {"gen_ai.usage.output_tokens": state.completion_tokens})
        if states:
            span.set_attributes({
                "gen_ai.usage.input_tokens": sum(len(s.request.prompt_ids) for s in states),
                "gen_ai.usage.output_tokens": sum(s.completion_tokens for s in states)})

    def _child(self, name: str, parent: context.Context, start: float, end: float,
               attributes: dict[str, Any] | None = None) -> None:
        self.tracer.start_span(name, parent, start_time=wall_ns(start), attributes=attributes).end(end_time=wall_ns(end))


class TracedWorker:
    """The worker's POSTs in a server span that continues the gateway's trace, with the engine's
    queue, prefill and decode spans added once the response has been sent (see `track`)."""

    def __init__(self, app: ASGIApp, tracing: Tracing, model: str) -> None:
        self.app = app
        self.tracing = tracing
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)  # probes and metrics scrapes are not traced
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        states: list[Any] = []
        token = _engine_requests.set(states)
        try:
            with self.tracing.server(scope["path"], headers, send) as (span, traced_send):
                span.set_attribute("gen_ai.response.model", self.model)
                try:
                    await self.app(scope, receive, traced_send)
                finally:
                    self.tracing.engine_spans(span, states)
        finally:
            _engine_requests.reset(token)
