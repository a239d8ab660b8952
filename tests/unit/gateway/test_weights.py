"""Weighted traffic between versions of one model: the choice of ModelDeployment by weight
(pure, checked for its distribution with a seeded RNG), then the usual balancing within it,
and Kubernetes discovery grouping the ModelDeployments that share a name."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from modelfleet import labels
from modelfleet.gateway.balancer import STRATEGIES, RequestView, RouteSettings, choose_deployment
from modelfleet.gateway.discovery import KubernetesDiscovery
from modelfleet.gateway.registry import Endpoint, Registry

N = 20_000


def shares(weights: dict[str, int], seed: int = 7) -> dict[str, float]:
    rng = random.Random(seed)
    counts = Counter(choose_deployment(weights, rng.random()) for _ in range(N))
    return {name: counts[name] / N for name in weights}


@pytest.mark.parametrize("weights", [{"stable": 95, "canary": 5}, {"stable": 50, "canary": 50},
                                     {"a": 20, "b": 80}, {"a": 1, "b": 2, "c": 7}])
def test_each_deployment_gets_its_share(weights: dict[str, int]) -> None:
    total = sum(weights.values())
    for name, share in shares(weights).items():
        assert share == pytest.approx(weights[name] / total, abs=0.015)


def test_weight_zero_takes_nothing_unless_all_are_zero() -> None:
    assert shares({"stable": 0, "canary": 100}) == {"stable": 0.0, "canary": 1.0}
    assert shares({"a": 0, "b": 0})["a"] == pytest.approx(0.5, abs=0.015)


def test_the_edges_of_the_unit_interval_stay_in_range() -> None:
    assert choose_deployment({"a": 1, "b": 1}, 0.0) == "a"
    assert choose_deployment({"a": 1, "b": 1, "z": 0}, 0.999999999) == "b"


def endpoint(url: str, deployment: str, weight: int | None, load: int = 0) -> Endpoint:
    return Endpoint(url=url, model="chat", ready=True, inflight=load, deployment=deployment, weight=weight)


def test_strategies_pick_a_deployment_by_weight_then_a_replica_within_it() -> None:
    candidates = [endpoint("http://s1", "ns/stable", 80), endpoint("http://s2", "ns/stable", 80, load=5),
                  endpoint("http://c1", "ns/canary", 20)]
    rng = random.Random(3)
    picked = Counter(STRATEGIES["least-load"](candidates, RequestView(), rng).url for _ in range(N))
    assert (picked["http://s1"] + picked["http://s2"]) / N == pytest.approx(0.8, abs=0.015)
    assert picked["http://s1"] > 3 * picked["http://s2"]  # least load within the stable version


def test_a_version_without_an_available_replica_gives_its_share_away() -> None:
    candidates = [endpoint("http://s1", "ns/stable", 5)]
    assert {STRATEGIES["least-load"](candidates, RequestView(), random.Random(i)).url for i in range(50)} == {
        "http://s1"}


def test_prefix_affinity_keeps_a_conversation_on_one_version() -> None:
    candidates = [endpoint(f"http://s{i}", "ns/stable", 50) for i in range(3)] + [
        endpoint(f"http://c{i}", "ns/canary", 50) for i in range(3)]
    pick = STRATEGIES["prefix-affinity"]
    view = RequestView(prefix="system: you are helpful\nuser: hi")
    assert len({pick(candidates, view, random.Random(i)).url for i in range(30)}) == 1
    versions = Counter(pick(candidates, RequestView(prefix=f"conversation {i}"), random.Random(0)).url[7]
                       for i in range(2000))
    assert versions["s"] / 2000 == pytest.approx(0.5, abs=0.05)


def model_deployment(name: str, created: str, served: str = "chat", weight: int | None = None,
                     aliases: tuple[str, ...] = ()) -> dict:
    routing = {} if weight is None else {"weight": weight}
    return {"metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
            "spec": {"model": {"source": "file:///m", "servedName": served, "aliases": list(aliases)},
                     "routing": routing}}


def endpoint_slice(owner: str, ip: str) -> dict:
    return {"metadata": {"name": f"{owner}-x", "namespace": "ns", "labels": {labels.MODEL: owner}},
            "ports": [{"name": "http", "port": 8000}], "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}


def discovery(*objects: dict) -> tuple[KubernetesDiscovery, Registry]:
    registry = Registry()
    d = KubernetesDiscovery(registry)
    d.models.apply("SYNC", {"items": list(objects)})
    d.slices.apply("SYNC", {"items": [endpoint_slice("v1", "10.0.0.1"), endpoint_slice("v2", "10.0.0.2")]})
    return d, registry


def test_weighted_deployments_share_the_name_and_their_replicas_say_whose_they_are() -> None:
    d, registry = discovery(model_deployment("v1", "2025-01-01T00:00:00Z", weight=95, aliases=("c",)),
                            model_deployment("v2", "2025-01-02T00:00:00Z", weight=5))
    assert registry.resolve("chat") == registry.resolve("c") == "chat"
    assert {(e.url, e.deployment, e.weight) for e in registry.for_model("chat")} == {
        ("http://10.0.0.1:8000", "ns/v1", 95), ("http://10.0.0.2:8000", "ns/v2", 5)}
    assert d.entry_for("chat").name == "v1"


def test_an_unweighted_clash_routes_to_the_older_only() -> None:
    d, registry = discovery(model_deployment("v2", "2025-01-02T00:00:00Z"),
                            model_deployment("v1", "2025-01-01T00:00:00Z", weight=50))
    assert [e.deployment for e in registry.for_model("chat")] == ["ns/v1"]
    assert d.entry_for("chat").name == "v1"
    # Weighting the newer one as well lets it in, without a restart.
    d.models.apply("MODIFIED", model_deployment("v2", "2025-01-02T00:00:00Z", weight=50))
    assert sorted(e.deployment for e in registry.for_model("chat")) == ["ns/v1", "ns/v2"]


def test_the_holders_spec_routing_reaches_the_pool_typed_and_follows_edits() -> None:
    """spec.routing (strategy, prefixLength, loadFactor) of the ModelDeployment holding a name is
    what its pool routes with, and an edit of the spec takes effect without a restart."""
    md = model_deployment("v1", "2025-01-01T00:00:00Z")
    md["spec"]["routing"] = {"strategy": "prefix-affinity", "prefixLength": 8192, "loadFactor": 2.0}
    d, registry = discovery(md)
    assert registry.pool("chat").route == RouteSettings("prefix-affinity", 8192, 2.0)
    md["spec"]["routing"] = {"strategy": "least-load"}
    d.models.apply("MODIFIED", md)
    assert registry.pool("chat").route == RouteSettings("least-load", 256, 1.25)
