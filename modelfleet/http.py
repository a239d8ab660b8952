"""HTTP plumbing shared by the worker and the gateway: request ids, OpenAI-shaped errors, and the
raw-ASGI toolkit for hot paths (RawPostPaths: 405, 413, request ids, one disconnect watch).

Every response carries `x-request-id` (the client's, echoed, or a new one), and every error,
including FastAPI's own 404/405 and validation errors, leaves in the `{"error": {...}}` shape
with the status OpenAI would use: never a 422, never a stack trace. The server's protocol
(GuardedHttpToolsProtocol) bounds what a client may take before the app sees a request.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .protocol import OpenAIError, error_body

log = logging.getLogger(__name__)
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def incoming_request_id(headers: Mapping[str, str]) -> str:
    """The client's request id (bounded in length), or a new one."""
    return headers.get("x-request-id", "")[:200] or os.urandom(16).hex()


def scope_request_id(scope: Scope) -> str:
    """incoming_request_id() straight from an ASGI scope's raw headers."""
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            return incoming_request_id({"x-request-id": value.decode("latin-1")})
    return incoming_request_id({})


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streamed bodies pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope_request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# -- raw ASGI: for the few paths where FastAPI's per-request layers cost measurable throughput --

MAX_BODY_BYTES = 64 * 1024 * 1024


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def read_body(receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    """A request's whole body; 413 in the API's format past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise OpenAIError(f"The request body is larger than {limit} bytes.", status=413, code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class DisconnectWatch:
    """Cancels the current task when the client disconnects, for as long as the `async with`
    block runs; the block then ends quietly. A cancellation from anywhere else (shutdown) still
    propagates.

    Enter it once the request body has been read: in ASGI the next message is then
    `http.disconnect`. Servers also answer that message once the response is complete, so call
    `finishing()` before sending the last body chunk.

    Hand-written because Starlette only watches for disconnects while a StreamingResponse
    sends, and the gateway must also stop waiting for a non-streamed answer (which arrives
    whole, at the end) when its client has gone: that is how the worker learns to stop.
    """

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.fired = False
        self.closed = False

    async def __aenter__(self) -> DisconnectWatch:
        self.task = asyncio.current_task()
        self.watch = asyncio.ensure_future(self.receive())
        self.watch.add_done_callback(self._on_message)
        return self

    def finishing(self) -> None:
        """The response is about to complete; a disconnect from now on changes nothing."""
        self.closed = True

    def _on_message(self, watch: asyncio.Future) -> None:
        if self.closed or watch.cancelled() or watch.exception() is not None or self.task is None:
            return
        self.fired = True
        self.task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        self.closed = True
        self.watch.cancel()
        if not self.fired or self.task is None:
            return False
        if exc_type is not asyncio.CancelledError:
            try:
                await asyncio.sleep(0)  # the block ended before our cancellation landed: take it here
            except asyncio.CancelledError:
                pass
        if self.task.uncancel() > 0:
            raise asyncio.CancelledError  # cancelled from elsewhere too
        return exc_type is asyncio.CancelledError


async def send_json(send: Send, body: dict[str, Any], rid: str, status: int = 200,
                    headers: Mapping[str, str] | None = None) -> None:
    response = JSONResponse(body, status_code=status, headers=dict(headers or {}))
    response.headers["x-request-id"] = rid
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


async def send_error(send: Send, exc: OpenAIError, rid: str) -> None:
    await send_json(send, exc.body(), rid, exc.status, exc.headers)


def method_not_allowed(scope: Scope) -> OpenAIError:
    return OpenAIError(f"Method {scope['method']} is not allowed on {scope['path']}", status=405,
                       code="method_not_allowed", headers={"allow": "POST"})


def internal_error() -> OpenAIError:
    return OpenAIError("The server had an error while processing your request.", status=500, type="server_error",
                       code="internal_error")


JsonHandler = Callable[[bytes, str], Awaitable[dict[str, Any]]]


class RawPostPaths:
    """The raw-ASGI skeleton: POST-only `paths` served ahead of `app` (which gets every other
    request), with the contract the FastAPI routes keep through RequestIdMiddleware and
    install_error_handlers. For each request on `paths` it takes the request id (the client's,
    or a new one) and holds it in `request_id_var` for the logs while `respond` runs, and
    answers any other method 405 in the API's format with `allow: POST`.

    `respond(scope, receive, send, rid)` does the rest with this module's parts: `read_body`
    (413 past its limit, ClientGone if the client left first), `send_error`/`internal_error`
    for errors in the API's format, and `DisconnectWatch` while it waits. Subclasses: the
    worker's JsonFastPath (one JSON answer per request) and the gateway's DataPath
    (gateway/datapath.py: relays a stream, counts refusals in its metrics, traces); how they
    answer differs, so their error handling stays with them.
    """

    app: ASGIApp
    paths: Collection[str]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        rid = scope_request_id(scope)
        if scope["method"] != "POST":
            await send_error(send, method_not_allowed(scope), rid)
            return
        token = request_id_var.set(rid)
        try:
            await self.respond(scope, receive, send, rid)
        finally:
            request_id_var.reset(token)

    async def respond(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        raise NotImplementedError


class JsonFastPath(RawPostPaths):
    """Serves hot POST endpoints that answer one JSON body as raw ASGI, ahead of `app`.

    Same contract as the FastAPI routes (request ids, OpenAI-shaped errors, 405 and 413), minus
    the middleware and routing layers that cost about half of a worker's HTTP CPU per request;
    measured on embeddings, where 32 clients keep the model and the HTTP loop busy together.
    `routes` maps a path to a handler of (raw body, request id) -> response body.
    """

    def __init__(self, app: ASGIApp, routes: Mapping[str, JsonHandler]) -> None:
        self.app = app
        self.routes = self.paths = dict(routes)

    async def respond(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        try:
            body = await read_body(receive)
            result = await self.routes[scope["path"]](body, rid)
        except ClientGone:
            return
        except OpenAIError as exc:
            await send_error(send, exc, rid)
            return
        except Exception:  # noqa: BLE001 - a bug answers 500 in the API's format, never a stack trace
            log.exception("unhandled error on %s", scope["path"])
            await send_error(send, internal_error(), rid)
            return
        await send_json(send, result, rid)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"Invalid request: {first.get('msg', 'bad input')}", param=param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            body = error_body(f"Unknown path: {request.method} {request.url.path}", code="unknown_url")
        elif exc.status_code == 405:
            body = error_body(f"Method {request.method} is not allowed on {request.url.path}",
                              code="method_not_allowed")
        else:
            body = error_body(str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(
            error_body("The server had an error while processing your request.", type="server_error",
                       code="internal_error"),
            status_code=500,
        )


# -- the server's protocol ----------------------------------------------------------------------

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT = 10.0
REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two bounds it lacks, for `uvicorn.Config(http=...)`.

    A request's head (request line and headers) must arrive within `head_timeout` seconds: uvicorn
    arms no timer until a first response, and its keep-alive timer restarts on every byte, so a
    client that connects and sends nothing, or a header a byte at a time, held its connection and
    file descriptor for ever. And the head must fit in `max_head_bytes` (plus at most one read):
    llhttp has no bound, and a 100 MB header was buffered and re-joined for tens of seconds.
    Past either bound the client gets 408 or 431 in the API's error format and the connection
    closes; the app never sees the request.
    """

    head_timeout = HEAD_TIMEOUT
    max_head_bytes = MAX_HEAD_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_bytes = 0
        self.head_done = False
        self.head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.head_done or self.transport.is_closing():
            return
        self.head_bytes += len(data)  # the head is still incomplete: all of this chunk was head
        if self.head_bytes > self.max_head_bytes:
            self._refuse(431, f"The request's headers are larger than {self.max_head_bytes} bytes.",
                         "request_header_fields_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_done = False
        self.head_bytes = 0
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def on_headers_complete(self) -> None:
        self.head_done = True
        self._disarm()
        super().on_headers_complete()

    def _disarm(self) -> None:
        if getattr(self, "head_timer", None) is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_too_slow(self) -> None:
        self.head_timer = None
        if not self.head_done:
            self._refuse(408, f"The request's headers did not arrive within {self.head_timeout:g} seconds.",
                         "request_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        body = json.dumps(OpenAIError(message, status=status, code=code).body()).encode()
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, REASONS[status], len(body)) + body)
        self.transport.close()
