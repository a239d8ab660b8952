"""The proxied OpenAI paths as a raw ASGI app: the part of the gateway every request crosses.

Measured with bench/gateway_overhead.py, FastAPI's StreamingResponse costs a task group, a
disconnect listener and four middleware hops for every relayed chunk, which kept the gateway
near 0.7x of direct throughput at 32 streams. Here a request costs one body read, the key,
limit and routing checks, and one `send` per chunk, and a single watcher per request notices
a client that goes away. Everything else (/v1/models, health, metrics) stays on FastAPI, which
this app wraps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from modelfleet.http import (
    MAX_BODY_BYTES,
    ClientGone,
    DisconnectWatch,
    RawPostPaths,
    internal_error,
    read_body,
    send_error,
)
from modelfleet.protocol import RERANK_PATHS, SCORE_PATHS, OpenAIError, model_not_found
from modelfleet.tracing import Tracing

from .auth import ApiKey, KeyStore
from .capacity import Capacity
from .engines import ErrorRewriter, check_for_engine
from .limits import RateLimiter
from .metrics import GatewayMetrics
from .proxy import Proxy, Relay
from .registry import Registry
from .responses_store import Conversations
from .routing import routing_fields
from .usage import UsageStripper, ask_for_usage

log = logging.getLogger("modelfleet.gateway")
PROXIED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/edits",
                     "/tokenize", "/detokenize", *SCORE_PATHS, *RERANK_PATHS})


# Streams whose usage comes only when asked for (stream_options); a Responses stream always
# ends with its usage in `response.completed`.
USAGE_STREAMS = frozenset({"/v1/chat/completions", "/v1/completions"})


class ReplicaWait(Protocol):
    """What the data path needs of discovery (static or Kubernetes)."""

    async def wait_for(self, model: str, adapter: str | None = None) -> None: ...


@dataclass
class DataPath(RawPostPaths):
    """Routes POSTs on the proxied paths itself and hands every other request to `app`; the
    request id and 405 come from modelfleet.http's RawPostPaths, as on the worker's fast path."""

    paths: ClassVar[frozenset[str]] = PROXIED

    app: ASGIApp
    keys: KeyStore
    registry: Registry
    limiter: RateLimiter
    discovery: ReplicaWait
    proxy: Proxy
    metrics: GatewayMetrics
    capacity: Capacity = field(default_factory=Capacity)
    max_body_bytes: int = MAX_BODY_BYTES
    tracing: Tracing | None = None  # OpenTelemetry spans (modelfleet/tracing.py); None: off, and free
    responses: Conversations | None = None  # stored Responses (responses_store.py)

    async def respond(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        headers["x-request-id"] = rid
        if self.tracing is None:
            await self.serve(scope["path"], headers, receive, send)
        else:
            with self.tracing.server(scope["path"], headers, send) as (_, traced_send):
                await self.serve(scope["path"], headers, receive, traced_send)

    async def serve(self, path: str, headers: dict[str, str], receive: Receive, send: Send) -> None:
        received = time.monotonic()
        rid = headers["x-request-id"]
        try:
            key = self.keys.authenticate(headers)
            body = await read_body(receive, self.max_body_bytes)
        except ClientGone:
            return
        except OpenAIError as exc:
            self.refused(exc, "-", None)
            await send_error(send, exc, rid)
            return
        # From here on the client leaving cancels the work: the hold for a replica, the wait
        # for a non-streamed answer (which arrives whole), or the relay of a stream.
        async with DisconnectWatch(receive) as client:
            answer = await self.route(path, body, headers, key, received)
            if not isinstance(answer, OpenAIError):  # a Relay, or responses_store's wrapper of one
                await self.relay(answer, client, send)
            else:
                client.finishing()  # the error completes the response; no client left
                await send_error(send, answer, rid)

    async def route(self, path: str, body: bytes, headers: dict[str, str], key: ApiKey | None,
                    received: float) -> Relay | OpenAIError:
        """Checks, picks a replica and sends it the request: the answer to relay, or the error
        to answer with."""
        name = "-"
        try:
            fields = routing_fields(body)
            name = fields.model
            model = self.registry.resolve(name)
            if model is None:
                raise model_not_found(name)
            if key is not None and not key.allows(name):
                raise OpenAIError(f"Your API key is not allowed to use the model `{name}`.", status=403,
                                  type="permission_error", param="model", code="model_not_allowed")
            engine = self.registry.engine(model)
            if engine != "modelfleet":
                check_for_engine(engine, path, body, name)
            admission = self.limiter.admit(key)
            if self.tracing is not None:
                self.tracing.admitted(name, key.name if key else "")
            turn = None
            if path == "/v1/responses" and self.responses is not None:
                body, turn = await self.responses.begin(body, key)  # a continued conversation, expanded
                fields = routing_fields(body)  # its whole prefix, for prefix affinity
            # A tpm limit is charged from the usage the answer reports: ask for it on streams.
            strip_usage = (key is not None and key.tpm is not None and fields.stream and not fields.usage_asked
                           and path in USAGE_STREAMS)
            if strip_usage:
                body = ask_for_usage(body)
            adapter = self.registry.adapter(name)
            await self.wait_for_replica(model, adapter)
            release = self.capacity.acquire(model, key.name if key else "", len(self.registry.available(model)))
            try:
                prefix = self.registry.pool(model).prefix(fields)
                relay = await self.proxy.forward(path, body, headers, model, admission.charge,
                                                 key.name if key else "", prefix, stream=fields.stream,
                                                 received=received, adapter=adapter)
            except BaseException:
                release()
                raise
            relay.release = release
            if strip_usage and relay.streaming and relay.status == 200:
                relay.rewrite = UsageStripper()
            elif engine != "modelfleet" and relay.status >= 400 and not relay.streaming:
                relay.rewrite = ErrorRewriter.for_answer(relay, name, path)
            if turn is not None:
                relay = await self.responses.capture(relay, turn)
        except OpenAIError as exc:
            self.refused(exc, name, key)
            return exc
        except Exception:  # noqa: BLE001 - a bug answers 500 in the API's format, never a stack trace
            log.exception("unhandled error on %s", path)
            return internal_error()
        relay.headers.update(admission.headers)
        relay.headers["x-request-id"] = headers["x-request-id"]
        log.info("request routed", extra={"model": name, "status": relay.status, "key": key.name if key else None,
                                          "backend": relay.headers.get("x-modelfleet-backend"),
                                          "ms": round((time.monotonic() - received) * 1000, 1)})
        return relay

    def refused(self, exc: OpenAIError, model: str, key: ApiKey | None) -> None:
        self.metrics.requests.labels(model, str(exc.status), key.name if key else "").inc()
        if self.tracing is not None:
            self.tracing.refused(model, exc.status, exc.code)
        log.info("request refused", extra={"model": model, "status": exc.status,
                                           "key": key.name if key else None, "error": exc.code})

    async def wait_for_replica(self, model: str, adapter: str | None = None) -> None:
        if self.registry.available(model, adapter):
            return  # the common case costs no timing
        started = time.monotonic()
        try:
            await self.discovery.wait_for(model, adapter)
        finally:
            ended = time.monotonic()
            self.metrics.queue_wait.labels(model).observe(ended - started)
            if self.tracing is not None:
                self.tracing.hold(model, started, ended)

    @staticmethod
    async def relay(relay: Relay, client: DisconnectWatch, send: Send) -> None:
        """Sends the upstream's bytes as they come. If the client goes away, `client` cancels
        this, and closing the relay drops the upstream connection: that is how the worker
        learns to stop generating and free the request's batch row."""
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in relay.headers.items()]
        try:
            await send({"type": "http.response.start", "status": relay.status, "headers": headers})
            while chunk := await relay.read():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            client.finishing()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            relay.close()
