"""Autoscaling decisions: up at once, down after the delay, to zero when idle, back on demand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from modelfleet.api import AutoscalerStatus, Autoscaling
from modelfleet.labels import Demand, parse_demand
from modelfleet.operator.autoscale import Observation, decide, format_time, parse_time, recommend

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
SPEC = Autoscaling(
    min_replicas=0, max_replicas=4, target_inflight_per_replica=8, scale_down_delay_seconds=300
)


def ago(seconds: float) -> str:
    return format_time(NOW - timedelta(seconds=seconds))


def state(desired: int, active_ago: float | None = None, needed_ago: float | None = None) -> AutoscalerStatus:
    return AutoscalerStatus(
        desired_replicas=desired,
        last_active_time=None if active_ago is None else ago(active_ago),
        last_needed_time=None if needed_ago is None else ago(needed_ago),
    )


def demand(waiting: int, seconds_ago: float = 0) -> Demand:
    return Demand(time=NOW - timedelta(seconds=seconds_ago), waiting=waiting)


# (name, spec, state, current, inflight, demand, expected desired)
CASES = [
    ("steady", SPEC, state(2, 0, 0), 2, 12, None, 2),
    ("up at once", SPEC, state(1, 0, 0), 1, 20, None, 3),
    ("up capped at max", SPEC, state(1, 0, 0), 1, 1000, None, 4),
    ("down waits for the delay", SPEC, state(3, 0, 100), 3, 8, None, 3),
    ("down after the delay", SPEC, state(3, 0, 301), 3, 8, None, 1),
    ("idle but recently active keeps one", SPEC, state(2, 100, 301), 2, 0, None, 1),
    ("zero after idle delay", SPEC, state(1, 301, 301), 1, 0, None, 0),
    ("zero stays zero", SPEC, state(0, 3000, 3000), 0, None, None, 0),
    ("from zero on demand", SPEC, state(0, 3000, 3000), 0, None, demand(3), 1),
    ("demand adds to load", SPEC, state(1, 0, 0), 1, 8, demand(17), 3),
    ("stale demand ignored", SPEC, state(0, 3000, 3000), 0, None, demand(3, seconds_ago=120), 0),
    ("unknown load holds", SPEC, state(2, 1000, 1000), 2, None, None, 2),
    (
        "min respected when idle",
        Autoscaling(min_replicas=2, max_replicas=4),
        state(3, 999, 999),
        3,
        0,
        None,
        2,
    ),
    ("outside bounds is clamped", SPEC, state(9, 0, 0), 9, 8, None, 4),
    ("first decision waits before scaling down", SPEC, None, 2, 0, None, 2),
]


@pytest.mark.parametrize(
    ("name", "spec", "st", "current", "inflight", "dem", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_decide(name, spec, st, current, inflight, dem, expected) -> None:
    decision = decide(spec, st, current, Observation(now=NOW, inflight=inflight, demand=dem))
    assert decision.desired == expected, decision.reason
    assert spec.min_replicas <= decision.desired <= spec.max_replicas


def test_memory_moves_with_activity_and_scaling() -> None:
    up = decide(SPEC, state(1, 500, 500), 1, Observation(NOW, inflight=20))
    assert up.state.desired_replicas == 3
    assert up.state.last_active_time == format_time(NOW)
    assert up.state.last_scale_time == format_time(NOW)
    assert "scale up 1 -> 3" in up.reason
    idle = decide(SPEC, state(1, 500, 500), 1, Observation(NOW, inflight=0))
    assert idle.desired == 0 and "scale to zero" in idle.reason
    hold = decide(SPEC, state(2, 500, 10), 2, Observation(NOW, inflight=0))
    assert hold.state.last_active_time == ago(500)  # idle does not refresh activity
    assert hold.state.last_scale_time is None  # nothing changed


def test_a_restart_decides_the_same() -> None:
    """Feeding a decision's state back in with the same facts changes nothing."""
    first = decide(SPEC, state(3, 0, 301), 3, Observation(NOW, inflight=8))
    again = decide(SPEC, first.state, first.desired, Observation(NOW, inflight=8))
    assert again.desired == first.desired and again.state == first.state


def test_no_flapping_during_a_short_lull() -> None:
    st = state(2, 0, 0)
    desired = 2
    for minute in range(4):  # 4 minutes idle, delay is 5
        now = NOW + timedelta(minutes=minute)
        d = decide(SPEC, st, desired, Observation(now, inflight=0))
        st, desired = d.state, d.desired
        assert desired == 2
    d = decide(SPEC, st, desired, Observation(NOW + timedelta(minutes=5, seconds=1), inflight=0))
    assert d.desired == 0


def test_recommend_rounds_up() -> None:
    assert recommend(SPEC, Observation(NOW, inflight=9), 1) == 2
    assert recommend(SPEC, Observation(NOW, inflight=0), 1) == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{"time":"2025-01-01T12:00:00Z","waiting":3}', Demand(NOW, 3)),
        ('{"time":"2025-01-01T12:00:00+00:00"}', Demand(NOW, 1)),
        ('{"time":"2025-01-01T12:00:00Z","waiting":-4}', Demand(NOW, 0)),
        ("not json", None),
        ('{"waiting": 3}', None),
        ('{"time": "yesterday"}', None),
        ("[]", None),
        (None, None),
    ],
)
def test_parse_demand_is_lenient(value: str | None, expected: Demand | None) -> None:
    assert parse_demand(value) == expected


def test_a_demand_stamp_keeps_the_time_the_gateway_saw_to_the_millisecond() -> None:
    seen = NOW + timedelta(seconds=7, microseconds=987_654)
    encoded = Demand(seen, 2).encode()
    assert '"time":"2025-01-01T12:00:07.987Z"' in encoded
    assert parse_demand(encoded) == Demand(NOW + timedelta(seconds=7, milliseconds=987), 2)


def test_demand_round_trips() -> None:
    d = Demand(NOW, 5)
    assert parse_demand(d.encode()) == d


def test_time_round_trips_and_rejects_garbage() -> None:
    assert parse_time(format_time(NOW)) == NOW
    assert parse_time("garbage") is None and parse_time(None) is None


def test_demand_lives_as_long_as_the_gateway_holds_requests() -> None:
    held = demand(3, seconds_ago=20)
    assert (
        decide(SPEC, state(0, 999, 999), 0, Observation(NOW, None, held, timedelta(seconds=30))).desired == 1
    )
    assert (
        decide(SPEC, state(0, 999, 999), 0, Observation(NOW, None, held, timedelta(seconds=10))).desired == 0
    )
