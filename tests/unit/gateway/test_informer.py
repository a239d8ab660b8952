"""The gateway's keyed store and its informer (gateway/informer.py), driven through the official
client's `watch.Watch` by a fake API function that answers lists and watches as the API server
does: a listing, then watch streams of ADDED/MODIFIED/DELETED/BOOKMARK, an expired watch (410
ERROR event) that must lead to a fresh listing, and an API server that goes away mid-watch.
Consumers of the store (key Secrets, gateway peers, discovery) are checked on the same events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from modelfleet import labels
from modelfleet.gateway.auth import KeyStore
from modelfleet.gateway.cluster_sources import GatewayPeers, SecretKeys
from modelfleet.gateway.discovery import KubernetesDiscovery
from modelfleet.gateway.informer import Informer, Store
from modelfleet.gateway.registry import Registry


def obj(name: str, version: str, **fields) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": version}, **fields}


def event(kind: str, o: dict) -> dict:
    return {"type": kind, "object": o}


def bookmark(version: str) -> dict:
    return {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": version}}}


EXPIRED = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                       "reason": "Expired", "message": "too old resource version: 20 (25)"}}


class Listing:
    def __init__(self, items: list[dict], version: str) -> None:
        self.data = json.dumps({"metadata": {"resourceVersion": version}, "items": items}).encode()


class WatchResponse:
    """What `_preload_content=False` returns: a urllib3 response streamed in chunks."""

    status = 200

    def __init__(self, events: list[dict]) -> None:
        self.body = "".join(json.dumps(e) + "\n" for e in events).encode()

    def stream(self, amt=None, decode_content=False):
        yield from (self.body[i:i + 7] for i in range(0, len(self.body), 7))  # lines split across chunks

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class FakeApi:
    """A list function (list_namespaced_secret and the like): a scripted answer per call; each
    answer is a Listing, a list of watch events, or an exception to raise."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str | None]] = []
        self.informer: Informer | None = None

    def __call__(self, **kwargs):
        kind = "watch" if kwargs.get("watch") else "list"
        self.calls.append((kind, kwargs.get("resource_version")))
        answer = self.answers.pop(0)
        if not self.answers:
            self.informer.stop()  # the script is over: the informer stops after this answer
        if isinstance(answer, Exception):
            raise answer
        if kind == "list":
            assert isinstance(answer, Listing), (kind, answer)
            return answer
        assert isinstance(answer, list), (kind, answer)
        return WatchResponse(answer)


def run(api: FakeApi, store: Store) -> None:
    """Runs an informer over `api` until its script ends; every change has reached the store."""

    async def main() -> None:
        informer = Informer("test", store, api, asyncio.get_running_loop(), namespace="ns")
        api.informer = informer
        informer.start()
        await asyncio.to_thread(informer.thread.join, 10)
        assert not informer.thread.is_alive() and informer.synced.is_set()

    asyncio.run(main())


def recorder(store_ref: list[Store]) -> tuple[list[tuple[set, list[str]]], Callable[[set], None]]:
    seen: list[tuple[set, list[str]]] = []

    def on_change(keys: set) -> None:
        seen.append((keys, sorted(name for _, name in store_ref[0].objects)))

    return seen, on_change


def test_list_watch_bookmark_and_an_expired_watch_lists_again(caplog) -> None:
    api = FakeApi(
        Listing([obj("a", "1"), obj("c", "2")], "10"),
        [event("ADDED", obj("b", "11")), event("MODIFIED", obj("a", "12", data={"x": "1"})),
         event("DELETED", obj("c", "13")), bookmark("20")],
        [EXPIRED],
        Listing([obj("a", "12", data={"x": "1"}), obj("d", "25")], "30"),
    )
    ref: list[Store] = []
    seen, on_change = recorder(ref)
    store = Store(on_change)
    ref.append(store)
    caplog.set_level(logging.INFO, logger="modelfleet.gateway.informer")
    run(api, store)
    # The second watch resumes from the bookmark; the 410 leads to a fresh listing at once.
    assert api.calls == [("list", None), ("watch", "10"), ("watch", "20"), ("list", None)]
    assert seen == [
        ({("ns", "a"), ("ns", "c")}, ["a", "c"]),
        ({("ns", "b")}, ["a", "b", "c"]),
        ({("ns", "a")}, ["a", "b", "c"]),
        ({("ns", "c")}, ["a", "b"]),
        ({("ns", "a"), ("ns", "b"), ("ns", "d")}, ["a", "d"]),  # b went while the watch was lost
    ]
    assert store.objects[("ns", "a")]["data"] == {"x": "1"}
    # An expired watch is routine: no warning, no backoff.
    assert [r.getMessage() for r in caplog.records] == ["test watch expired; listing again"]


def test_a_watch_that_ends_resumes_from_the_last_object_seen() -> None:
    api = FakeApi(Listing([], "5"), [event("ADDED", obj("a", "6"))], [event("MODIFIED", obj("a", "7"))])
    store = Store()
    run(api, store)
    assert api.calls == [("list", None), ("watch", "5"), ("watch", "6")]
    assert store.objects[("ns", "a")]["metadata"]["resourceVersion"] == "7"


def test_an_api_server_restart_mid_watch_lists_again() -> None:
    api = FakeApi(Listing([obj("a", "1")], "10"), [event("ADDED", obj("b", "11"))],
                  ConnectionResetError("connection reset by peer"), Listing([obj("b", "11")], "40"))
    store = Store()
    run(api, store)
    assert api.calls == [("list", None), ("watch", "10"), ("watch", "11"), ("list", None)]
    assert list(store.objects) == [("ns", "b")]


def test_an_error_event_other_than_410_backs_off_and_lists_again() -> None:
    failure = {"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError", "message": "etcd"}}
    api = FakeApi(Listing([], "10"), [failure], Listing([obj("a", "3")], "11"))
    store = Store()
    run(api, store)
    assert api.calls == [("list", None), ("watch", "10"), ("list", None)]
    assert list(store.objects) == [("ns", "a")]


def key_secret(name: str, key: str) -> dict:
    return {"metadata": {"name": name, "namespace": "keys", "labels": {labels.API_KEY: "true"}},
            "stringData": {"key": key}}


def test_key_secrets_follow_the_store() -> None:
    keys = KeyStore()
    source = SecretKeys(keys, "keys")
    source.secrets.apply("SYNC", {"items": [key_secret("alice", "sk-alice"), key_secret("bob", "sk-bob")]})
    assert keys.lookup("sk-alice").name == "alice" and keys.lookup("sk-bob").name == "bob"
    source.secrets.apply("DELETED", key_secret("alice", "sk-alice"))
    source.secrets.apply("MODIFIED", key_secret("bob", "sk-bob-2"))
    assert keys.lookup("sk-alice") is None and keys.lookup("sk-bob") is None
    assert keys.lookup("sk-bob-2").name == "bob"


def peer_slice(name: str, *ips: str) -> dict:
    return {"metadata": {"name": name, "namespace": "gw"}, "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def test_gateway_peers_count_ready_endpoints_across_slices() -> None:
    peers = GatewayPeers("gw", "gateway")
    assert peers.count() == 1  # this replica, before anything is known
    peers.slices.apply("SYNC", {"items": [peer_slice("gateway-a", "10.0.0.1", "10.0.0.2"),
                                          peer_slice("gateway-b", "10.0.0.3")]})
    assert peers.count() == 3
    peers.slices.apply("MODIFIED", peer_slice("gateway-a", "10.0.0.1"))
    peers.slices.apply("DELETED", peer_slice("gateway-b"))
    assert peers.count() == 1
    peers.slices.apply("SYNC", {"items": [peer_slice("gateway-c", "10.0.0.4", "10.0.0.5")]})
    assert peers.count() == 2


def test_a_relisting_without_a_model_or_slice_drops_it() -> None:
    registry = Registry()
    d = KubernetesDiscovery(registry)
    md = {"metadata": {"name": "tiny", "namespace": "ns", "creationTimestamp": "2025-01-01T00:00:00Z"},
          "spec": {"model": {"source": "file:///m", "servedName": "tiny"}}}
    endpoint_slice = {"metadata": {"name": "tiny-x", "namespace": "ns", "labels": {labels.MODEL: "tiny"}},
                      "ports": [{"name": "http", "port": 8000}],
                      "endpoints": [{"addresses": ["10.0.0.9"], "conditions": {"ready": True}}]}
    d.models.apply("SYNC", {"items": [md]})
    d.slices.apply("SYNC", {"items": [endpoint_slice]})
    assert [e.url for e in registry.for_model("tiny")] == ["http://10.0.0.9:8000"]
    d.slices.apply("SYNC", {"items": []})
    assert registry.for_model("tiny") == [] and "tiny" in registry.models()  # listed, no replica
    d.models.apply("SYNC", {"items": []})
    assert "tiny" not in registry.models()
