"""The response store's pure parts: ownership, the memory backend's bounds, the Secret names
and prune plan of the Kubernetes backend (its API calls replaced), and a continued request's
expansion."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from modelfleet.gateway import kube
from modelfleet.gateway.auth import ApiKey, digest
from modelfleet.gateway.responses_store import (
    Conversations,
    KubernetesStore,
    MemoryStore,
    Stored,
    owner_of,
)
from modelfleet.protocol import OpenAIError


def record(rid: str, owner: str = "open", ttl: float = 60.0) -> Stored:
    return Stored(rid, owner, time.time() + ttl, {"id": rid, "output": [{"type": "message", "role": "assistant",
                                                                         "content": [{"type": "output_text",
                                                                                      "text": f"said {rid}"}]}]},
                  [{"type": "message", "role": "user", "content": "hi"}])


def test_owners_differ_per_key_and_fit_a_label():
    ada, bob = ApiKey("ada", digest("sk-ada")), ApiKey("bob", digest("sk-bob"))
    assert owner_of(None) == "open"
    assert owner_of(ada) != owner_of(bob)
    assert owner_of(ada) == owner_of(ApiKey("renamed", digest("sk-ada")))  # the key, not its name
    assert re.fullmatch(r"[0-9a-f]{40}", owner_of(ada)) and ada.sha256[:40] not in owner_of(ada)


def test_memory_store_evicts_the_least_recently_used_and_forgets_the_expired():
    async def check():
        store = MemoryStore(ttl=60, max_stored=2)
        await store.save(record("r1"))
        await store.save(record("r2"))
        assert await store.load("r1", "open") is not None  # r1 is now the most recently used
        await store.save(record("r3"))
        assert await store.load("r2", "open") is None
        assert {r for r in ("r1", "r3") if await store.load(r, "open")} == {"r1", "r3"}
        assert await store.load("r1", "someone-else") is None
        assert not await store.delete("r1", "someone-else") and await store.delete("r1", "open")
        await store.save(record("old", ttl=-1))
        assert await store.load("old", "open") is None
        await store.save(record("old2", ttl=-1))
        assert await store.prune() == 1 and list(store.records) == ["r3"]

    asyncio.run(check())


def test_secret_names_are_dns_names_whatever_the_response_id():
    for rid in ("resp_67ccd2bed1ec8190", "resp-" + "a" * 32, "RESP/odd id"):
        name = KubernetesStore.secret_name(rid)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert KubernetesStore.secret_name("a") != KubernetesStore.secret_name("b")


def test_kubernetes_prune_deletes_the_expired_then_the_oldest_past_the_bound(monkeypatch):
    now = int(time.time())
    items = [{"metadata": {"name": n, "labels": {"modelfleet.dev/response-expires": str(now + d)}}}
             for n, d in (("gone", -5), ("soon", 10), ("later", 20), ("last", 30))]
    deleted = []
    monkeypatch.setattr(kube, "list_secret_metadata", lambda api, ns, selector: items)
    monkeypatch.setattr(kube, "delete_secret", lambda api, ns, name: deleted.append((ns, name)) or True)
    store = KubernetesStore("gw", max_stored=2, api_client=object())
    assert asyncio.run(store.prune()) == 2
    assert deleted == [("gw", "gone"), ("gw", "soon")]


def test_kubernetes_store_failures_are_a_503_in_the_api_format(monkeypatch):
    def broken(api, ns, name):
        raise ConnectionResetError("api server gone")

    monkeypatch.setattr(kube, "read_secret", broken)
    with pytest.raises(OpenAIError) as exc:
        asyncio.run(KubernetesStore("gw", api_client=object()).load("resp-1", "open"))
    assert exc.value.status == 503 and exc.value.code == "store_unavailable"


def test_a_continued_request_is_expanded_and_made_stateless():
    async def check():
        store = MemoryStore()
        await store.save(record("r1"))
        conversations = Conversations(store)
        body = json.dumps({"model": "m", "input": "next", "previous_response_id": "r1", "instructions": "new",
                           "temperature": 0.5}).encode()
        forward, turn = await conversations.begin(body, None)
        sent = json.loads(forward)
        assert sent == {"model": "m", "instructions": "new", "temperature": 0.5, "store": False, "input": [
            {"type": "message", "role": "user", "content": "hi"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "said r1"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "next"}]}]}
        assert turn.previous == "r1" and turn.store and turn.input == sent["input"]

        plain = b'{"model":"m","input":"x","store":false}'
        assert await conversations.begin(plain, None) == (plain, None)  # nothing to keep: bytes untouched
        for bad, param in (({"store": 1}, "store"), ({"previous_response_id": 5}, "previous_response_id"),
                           ({"input": 3}, "input"), ({"previous_response_id": "nope"}, "previous_response_id")):
            with pytest.raises(OpenAIError) as exc:
                await conversations.begin(json.dumps({"model": "m", "input": "x", **bad}).encode(), None)
            assert exc.value.param == param and exc.value.status in (400, 404)

    asyncio.run(check())
