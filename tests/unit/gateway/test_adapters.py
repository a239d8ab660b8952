"""LoRA adapters in the gateway's registry: discovery turns spec.adapters into model names of
their own on the base's pool, a replica takes an adapter's request only when it holds it, and an
adapter named like an older model's name is refused with its whole ModelDeployment, as the
operator's NameConflict says."""

from __future__ import annotations

import random

from modelfleet import labels
from modelfleet.gateway.discovery import KubernetesDiscovery
from modelfleet.gateway.load import held_adapters
from modelfleet.gateway.registry import Registry


def model_deployment(name: str, served: str, adapters: tuple[str, ...] = (), created: str = "2025-01-01T00:00:00Z"):
    return {"metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
            "spec": {"model": {"source": "file:///m", "servedName": served},
                     "adapters": [{"name": a, "source": f"file:///adapters/{a}"} for a in adapters]}}


def endpoint_slice(owner: str, *ips: str) -> dict:
    return {"metadata": {"name": f"{owner}-x", "namespace": "ns", "labels": {labels.MODEL: owner}},
            "ports": [{"name": "http", "port": 8000}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def discovery(*mds: dict) -> tuple[KubernetesDiscovery, Registry]:
    registry = Registry()
    d = KubernetesDiscovery(registry)
    d.models.apply("SYNC", {"items": list(mds)})
    d.slices.apply("SYNC", {"items": [endpoint_slice("base", "10.0.0.1", "10.0.0.2"), endpoint_slice("sql", "10.0.0.9")]})
    return d, registry


def test_adapters_resolve_to_the_base_and_only_replicas_holding_them_are_candidates() -> None:
    d, registry = discovery(model_deployment("base", "chat", ("sql", "poet")))
    assert registry.resolve("sql") == registry.resolve("poet") == "chat"
    assert registry.adapter("sql") == "sql" and registry.adapter("chat") is None
    one, two = registry.for_model("chat")
    one.adapters = frozenset({"sql"})
    assert [e.url for e in registry.available("chat", "sql")] == [one.url]
    assert registry.available("chat", "poet") == []
    assert len(registry.available("chat")) == 2
    pool = registry.pool("chat")
    assert {pool.acquire("", random.Random(i), adapter="sql").endpoint.url for i in range(20)} == {one.url}
    assert pool.acquire("", random.Random(0), adapter="poet") is None
    cards = {c["id"]: c for c in registry.cards()}
    assert (cards["sql"]["parent"], cards["sql"]["ready"]) == ("chat", True)
    assert (cards["poet"]["parent"], cards["poet"]["ready"]) == ("chat", False)
    # Removed from the spec: the name goes, the base stays.
    d.models.apply("MODIFIED", model_deployment("base", "chat", ("poet",)))
    assert registry.resolve("sql") is None and registry.resolve("poet") == "chat"


def test_an_adapter_named_like_an_older_models_name_keeps_its_deployment_out() -> None:
    _, registry = discovery(model_deployment("sql", "sql"),
                            model_deployment("base", "chat", ("sql",), created="2025-01-02T00:00:00Z"))
    assert registry.resolve("sql") == "sql"
    assert registry.resolve("chat") is None  # NameConflict: the newer ModelDeployment is not routed


def test_held_adapters_reads_a_replicas_model_list() -> None:
    cards = [{"id": "chat", "parent": None}, {"id": "c", "parent": "chat"}, {"id": "sql", "parent": "chat"},
             {"id": "old", "parent": "chat"}, "junk"]
    assert held_adapters(cards, {"sql", "poet"}) == frozenset({"sql"})
