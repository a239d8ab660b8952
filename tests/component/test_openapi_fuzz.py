"""schemathesis against the served /openapi.json: the worker's app in-process on the demo model,
and the gateway in front of it (both in this process, the gateway on a loopback port because its
data path reaches workers over HTTP).

Each operation gets a bounded number of schema-valid and schema-breaking requests. Every answer
must come within a timeout, never be a 500 or a 422, match the document's statuses, content types
and schemas, and every error must be OpenAI's `{"error": {...}}`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from modelfleet.devcluster import wait_for
from modelfleet.netutil import free_port
from modelfleet.openapi import POST_PATHS

CHAT = "tiny-chat"
TIMEOUT = 30.0  # seconds per request: a hang fails the example
# Examples per operation and mode; deterministic (derandomize), so a run is reproducible. An edit
# has no output limit (none in OpenAI's Edits API): each valid one generates for seconds.
EXAMPLES = {"POST": 10, "GET": 3, "/v1/edits": 2}
# Token budgets past 4096 stay as generated (past the 2048-token context: a quick 400); those
# inside it are cut to a few tokens, as are `n` and `best_of`, so that a run fits in its minutes.
BUDGETS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens")
OPERATIONS = [(path, "POST") for path in POST_PATHS] + [
    (path, "GET") for path in ("/v1/models", "/v1/models/{model}", "/health", "/ready", "/metrics", "/openapi.json")]


# -- checks ---------------------------------------------------------------------------------------

def openai_error_format(ctx, response, case) -> bool:
    """Every 4xx/5xx is `{"error": {"message", "type", "param", "code"}}` (docs/api.md)."""
    if response.status_code < 400:
        return True
    if case.operation.path in ("/health", "/ready"):
        return True  # a probe's 503 is its status body, documented as such
    body = response.json()
    assert set(body) == {"error"}, f"error body is not {{'error': ...}}: {body}"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, f"error fields: {sorted(err)}"
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return True


def never_422(ctx, response, case) -> bool:
    assert response.status_code != 422, f"422 instead of 400: {response.text[:300]}"
    return True


CHECKS = [not_a_server_error, openai_error_format, never_422, status_code_conformance, content_type_conformance,
          response_schema_conformance]


# -- generation ---------------------------------------------------------------------------------

def tame(case) -> None:
    """Points generated requests at the served model and keeps generation short; types and
    out-of-range values are left as generated, so they still reach validation."""
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = CHAT
    for key in BUDGETS:
        value = body.get(key)
        if type(value) is int and 8 < value <= 4096:
            body[key] = 8
    for key in ("n", "best_of"):
        value = body.get(key)
        if type(value) is int and 2 < value <= 128:
            body[key] = 2
    if case.operation.path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        if not any(key in body for key in BUDGETS[:3]):
            body["max_tokens" if case.operation.path != "/v1/responses" else "max_output_tokens"] = 8


def transport_kwargs(case, base_url: str) -> dict:
    kwargs = case.as_transport_kwargs(base_url=base_url)
    kwargs.pop("cookies", None)
    if "data" in kwargs:
        kwargs["content"] = kwargs.pop("data")
    return kwargs


def fuzz(schema, path: str, method: str, send: Callable[[dict], httpx.Response], base_url: str) -> None:
    operation = schema[path][method]
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if method == "POST" else [])
    for mode in modes:
        examples = EXAMPLES.get(path, EXAMPLES[method]) if mode is GenerationMode.POSITIVE else EXAMPLES[method]

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            tame(case)
            kwargs = transport_kwargs(case, base_url)
            started = time.monotonic()
            try:
                response = send(kwargs)
            except httpx.TimeoutException:
                pytest.fail(f"no answer within {TIMEOUT}s: {kwargs}")
            assert time.monotonic() - started < TIMEOUT
            case.validate_response(response, checks=CHECKS)

        run()


# -- the worker, in-process ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker_app(worker):
    return worker[0]


def asgi_send(app) -> Callable[[dict], httpx.Response]:
    def send(kwargs: dict) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT) as client:
                return await asyncio.wait_for(client.request(**kwargs), TIMEOUT)

        try:
            return asyncio.run(call())
        except TimeoutError as exc:
            raise httpx.ReadTimeout("in-process call timed out") from exc

    return send


@pytest.fixture(scope="module")
def worker_schema(worker_app):
    document = asgi_send(worker_app)({"method": "GET", "url": "http://worker/openapi.json"}).json()
    return schemathesis.openapi.from_dict(document)


@pytest.mark.parametrize("path, method", OPERATIONS)
def test_worker_survives_the_fuzzer(worker_app, worker_schema, path, method):
    fuzz(worker_schema, path, method, asgi_send(worker_app), "http://worker")


# -- the gateway in front of it --------------------------------------------------------------------

class ThreadServer:
    """An ASGI app under uvicorn on a loopback port, on a thread of this process."""

    def __init__(self, app, lifespan: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                lifespan=lifespan)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, what="server started", interval=0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def gateway_url(worker_app) -> Iterator[str]:
    from modelfleet.gateway.app import GatewaySettings, create_app

    with ThreadServer(worker_app, lifespan="off") as worker:
        gateway_app = create_app(GatewaySettings(backends={CHAT: [worker.url]}, hold_timeout=5.0))
        with ThreadServer(gateway_app, lifespan="on") as gateway:
            wait_for(lambda: httpx.get(gateway.url + "/ready").status_code == 200, 30, what="gateway ready",
                     interval=0.1)
            yield gateway.url


@pytest.fixture(scope="module")
def gateway_client(gateway_url) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def gateway_schema(gateway_url):
    return schemathesis.openapi.from_dict(httpx.get(gateway_url + "/openapi.json").json())


@pytest.mark.parametrize("path, method", OPERATIONS)
def test_gateway_survives_the_fuzzer(gateway_client, gateway_url, gateway_schema, path, method):
    fuzz(gateway_schema, path, method, lambda kwargs: gateway_client.request(**kwargs), gateway_url)


# -- the document itself ------------------------------------------------------------------------

def test_both_documents_list_every_path_with_its_request_and_answer_models(worker_schema, gateway_schema):
    for schema in (worker_schema, gateway_schema):
        raw = schema.raw_schema
        assert raw["openapi"].startswith("3.")
        assert {path for path, _ in OPERATIONS} <= set(raw["paths"])
        for path, post in POST_PATHS.items():
            operation = raw["paths"][path]["post"]
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert body == {"$ref": f"#/components/schemas/{post.request.__name__}"}
            if post.answer is not None:
                answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
                assert answer == {"$ref": f"#/components/schemas/{post.answer.__name__}"}
            assert "422" not in operation["responses"]


# -- what the fuzzer found, kept as plain cases ----------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),  # was a 500: the chat translation refused zero messages
    ({"input": "Hi", "parallel_tool_calls": [1]}, "parallel_tool_calls"),  # was a 500: an untyped extra
])
def test_responses_inputs_the_fuzzer_found_are_400s(api, body, param):
    api.error("/v1/responses", {"model": CHAT, "max_output_tokens": 2, **body}, param)
