"""EndpointSlices read by Kubernetes discovery: which replicas take traffic, and which are
failing (so that requests waiting on them move elsewhere) rather than draining."""

import asyncio

from modelfleet import labels
from modelfleet.gateway.discovery import KubernetesDiscovery, failing_urls, ready_urls
from modelfleet.gateway.registry import Registry


def endpoint(ip: str, ready: bool, terminating: bool = False) -> dict:
    return {"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": terminating}}


def endpoint_slice(*endpoints: dict) -> dict:
    return {"metadata": {"name": "tiny-chat-abc", "namespace": "ml", "labels": {labels.MODEL: "tiny-chat"}},
            "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8000}],
            "endpoints": list(endpoints)}


SLICE = endpoint_slice(endpoint("10.0.0.1", True), endpoint("10.0.0.2", False),
                       endpoint("10.0.0.3", False, terminating=True), endpoint("fd00::4", True))


def test_ready_endpoints_on_the_http_port():
    assert ready_urls(SLICE) == ["http://10.0.0.1:8000", "http://[fd00::4]:8000"]


def test_unready_while_not_terminating_is_failing_and_draining_is_not():
    assert failing_urls(SLICE) == ["http://10.0.0.2:8000"]


def test_a_slice_without_ports_has_no_urls():
    bare = {**SLICE, "ports": []}
    assert ready_urls(bare) == [] and failing_urls(bare) == []


def test_requests_waiting_on_a_replica_that_starts_failing_are_told():
    async def main() -> tuple[bool, bool]:
        registry = Registry()
        registry.set_endpoints("tiny-chat", ["http://10.0.0.2:8000", "http://10.0.0.3:8000"], ready=True)
        failing, draining = (registry.endpoints[u].lost_signal() for u in ("http://10.0.0.2:8000",
                                                                             "http://10.0.0.3:8000"))
        KubernetesDiscovery(registry).slices.apply("MODIFIED", SLICE)
        return failing.done(), draining.done()

    assert asyncio.run(main()) == (True, False)
