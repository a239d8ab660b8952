"""What every endpoint family of the worker's HTTP layer shares: parsing a request body into its
protocol model, the request id, SSE responses, and waiting on the engine while the client stays."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from modelfleet.http import ClientGone, DisconnectWatch, read_body
from modelfleet.protocol import parse_request

from .service import ModelService

T = TypeVar("T")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
log = logging.getLogger(__name__)


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


async def parse(service: ModelService, request: Request, model_cls: type[T]) -> T:
    """The body as `model_cls` (413 past the size limit, as the gateway), for a model this serves."""
    body = parse_request(model_cls, await read_body(request.receive))
    service.check_model(getattr(body, "model", None))
    return body


def stream_response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def until_disconnect(request: Request, work: Awaitable[T], cancel: Callable[[], None]) -> T:
    """Awaits `work` under modelfleet.http's DisconnectWatch; if the client hangs up first,
    cancels the engine request and ends the handler with ClientGone: one log line, since a
    client that leaves is not a server error."""
    async with DisconnectWatch(request.receive) as watch:
        try:
            return await work
        finally:
            if watch.fired:
                cancel()
    log.info("client disconnected before the response; request cancelled")
    raise ClientGone
