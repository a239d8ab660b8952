"""A model's pool: route settings built from what discovery reports, with the spec's defaults;
the hash ring kept as the endpoint set changes; leases as the one place in-flight counts move."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from modelfleet.api import Routing
from modelfleet.gateway.balancer import DEFAULT_ROUTE, RequestView, Ring, RouteSettings, prefix_affinity
from modelfleet.gateway.registry import Registry
from modelfleet.gateway.routing import routing_fields

URLS = [f"http://10.0.0.{i}:8000" for i in range(5)]


def route(**spec) -> RouteSettings:
    """spec.routing as discovery types it (discovery.model_entry)."""
    return RouteSettings.of(Routing.model_validate(spec))


def registry(urls: list[str] = URLS) -> Registry:
    reg = Registry()
    reg.set_endpoints("m", urls, ready=True)
    return reg


def test_route_settings_default_to_the_specs_own_defaults() -> None:
    spec = Routing()
    assert DEFAULT_ROUTE == RouteSettings(spec.strategy, spec.prefix_length, spec.load_factor)
    reg = registry()
    assert reg.pool("m").route == DEFAULT_ROUTE  # static discovery: nothing reported
    reg.meta["m"] = {"engine": "vllm"}
    reg.set_route("m", route())  # a spec that sets nothing
    assert reg.pool("m").route == DEFAULT_ROUTE


def test_route_settings_follow_each_report_and_are_checked_by_the_spec() -> None:
    reg = registry()
    reg.set_route("m", route(strategy="prefix-affinity", prefix_length=8192, load_factor=2.0))
    pool = reg.pool("m")
    assert pool.route == RouteSettings("prefix-affinity", 8192, 2.0)
    reg.set_route("m", route(strategy="least-load"))  # discovery read the spec again
    assert reg.pool("m") is pool and pool.route.strategy == "least-load" and pool.route.prefix_length == 256
    with pytest.raises(ValidationError):
        reg.set_route("m", route(strategy="round-robin"))


def test_a_prefix_is_honoured_up_to_the_crds_maximum() -> None:
    """Two conversations alike in their first 5,000 characters are told apart under a prefix
    length of 8,192 (they were cut at 4,096 before), and the CRD's maximum is honoured whole."""
    shared = "x" * 5000
    reg = registry()
    reg.set_route("m", route(strategy="prefix-affinity", prefix_length=8192))
    pool = reg.pool("m")
    a, b = (routing_fields(json.dumps({"model": "m", "messages": [{"role": "user", "content": shared + tail}]})
                           .encode()) for tail in ("a", "b"))
    assert pool.prefix(a) != pool.prefix(b) and len(pool.prefix(a)) == len("user:") + 5001
    long = routing_fields(json.dumps({"model": "m", "prompt": "y" * 70000}).encode())
    assert len(long.prefix(65536)) == 65536  # spec.routing.prefixLength's maximum
    reg.set_route("m", route(strategy="least-load"))
    assert reg.pool("m").prefix(a) == ""  # not scanned when the strategy does not use it


def test_the_ring_is_rebuilt_only_when_the_endpoint_set_changes() -> None:
    reg = registry()
    ring = reg.pool("m").ring
    reg.set_endpoints("m", list(reversed(URLS)), ready=True)
    assert reg.pool("m").ring is ring
    reg.set_endpoints("m", URLS[:4], ready=True)
    assert reg.pool("m").ring is not ring and {e.url for e in reg.pool("m").ring.points} == set(URLS[:4])
    reg.remove_model("m")
    assert reg.pool("m").acquire("p", random.Random(0)) is None


def test_the_models_ring_picks_what_a_ring_of_the_candidates_alone_would() -> None:
    """The pool's ring holds every endpoint; unready or tried ones are stepped over."""
    reg = registry()
    eps = reg.for_model("m")
    eps[1].ready = False
    candidates = [e for e in eps if e.ready and e.url != URLS[3]]
    full = Ring(eps)
    rng = random.Random(0)
    for i in range(300):
        prefix = f"conversation {i}"
        alone = prefix_affinity(candidates, RequestView(prefix), rng)
        assert prefix_affinity(candidates, RequestView(prefix, ring=full), rng) is alone
    home = prefix_affinity(candidates, RequestView("hot", ring=full), rng)
    home.inflight = 20  # the bounded load still hands over
    assert prefix_affinity(candidates, RequestView("hot", ring=full), rng) is not home


def test_a_lease_counts_once_and_releases_once() -> None:
    reg = registry(URLS[:1])
    pool = reg.pool("m")
    lease = pool.acquire("", random.Random(0))
    assert lease is not None and lease.endpoint.inflight == 1
    lease.release()
    lease.release()
    assert lease.endpoint.inflight == 0
    assert pool.acquire("", random.Random(0), exclude={URLS[0]}) is None
