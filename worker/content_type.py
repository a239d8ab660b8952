"""Request bodies are JSON: a POST that says it is something else is a 400 in OpenAI's format.

Without this, a JSON body sent as a form (curl's `-d` default) was parsed and served, which
OpenAI refuses; clients that test against us would then fail against OpenAI. A POST without a
Content-Type is accepted (some HTTP clients send none), and `application/json` with any
parameters (`; charset=utf-8`). Pure ASGI in front of the app, so the raw embeddings path is
covered too.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from modelfleet.http import scope_request_id, send_error
from modelfleet.protocol import OpenAIError


def is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def unsupported(content_type: str) -> OpenAIError:
    return OpenAIError(f"Unsupported content type: '{content_type}'. This API method only accepts "
                       "'application/json' requests; send the header 'Content-Type: application/json'.",
                       code="unsupported_content_type")


class JsonOnly:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            value = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), None)
            if value is not None and not is_json(value):
                await send_error(send, unsupported(value), scope_request_id(scope))
                return
        await self.app(scope, receive, send)
