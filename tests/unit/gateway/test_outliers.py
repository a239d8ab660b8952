"""Passive ejection: a failing replica leaves routing for a while, but never the last one."""

from __future__ import annotations

from modelfleet.gateway.registry import OutlierPolicy, Registry


def registry(*urls: str) -> Registry:
    reg = Registry(outliers=OutlierPolicy(failures=3, eject_seconds=60))
    reg.set_endpoints("m", list(urls), ready=True)
    return reg


def test_a_replica_failing_repeatedly_is_ejected_while_another_serves() -> None:
    reg = registry("http://a", "http://b")
    a = reg.endpoints["http://a"]
    assert [reg.record_failure(a) for _ in range(3)] == [False, False, True]
    assert [e.url for e in reg.available("m")] == ["http://b"]


def test_the_last_available_replica_is_never_ejected() -> None:
    reg = registry("http://a", "http://b")
    a, b = reg.endpoints["http://a"], reg.endpoints["http://b"]
    for _ in range(3):
        reg.record_failure(a)
    assert not any(reg.record_failure(b) for _ in range(10))
    assert [e.url for e in reg.available("m")] == ["http://b"]


def test_a_lone_replica_stays_routable_through_failures() -> None:
    reg = registry("http://a")
    a = reg.endpoints["http://a"]
    assert not any(reg.record_failure(a) for _ in range(10))
    assert reg.available("m") == [a]


def test_the_last_replica_holding_an_adapter_is_never_ejected() -> None:
    """Another replica of the base cannot serve the adapter's requests: ejecting the only holder
    would turn them from slow into refused."""
    reg = registry("http://a", "http://b")
    a, b = reg.endpoints["http://a"], reg.endpoints["http://b"]
    a.adapters = frozenset({"sql"})
    assert not any(reg.record_failure(a) for _ in range(10))
    b.adapters = frozenset({"sql"})
    assert reg.record_failure(a)  # now another holds it too
