"""Stored Responses through the gateway in-process (httpx.ASGITransport), in front of a fake
worker on loopback that records what it was sent: the gateway keeps the conversation, and the
worker gets each turn whole, stateless (`store` false, no `previous_response_id`).

The worker's own side (a direct `previous_response_id` is refused, `store` is ignored) runs on
the real worker app with the tiny model.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from aiohttp import web

from modelfleet.gateway import responses_store
from modelfleet.gateway.app import GatewaySettings, create_app
from modelfleet.gateway.auth import ApiKey, KeyStore, digest
from modelfleet.netutil import free_port

ADA, BOB = "sk-ada-0123456789", "sk-bob-0123456789"


class FakeWorker:
    """Answers /v1/responses as modelfleet's worker does (ready, the Responses shape, typed
    events), saying how many input items it got, and keeps every body it was sent."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        app = web.Application()
        app.router.add_get("/ready", self.answer({"status": "ready", "models": ["m"]}))
        app.router.add_get("/health", self.answer({"status": "ok"}))
        app.router.add_get("/metrics", self.answer({}))
        app.router.add_get("/v1/models", self.answer(
            {"object": "list", "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "modelfleet"}]}))
        app.router.add_post("/v1/responses", self.responses)
        self.app = app

    @staticmethod
    def answer(body: dict):
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(body)
        return handler

    def response(self, body: dict, status: str) -> dict:
        n = len(self.posts) - 1
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        text = f"reply {n} to {len(items)} items"
        output = [] if status == "in_progress" else [
            {"type": "message", "id": f"msg-{n}", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
        return {"id": f"resp-{n}", "object": "response", "created_at": 1, "status": status, "model": "m",
                "output": output, "error": None, "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.posts.append(body)
        if not body.get("stream"):
            return web.json_response(self.response(body, "completed"))
        stream = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await stream.prepare(request)
        events = [("response.created", {"response": self.response(body, "in_progress")}),
                  ("response.output_text.delta", {"delta": 'a "response":{ look-alike'}),
                  ("response.completed", {"response": self.response(body, "completed")})]
        raw = b"".join(f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': i, **data})}\n\n".encode()
                       for i, (kind, data) in enumerate(events))
        for start in range(0, len(raw), 37):  # events cut across writes, as a network may
            await stream.write(raw[start:start + 37])
        await stream.write_eof()
        return stream


async def with_gateway(test, **settings) -> None:
    fake = FakeWorker()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    keys = KeyStore()
    keys.replace("test", [ApiKey("ada", digest(ADA)), ApiKey("bob", digest(BOB))])
    gateway = create_app(GatewaySettings(backends={"m": [f"http://127.0.0.1:{port}"]}, **settings), keys=keys)
    try:
        async with gateway.app.router.lifespan_context(gateway.app):
            transport = httpx.ASGITransport(app=gateway)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway",
                                         headers={"authorization": f"Bearer {ADA}"}) as client:
                for _ in range(100):
                    if "m" in (await client.get("/ready")).json().get("models", []):
                        break
                    await asyncio.sleep(0.05)
                await test(client, fake)
    finally:
        await runner.cleanup()


def run(test, **settings) -> None:
    asyncio.run(with_gateway(test, **settings))


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def not_found(r: httpx.Response, rid: str, param: str | None = None) -> None:
    assert r.status_code == 404, r.text
    assert r.json()["error"] == {"message": f"Response with id '{rid}' not found.", "type": "invalid_request_error",
                                 "param": param, "code": "response_not_found"}


def test_a_continued_response_reaches_the_worker_as_the_whole_conversation():
    async def test(client, fake):
        first = await client.post("/v1/responses", json={"model": "m", "input": "My name is Ada.",
                                                         "instructions": "Answer in French."})
        assert first.status_code == 200, first.text
        one = first.json()
        assert one["store"] is True and one["previous_response_id"] is None  # OpenAI's default: stored
        assert fake.posts[0]["store"] is False and fake.posts[0]["input"] == "My name is Ada."

        second = await client.post("/v1/responses", json={
            "model": "m", "previous_response_id": one["id"], "instructions": "Be brief.",
            "input": [{"role": "user", "content": "What is my name?"}]})
        assert second.status_code == 200, second.text
        two = second.json()
        assert two["previous_response_id"] == one["id"] and two["output"][0]["content"][0]["text"] == \
            "reply 1 to 3 items"
        sent = fake.posts[1]
        assert "previous_response_id" not in sent and sent["store"] is False
        assert sent["instructions"] == "Be brief."  # this turn's, never the stored one's
        assert sent["input"] == [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "My name is Ada."}]},
            one["output"][0],
            {"role": "user", "content": "What is my name?"},
        ]

        third = await client.post("/v1/responses", json={"model": "m", "previous_response_id": two["id"],
                                                         "input": "And again?"})
        assert third.json()["output"][0]["content"][0]["text"] == "reply 2 to 5 items"

    run(test)


def test_a_streamed_response_is_stored_before_its_completed_event_is_relayed():
    async def test(client, fake):
        r = await client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r.text)
        assert [e["type"] for e in got] == ["response.created", "response.output_text.delta", "response.completed"]
        assert got[1]["delta"] == 'a "response":{ look-alike'  # generated text passes untouched
        final = got[-1]["response"]
        assert final["store"] is True and got[0]["response"]["store"] is True
        stored = await client.get(f"/v1/responses/{final['id']}")
        assert stored.status_code == 200 and stored.json() == final

        more = await client.post("/v1/responses", json={"model": "m", "input": "more", "stream": True,
                                                        "previous_response_id": final["id"]})
        assert events(more.text)[-1]["response"]["previous_response_id"] == final["id"]
        assert len(fake.posts[1]["input"]) == 3

    run(test)


def test_get_delete_and_input_items():
    async def test(client, fake):
        one = (await client.post("/v1/responses", json={"model": "m", "input": "first"})).json()
        two = (await client.post("/v1/responses", json={"model": "m", "input": "second",
                                                        "previous_response_id": one["id"]})).json()
        got = await client.get(f"/v1/responses/{two['id']}")
        assert got.status_code == 200 and got.json() == two

        items = (await client.get(f"/v1/responses/{two['id']}/input_items")).json()
        assert items["object"] == "list" and items["has_more"] is False
        texts = [i["content"][0]["text"] for i in items["data"]]
        assert texts == ["second", "reply 0 to 1 items", "first"]  # newest first, as OpenAI lists them
        page = (await client.get(f"/v1/responses/{two['id']}/input_items",
                                 params={"order": "asc", "limit": 1, "after": items["data"][2]["id"]})).json()
        assert [i["content"][0]["text"] for i in page["data"]] == ["reply 0 to 1 items"] and page["has_more"]

        deleted = await client.delete(f"/v1/responses/{one['id']}")
        assert deleted.status_code == 200
        assert deleted.json() == {"id": one["id"], "object": "response", "deleted": True}
        not_found(await client.get(f"/v1/responses/{one['id']}"), one["id"])
        not_found(await client.delete(f"/v1/responses/{one['id']}"), one["id"])
        posts = len(fake.posts)
        continued = await client.post("/v1/responses", json={"model": "m", "input": "x",
                                                             "previous_response_id": one["id"]})
        not_found(continued, one["id"], "previous_response_id")
        assert len(fake.posts) == posts  # refused before any worker saw it
        assert (await client.get(f"/v1/responses/{two['id']}")).status_code == 200  # the later turn stays

    run(test)


def test_a_stored_response_is_visible_only_to_the_key_that_made_it():
    async def test(client, fake):
        mine = (await client.post("/v1/responses", json={"model": "m", "input": "secret"})).json()
        bob = {"authorization": f"Bearer {BOB}"}
        not_found(await client.get(f"/v1/responses/{mine['id']}", headers=bob), mine["id"])
        not_found(await client.get(f"/v1/responses/{mine['id']}/input_items", headers=bob), mine["id"])
        not_found(await client.delete(f"/v1/responses/{mine['id']}", headers=bob), mine["id"])
        not_found(await client.post("/v1/responses", headers=bob, json={
            "model": "m", "input": "x", "previous_response_id": mine["id"]}), mine["id"], "previous_response_id")
        assert (await client.get(f"/v1/responses/{mine['id']}", headers={"authorization": ""})).status_code == 401
        assert (await client.get(f"/v1/responses/{mine['id']}")).status_code == 200  # still there for its owner

    run(test)


def test_store_false_keeps_nothing_and_forwards_the_request_as_sent():
    async def test(client, fake):
        r = (await client.post("/v1/responses", json={"model": "m", "input": "hi", "store": False})).json()
        not_found(await client.get(f"/v1/responses/{r['id']}"), r["id"])
        assert fake.posts[0] == {"model": "m", "input": "hi", "store": False}
        bad = await client.post("/v1/responses", json={"model": "m", "input": "hi", "store": "yes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "store"

    run(test)


def test_a_stored_response_expires():
    async def test(client, fake):
        r = (await client.post("/v1/responses", json={"model": "m", "input": "hi"})).json()
        assert (await client.get(f"/v1/responses/{r['id']}")).status_code == 200
        for _ in range(100):  # the TTL is half a second
            if (await client.get(f"/v1/responses/{r['id']}")).status_code == 404:
                break
            await asyncio.sleep(0.05)
        not_found(await client.get(f"/v1/responses/{r['id']}"), r["id"])
        not_found(await client.post("/v1/responses", json={"model": "m", "input": "x",
                                                          "previous_response_id": r["id"]}),
                  r["id"], "previous_response_id")

    run(test, responses_ttl=0.5)


def test_a_conversation_past_what_a_secret_holds_is_refused_before_generation(monkeypatch):
    monkeypatch.setattr(responses_store, "MAX_RECORD_BYTES", 400)

    async def test(client, fake):
        one = (await client.post("/v1/responses", json={"model": "m", "input": "short"})).json()
        big = " ".join(f"word{i}" for i in range(400))
        r = await client.post("/v1/responses", json={"model": "m", "input": big, "previous_response_id": one["id"]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "conversation_too_large" and err["param"] == "previous_response_id"
        assert "store: false" in err["message"] and len(fake.posts) == 1
        unstored = await client.post("/v1/responses", json={"model": "m", "input": big, "store": False,
                                                            "previous_response_id": one["id"]})
        assert unstored.status_code == 200 and unstored.json()["store"] is False  # nothing to keep: allowed

    run(test)


def test_with_storing_off_previous_response_id_is_a_clear_400():
    async def test(client, fake):
        r = await client.post("/v1/responses", json={"model": "m", "input": "hi", "previous_response_id": "resp-1"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
        ok = await client.post("/v1/responses", json={"model": "m", "input": "hi"})
        assert ok.status_code == 200 and fake.posts[0]["store"] is False
        not_found(await client.get(f"/v1/responses/{ok.json()['id']}"), ok.json()["id"])

    run(test, responses_ttl=0)


@pytest.mark.parametrize("store", [True, None])
def test_the_worker_refuses_previous_response_id_and_ignores_store(api, store):
    body = {"model": "tiny-chat", "input": "hi", "max_output_tokens": 2}
    err = api.error("/v1/responses", {**body, "previous_response_id": "resp-1"}, param="previous_response_id")
    assert "gateway" in err["message"]
    assert api.ok("/v1/responses", {**body, "store": store})["status"] in ("completed", "incomplete")


def test_an_answer_that_would_not_fit_is_an_error_and_a_stream_ends_with_an_error_event(monkeypatch):
    monkeypatch.setattr(responses_store, "MAX_RECORD_BYTES", 150)  # the input fits, input + answer not

    async def test(client, fake):
        r = await client.post("/v1/responses", json={"model": "m", "input": "hi"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "conversation_too_large"
        streamed = await client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
        got = events(streamed.text)
        assert [e["type"] for e in got] == ["response.created", "response.output_text.delta", "error"]
        assert got[-1]["code"] == "conversation_too_large" and len(fake.posts) == 2
        for rid in ("resp-0", "resp-1"):
            not_found(await client.get(f"/v1/responses/{rid}"), rid)

    run(test)
