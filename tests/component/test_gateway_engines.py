"""The gateway in-process (httpx.ASGITransport) in front of a fake vLLM server on loopback: what
a client sees of a vLLM-served model is what it sees of modelfleet's own worker.

The fake answers as vLLM 0.32's OpenAI server does where it differs from modelfleet's worker:
no /ready (404), /health 200 with an empty body, model cards that name the server's model path,
errors typed "BadRequestError" with an integer code, 404 for a path its runner does not serve,
and a stream's usage only when asked for.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from aiohttp import web

from modelfleet.gateway.app import GatewaySettings, create_app
from modelfleet.gateway.auth import ApiKey, KeyStore, digest
from modelfleet.netutil import free_port

KEY = "sk-metered-0123456789"


class FakeVllm:
    def __init__(self) -> None:
        self.posts: list[dict] = []
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.app = app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text='vllm:num_requests_running{model_name="m"} 0\n')

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "m", "object": "model", "created": 7, "owned_by": "vllm", "root": "/srv/models/secret",
             "parent": None, "max_model_len": 2048}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.posts.append(body)
        if body.get("max_tokens") == 999:  # vLLM's own refusal, in vLLM's words
            return web.json_response({"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                                                "param": "max_tokens", "code": 400}}, status=400)
        if body["model"] == "embedder":
            return web.json_response({"detail": "Not Found"}, status=404)
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "chat.completion", "choices": [],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            chunk = {"id": "x", "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "x", "object": "chat.completion.chunk", "choices": [],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
            await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def with_gateway(test) -> None:
    fake = FakeVllm()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    ports = [free_port(), free_port()]  # one server per model, as serve runs them
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    keys = KeyStore()
    keys.replace("test", [ApiKey("metered", digest(KEY), tpm=100000), ApiKey("open", digest("sk-open-0123456789"))])
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    gateway = create_app(GatewaySettings(backends={"m": [urls[0]], "embedder": [urls[1]]}), keys=keys)
    fastapi_app = gateway.app
    try:
        async with fastapi_app.router.lifespan_context(fastapi_app):
            transport = httpx.ASGITransport(app=gateway)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway",
                                         headers={"authorization": "Bearer sk-open-0123456789"}) as client:
                for _ in range(100):  # discovery probes at start-up; wait for the fake to count as ready
                    if {"m", "embedder"} <= set((await client.get("/ready")).json().get("models", [])):
                        break
                    await asyncio.sleep(0.05)
                await test(client, fake, gateway)
    finally:
        await runner.cleanup()


def run(test) -> None:
    asyncio.run(with_gateway(test))


def chat(**kw) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


def test_a_backend_without_ready_is_taken_for_vllm_and_listed_in_the_gateways_shape():
    async def test(client, fake, gateway):
        assert gateway.registry.engine("m") == "vllm"
        card = (await client.get("/v1/models/m")).json()
        assert card["owned_by"] == "modelfleet" and card["root"] == "m" and "/srv" not in json.dumps(card)

    run(test)


def test_mistakes_get_modelfleets_400_before_vllm_sees_them_and_vllms_own_errors_are_reworded():
    async def test(client, fake, gateway):
        bad = await client.post("/v1/chat/completions", json=chat(temperature=7))
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
        assert fake.posts == []  # never reached the engine
        refused = await client.post("/v1/chat/completions", json=chat(max_tokens=999))
        assert refused.status_code == 400
        assert refused.json() == {"error": {"message": "max_tokens is too large", "type": "invalid_request_error",
                                            "param": "max_tokens", "code": None}}
        wrong_runner = await client.post("/v1/chat/completions", json={**chat(), "model": "embedder"})
        assert wrong_runner.status_code == 400 and wrong_runner.json()["error"]["code"] == "model_not_supported"
        edits = await client.post("/v1/edits", json={"model": "m", "input": "a", "instruction": "b"})
        assert edits.status_code == 400 and edits.json()["error"]["code"] == "unsupported_endpoint"
        extras = await client.post("/v1/chat/completions", json=chat(guided_choice=["a", "b"], top_k=3))
        assert extras.status_code == 200 and fake.posts[-1]["guided_choice"] == ["a", "b"]  # passed as sent

    run(test)


def test_a_metered_keys_stream_is_charged_exactly_and_reaches_the_client_as_it_asked():
    async def test(client, fake, gateway):
        async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True),
                                 headers={"authorization": f"Bearer {KEY}"}) as r:
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert fake.posts[-1]["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
        assert events[-1] == "[DONE]" and all(json.loads(e)["choices"] for e in events[:-1])
        window = gateway.limiter.tokens["metered"]
        assert window.total == 8  # the usage vLLM reported, not an estimate
        async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            await r.aread()
        assert "stream_options" not in fake.posts[-1]  # a key without a token limit: sent as it came

    run(test)
