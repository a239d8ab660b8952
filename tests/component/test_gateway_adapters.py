"""LoRA adapters through the gateway in-process: Kubernetes discovery fed ModelDeployments and
EndpointSlices directly (no API server), in front of fake workers on loopback that list the
adapters they hold in /v1/models as vLLM does. An adapter is a model name of its own, listed with
its base as parent, routed only to replicas that hold it (held until one does, as for a scale
from zero), under the keys' allowlists, and gone (404) once removed from spec.adapters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
from aiohttp import web

from modelfleet import labels
from modelfleet.gateway.app import GatewaySettings, create_app
from modelfleet.gateway.auth import ApiKey, KeyStore, digest
from modelfleet.gateway.discovery import KubernetesDiscovery
from modelfleet.gateway.registry import Registry

from .test_gateway_app import Fleet, Gateway, Replica, auth, chat, key, run


class AdapterReplica(Replica):
    """A worker that holds some LoRA adapters of model `m` and answers with the model asked for."""

    def __init__(self, fleet: Fleet, adapters: Iterable[str]) -> None:
        super().__init__(fleet, "m", "ok")
        self.adapters = set(adapters)
        self.asked: list[str] = []

    async def models(self, request: web.Request) -> web.Response:
        self.fleet.changed()  # the gateway's scraper looked: a test may wait for what it learnt
        cards = [{"id": "m", "object": "model", "root": "/models/m", "parent": None}]
        cards += [{"id": a, "object": "model", "root": f"/adapters/{a}", "parent": "m"} for a in sorted(self.adapters)]
        return web.json_response({"object": "list", "data": cards})

    async def post(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.asked.append(body["model"])
        self.fleet.changed()
        if body["model"] not in {"m", *self.adapters}:  # what vLLM says for a model it does not serve
            return web.json_response({"error": {"message": f"The model `{body['model']}` does not exist.",
                                                "code": 404}}, status=404)
        return web.json_response({"id": "c", "object": "chat.completion", "created": 1, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": body["model"]}}]})


class Discovery(KubernetesDiscovery):
    """Kubernetes discovery without the API server: the test applies the watch events."""

    async def start(self) -> None:
        self.synced = True

    def ready(self) -> bool:
        return True


def model_deployment(adapters: Iterable[str], hold: int = 10) -> dict[str, Any]:
    return {"metadata": {"name": "m", "namespace": "ns", "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"model": {"source": "file:///models/m", "servedName": "m"},
                     "adapters": [{"name": a, "source": f"file:///adapters/{a}"} for a in adapters],
                     "routing": {"holdTimeoutSeconds": hold}}}


def endpoint_slice(replica: Replica, i: int) -> dict[str, Any]:
    return {"metadata": {"name": f"m-{i}", "namespace": "ns", "labels": {labels.MODEL: "m"}},
            "ports": [{"name": "http", "port": replica.server.port}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]}


@asynccontextmanager
async def gateway(fleet: Fleet, md: dict[str, Any], keys: Iterable[ApiKey] = ()) -> AsyncIterator[Gateway]:
    async with AsyncExitStack() as stack:
        for replica in fleet.replicas:
            await replica.server.start_server(shutdown_timeout=1.0)
            stack.push_async_callback(replica.server.close)
        registry = Registry()
        discovery = Discovery(registry)
        discovery.models.apply("SYNC", {"items": [md]})
        discovery.slices.apply("SYNC", {"items": [endpoint_slice(r, i) for i, r in enumerate(fleet.replicas)]})
        store = KeyStore()
        store.replace("test", list(keys))
        app = create_app(GatewaySettings(discovery="kubernetes"), registry=registry, keys=store, discovery=discovery)
        await stack.enter_async_context(app.app.router.lifespan_context(app.app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=10))
        yield Gateway(app, client, fleet)


def holders(registry: Registry, adapter: str) -> set[int]:
    return {int(e.url.rsplit(":", 1)[1]) for e in registry.for_model("m") if adapter in e.adapters}


def test_an_adapter_is_listed_with_its_base_as_parent_and_routed_only_to_replicas_that_hold_it():
    async def test():
        fleet = Fleet()
        holder, other = AdapterReplica(fleet, ["sql"]), AdapterReplica(fleet, [])
        fleet.replicas = [holder, other]
        async with gateway(fleet, model_deployment(["sql"])) as gw:
            registry = gw.app.registry
            await fleet.until(lambda: holders(registry, "sql") == {holder.server.port}, "the scraper to learn",
                              timeout=5)
            cards = {c["id"]: c for c in (await gw.client.get("/v1/models")).json()["data"]}
            assert cards["sql"]["parent"] == "m" and cards["sql"]["ready"] is True
            assert cards["m"]["parent"] is None
            for _ in range(12):
                r = await gw.client.post("/v1/chat/completions", json=chat("sql"))
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == "sql"
                assert r.headers["x-modelfleet-backend"] == holder.url
            assert "sql" not in other.asked
            # The base still spreads over both replicas. One request at a time finds both idle,
            # and least-load then picks at random: 12 requests all went to one about one run
            # in 2,000, so send until both have had one (40 misses: once in 5e11).
            for _ in range(40):
                assert (await gw.client.post("/v1/chat/completions", json=chat("m"))).status_code == 200
                if "m" in holder.asked and "m" in other.asked:
                    break
            assert "m" in holder.asked and "m" in other.asked

    run(test)


def test_an_adapter_no_replica_holds_yet_is_held_until_one_does_and_then_times_out_honestly():
    async def test():
        fleet = Fleet()
        replica = AdapterReplica(fleet, [])
        fleet.replicas = [replica]
        async with gateway(fleet, model_deployment(["poet"])) as gw:
            registry = gw.app.registry
            asking = asyncio.ensure_future(gw.client.post("/v1/chat/completions", json=chat("poet")))
            await fleet.until(lambda: registry.waiting.get("m") == 1, "the request to be held")
            assert replica.asked == []  # never sent to a replica without the adapter
            replica.adapters.add("poet")  # the operator loads it
            r = await asyncio.wait_for(asking, 5)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "poet"
        # With no hold budget the answer is a 503 that says what is missing.
        fleet = Fleet()
        fleet.replicas = [AdapterReplica(fleet, [])]
        async with gateway(fleet, model_deployment(["poet"], hold=0)) as gw:
            r = await gw.client.post("/v1/chat/completions", json=chat("poet"))
            assert r.status_code == 503 and r.headers["retry-after"]
            assert "holds adapter `poet`" in r.json()["error"]["message"]

    run(test)


def test_allowlists_apply_to_adapter_names_and_a_removed_adapter_is_not_found():
    async def test():
        fleet = Fleet()
        fleet.replicas = [AdapterReplica(fleet, ["sql", "poet"])]
        only_sql = ApiKey(name="sql-team", sha256=digest(key("sql-team")), models=frozenset({"sql"}))
        async with gateway(fleet, model_deployment(["sql", "poet"]), keys=[only_sql]) as gw:
            registry = gw.app.registry
            await fleet.until(lambda: holders(registry, "poet"), "the scraper to learn", timeout=5)
            listed = [c["id"] for c in (await gw.client.get("/v1/models", headers=auth("sql-team"))).json()["data"]]
            assert listed == ["sql"]
            r = await gw.client.post("/v1/chat/completions", json=chat("sql"), headers=auth("sql-team"))
            assert r.status_code == 200
            for model in ("m", "poet"):
                r = await gw.client.post("/v1/chat/completions", json=chat(model), headers=auth("sql-team"))
                assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
            # spec.adapters loses poet: its name is gone at once, whatever the replica still holds.
            gw.app.discovery.models.apply("MODIFIED", model_deployment(["sql"]))
            every_model = ApiKey(name="all", sha256=digest(key("all")))
            gw.app.keys.replace("test", [only_sql, every_model])
            r = await gw.client.post("/v1/chat/completions", json=chat("poet"), headers=auth("all"))
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            assert "poet" not in [c["id"] for c in (await gw.client.get("/v1/models", headers=auth("all"))).json()["data"]]

    run(test)
