"""One trace per request, across the gateway and the worker, in-process: the gateway's app and
the worker's app (the demo model's engine running) joined by httpx.ASGITransport, each with a
TracerProvider of its own service name exporting to the SDK's in-memory exporter, which stands
in for the collector. Checked: the span names, that every span belongs to the client's trace,
and the parent links (client -> gateway -> upstream call -> worker -> queue, prefill, decode).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from modelfleet.gateway.app import GatewaySettings, create_app
from modelfleet.gateway.upstream import ProbeAnswer, UpstreamResponse
from modelfleet.tracing import GATEWAY_SERVICE, WORKER_SERVICE, Tracing
from modelfleet.worker.app import create_app as create_worker_app
from modelfleet.worker.metrics import WorkerMetrics

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
WORKER = "http://worker"


class AsgiUpstream:
    """The gateway's upstream client (gateway/upstream.py) on httpx.ASGITransport, so that the
    worker's app answers in this process: aiohttp, the real one, needs a socket. Records what
    the replica was sent."""

    def __init__(self, app) -> None:
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), timeout=120)
        self.sent: list[dict[str, str]] = []

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        self.sent.append(dict(headers))
        response = await self.client.send(self.client.build_request("POST", url, content=body, headers=headers),
                                          stream=True)
        return AsgiResponse(response.status_code, dict(response.headers), response)

    async def close(self) -> None:
        await self.client.aclose()


class AsgiResponse(UpstreamResponse):
    async def read(self) -> bytes:
        if not hasattr(self, "chunks"):
            self.chunks = self.raw.aiter_raw()
        return await anext(self.chunks, b"")

    def close(self, completed: bool) -> None:
        asyncio.get_running_loop().create_task(self.raw.aclose())


class AsgiProbes:
    """The gateway's probe client (gateway/upstream.py Probes) on httpx.ASGITransport, likewise."""

    def __init__(self, app) -> None:
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), timeout=5)

    async def get(self, url: str, timeout: float) -> ProbeAnswer:
        r = await self.client.get(url, timeout=timeout)
        return ProbeAnswer(r.status_code, r.content)

    async def close(self) -> None:
        await self.client.aclose()


def provider(service: str, exporter: InMemorySpanExporter) -> Tracing:
    sdk = TracerProvider(resource=Resource.create({"service.name": service}))
    sdk.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(sdk.get_tracer("modelfleet"))


@pytest.fixture(scope="module")
def traced_worker(worker):
    """The session's worker service behind a traced app of its own."""
    _, service = worker
    exporter = InMemorySpanExporter()
    metrics = WorkerMetrics(service.name, service.engine.stats, lambda: False)
    return create_worker_app(service, metrics, provider(WORKER_SERVICE, exporter)), exporter


async def through_gateway(worker_app, test, tracing: Tracing | None, ready: asyncio.Event | None = None) -> None:
    """`test(client, gateway, upstream)` against a gateway whose one backend is `worker_app`;
    until `ready` is set, the backend's readiness probe answers 503."""

    async def probed(scope, receive, send):
        if ready is not None and not ready.is_set():
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await worker_app(scope, receive, send)

    gateway = create_app(GatewaySettings(backends={"tiny-chat": [WORKER]}, hold_timeout=30), probes=AsgiProbes(probed),
                         tracing=tracing)
    upstream = gateway.proxy.upstream = AsgiUpstream(worker_app)
    try:
        async with gateway.app.router.lifespan_context(gateway.app):
            transport = httpx.ASGITransport(app=gateway)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=120) as client:
                await test(client, gateway, upstream)
    finally:
        await upstream.close()


def chat(**kw) -> dict:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5,
            "temperature": 0, **kw}


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def parent_of(span: ReadableSpan) -> str:
    return format(span.parent.span_id, "016x") if span.parent else ""


def sid(span: ReadableSpan) -> str:
    return format(span.context.span_id, "016x")


def test_a_streamed_chat_is_one_trace_from_the_client_through_the_gateway_to_the_engine(traced_worker):
    worker_app, worker_spans = traced_worker
    worker_spans.clear()
    gateway_spans = InMemorySpanExporter()
    answer: dict = {}

    async def test(client, gateway, upstream):
        async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True, stream_options={
                "include_usage": True}), headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"}) as r:
            assert r.status_code == 200
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        answer["usage"] = json.loads(events[-2])["usage"]
        answer["sent"] = upstream.sent[-1]
        answer["rid"] = r.headers["x-request-id"]

    asyncio.run(through_gateway(worker_app, test, provider(GATEWAY_SERVICE, gateway_spans)))

    g, w = by_name(gateway_spans.get_finished_spans()), by_name(worker_spans.get_finished_spans())
    assert set(g) == {"POST /v1/chat/completions", "upstream"}  # no replica to wait for: no hold span
    assert set(w) == {"POST /v1/chat/completions", "queue", "prefill", "decode"}
    server, call = g["POST /v1/chat/completions"][0], g["upstream"][0]
    worker_server = w["POST /v1/chat/completions"][0]
    everything = [*gateway_spans.get_finished_spans(), *worker_spans.get_finished_spans()]
    assert {format(s.context.trace_id, "032x") for s in everything} == {TRACE_ID}  # the client's trace, continued

    # client -> gateway server span -> upstream call -> worker server span -> engine phases
    assert parent_of(server) == CLIENT_SPAN and server.kind == SpanKind.SERVER
    assert parent_of(call) == sid(server) and call.kind == SpanKind.CLIENT
    assert parent_of(worker_server) == sid(call) and worker_server.kind == SpanKind.SERVER
    for phase in ("queue", "prefill", "decode"):
        assert parent_of(w[phase][0]) == sid(worker_server)
    assert server.resource.attributes["service.name"] == GATEWAY_SERVICE
    assert worker_server.resource.attributes["service.name"] == WORKER_SERVICE

    # what the replica was sent: the upstream call's context, the client's tracestate kept
    assert answer["sent"]["traceparent"] == f"00-{TRACE_ID}-{sid(call)}-01"
    assert answer["sent"]["tracestate"] == "vendor=1"

    assert server.attributes["gen_ai.request.model"] == "tiny-chat"
    assert server.attributes["gen_ai.operation.name"] == "chat"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["modelfleet.request_id"] == answer["rid"]
    route = next(e for e in server.events if e.name == "route")
    assert route.attributes["server.address"] == WORKER and route.attributes["modelfleet.route.policy"] == "least-load"
    assert [e.name for e in server.events] == ["admitted", "route"]
    assert call.attributes["http.response.status_code"] == 200 and call.attributes["modelfleet.outcome"] == "200"
    assert call.attributes["url.full"] == WORKER + "/v1/chat/completions"

    # the engine's phases follow each other, inside the worker's span, and count the tokens
    queue, prefill, decode = w["queue"][0], w["prefill"][0], w["decode"][0]
    slack = 2_000_000  # ns: each is converted from the engine's monotonic clock on its own
    assert worker_server.start_time - slack <= queue.start_time <= queue.end_time
    assert abs(queue.end_time - prefill.start_time) < slack and abs(prefill.end_time - decode.start_time) < slack
    assert prefill.start_time <= prefill.end_time <= decode.end_time <= worker_server.end_time + slack
    assert prefill.attributes["gen_ai.usage.input_tokens"] == answer["usage"]["prompt_tokens"]
    assert decode.attributes["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"]
    assert worker_server.attributes["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"]
    assert worker_server.attributes["gen_ai.response.model"] == "tiny-chat"
    # the gateway's span ends when the stream has ended, so it holds the whole upstream call
    assert server.start_time <= call.start_time and call.end_time <= server.end_time


def test_a_request_held_for_a_starting_replica_shows_the_hold_and_a_new_trace_without_traceparent(traced_worker):
    worker_app, worker_spans = traced_worker
    worker_spans.clear()
    gateway_spans = InMemorySpanExporter()

    async def main():
        ready = asyncio.Event()

        async def test(client, gateway, upstream):
            request = asyncio.create_task(client.post("/v1/completions", json={
                "model": "tiny-chat", "prompt": "Hello", "max_tokens": 3}))
            while not gateway.registry.waiting.get("tiny-chat"):
                await asyncio.sleep(0.01)  # held: the replica is still "starting"
            ready.set()
            r = await request
            assert r.status_code == 200, r.text
            assert "traceparent" in upstream.sent[-1]

        await through_gateway(worker_app, test, provider(GATEWAY_SERVICE, gateway_spans), ready)

    asyncio.run(main())
    g, w = by_name(gateway_spans.get_finished_spans()), by_name(worker_spans.get_finished_spans())
    server, hold, call = g["POST /v1/completions"][0], g["hold"][0], g["upstream"][0]
    assert server.parent is None  # no traceparent from the client: the gateway starts the trace
    assert parent_of(hold) == sid(server) and parent_of(call) == sid(server)
    assert server.start_time <= hold.start_time < hold.end_time <= call.start_time
    assert server.attributes["gen_ai.operation.name"] == "text_completion"
    worker_server = w["POST /v1/completions"][0]
    assert worker_server.context.trace_id == server.context.trace_id and parent_of(worker_server) == sid(call)


def test_a_refused_request_is_traced_with_its_error_and_a_failed_replica_marks_its_call(traced_worker):
    worker_app, _ = traced_worker
    gateway_spans = InMemorySpanExporter()

    async def test(client, gateway, upstream):
        r = await client.post("/v1/chat/completions", json={**chat(), "model": "nope"})
        assert r.status_code == 404

    asyncio.run(through_gateway(worker_app, test, provider(GATEWAY_SERVICE, gateway_spans)))
    (server,) = gateway_spans.get_finished_spans()
    assert server.attributes["http.response.status_code"] == 404
    assert server.attributes["error.type"] == "model_not_found"
    assert server.status.status_code != StatusCode.ERROR  # a client's mistake is not the server's error


def test_with_tracing_off_no_spans_are_made_and_the_clients_trace_context_still_reaches_the_replica(traced_worker):
    worker_app, worker_spans = traced_worker
    worker_spans.clear()

    async def test(client, gateway, upstream):
        assert gateway.tracing is None and gateway.proxy.tracing is None
        r = await client.post("/v1/chat/completions", json=chat(), headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200
        assert upstream.sent[-1]["traceparent"] == TRACEPARENT  # passed through untouched

    asyncio.run(through_gateway(worker_app, test, None))
    # The worker (which traces here) continues the client's own trace directly.
    w = by_name(worker_spans.get_finished_spans())
    assert set(w) == {"POST /v1/chat/completions", "queue", "prefill", "decode"}  # a whole answer, not a stream
    (worker_server,) = w["POST /v1/chat/completions"]
    assert parent_of(worker_server) == CLIENT_SPAN
    assert all(parent_of(w[phase][0]) == sid(worker_server) for phase in ("queue", "prefill", "decode"))
