"""The FastChat client SDK, renamed: module-level settings and `Resource.create(...)` calls.

    from modelfleet.client import openai_api_client as client
    client.set_baseurl("http://localhost:8000")
    r = client.ChatCompletion.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}])
    r.choices[0].message.content == r["choices"][0]["message"]["content"]

Results are dicts that also allow attribute access, so they print, compare and `json.dumps` like
the plain JSON they are. Errors raise `APIError` subclasses that carry the server's OpenAI error.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

_settings: dict[str, Any] = {
    "base_url": os.environ.get("MODELFLEET_BASEURL") or os.environ.get("FASTCHAT_API_BASE_URL")
    or "http://localhost:8000",
    "api_key": os.environ.get("MODELFLEET_API_KEY"),
    "timeout": 600.0,
}


def set_baseurl(base_url: str) -> None:
    _settings["base_url"] = base_url


def set_api_key(api_key: str | None) -> None:
    _settings["api_key"] = api_key


def set_timeout(seconds: float) -> None:
    _settings["timeout"] = seconds


class OpenAIObject(dict):
    """A JSON object with attribute access; nested objects and lists are wrapped too."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    @classmethod
    def wrap(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return cls({k: cls.wrap(v) for k, v in value.items()})
        if isinstance(value, list):
            return [cls.wrap(v) for v in value]
        return value


class APIError(Exception):
    """An error answer from the server: `.status`, `.error` (the OpenAI error object) and its parts."""

    def __init__(self, status: int, error: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.error = OpenAIObject.wrap(error)
        self.message = error.get("message", "")
        self.type = error.get("type")
        self.param = error.get("param")
        self.code = error.get("code")
        self.headers = headers or {}
        super().__init__(f"{status} {self.type}: {self.message}")


class InvalidRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class RateLimitError(APIError):
    pass


class ServiceUnavailableError(APIError):
    pass


_ERRORS = {400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
           429: RateLimitError, 503: ServiceUnavailableError}


def _url(path: str) -> str:
    base = _settings["base_url"].rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + path


def _headers() -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if _settings["api_key"]:
        headers["authorization"] = f"Bearer {_settings['api_key']}"
    return headers


def _raise_for(status: int, body: bytes, headers: httpx.Headers) -> None:
    try:
        error = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        error = {"message": body.decode(errors="replace")[:500], "type": "server_error"}
    raise _ERRORS.get(status, APIError)(status, error, dict(headers))


def _events(lines: Iterator[str]) -> Iterator[OpenAIObject]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if "error" in payload and "choices" not in payload:
            raise APIError(500, payload["error"])
        yield OpenAIObject.wrap(payload)


def _request(method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
    with httpx.Client(timeout=timeout or _settings["timeout"]) as http:
        r = http.request(method, _url(path), headers=_headers(), json=body)
    if r.status_code >= 400:
        _raise_for(r.status_code, r.content, r.headers)
    return OpenAIObject.wrap(r.json())


def _stream(path: str, body: dict[str, Any], timeout: float | None = None) -> Iterator[OpenAIObject]:
    with httpx.Client(timeout=timeout or _settings["timeout"]) as http:
        with http.stream("POST", _url(path), headers=_headers(), json=body) as r:
            if r.status_code >= 400:
                _raise_for(r.status_code, r.read(), r.headers)
            yield from _events(r.iter_lines())


async def _arequest(method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
    async with httpx.AsyncClient(timeout=timeout or _settings["timeout"]) as http:
        r = await http.request(method, _url(path), headers=_headers(), json=body)
    if r.status_code >= 400:
        _raise_for(r.status_code, r.content, r.headers)
    return OpenAIObject.wrap(r.json())


async def _astream(path: str, body: dict[str, Any], timeout: float | None = None) -> AsyncIterator[OpenAIObject]:
    async with httpx.AsyncClient(timeout=timeout or _settings["timeout"]) as http:
        async with http.stream("POST", _url(path), headers=_headers(), json=body) as r:
            if r.status_code >= 400:
                _raise_for(r.status_code, await r.aread(), r.headers)
            async for line in r.aiter_lines():
                for event in _events(iter([line])):
                    yield event


class _Creatable:
    PATH = ""

    @classmethod
    def create(cls, *, timeout: float | None = None, **params: Any) -> Any:
        """The response object, or an iterator of chunks when `stream=True`."""
        if params.get("stream"):
            return _stream(cls.PATH, params, timeout)
        return _request("POST", cls.PATH, params, timeout)

    @classmethod
    async def acreate(cls, *, timeout: float | None = None, **params: Any) -> Any:
        """Async `create`; with `stream=True`, an async iterator of chunks."""
        if params.get("stream"):
            return _astream(cls.PATH, params, timeout)
        return await _arequest("POST", cls.PATH, params, timeout)


class ChatCompletion(_Creatable):
    PATH = "/v1/chat/completions"


class Completion(_Creatable):
    PATH = "/v1/completions"


class Embedding(_Creatable):
    PATH = "/v1/embeddings"


class Model:
    @classmethod
    def list(cls, timeout: float | None = None) -> OpenAIObject:
        return _request("GET", "/v1/models", timeout=timeout)

    @classmethod
    def retrieve(cls, model: str, timeout: float | None = None) -> OpenAIObject:
        return _request("GET", f"/v1/models/{model}", timeout=timeout)
