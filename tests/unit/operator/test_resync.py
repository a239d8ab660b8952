"""The resync loop: kopf's peering rule, and one round over the index."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import kopf

from modelfleet.operator.resync import Peering, Resync, peering_allows

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def peer(priority: int, seen_ago: float = 1, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat()}


def test_the_highest_live_priority_acts_and_the_others_stand_down():
    status = {"op-a": peer(200), "op-b": peer(100)}
    assert peering_allows(status, 200, NOW)
    assert not peering_allows(status, 100, NOW)


def test_dead_peers_do_not_count():
    status = {"op-a": peer(200, seen_ago=120, lifetime=60), "op-b": peer(100)}
    assert peering_allows(status, 100, NOW)


def test_a_tie_pauses_both_as_in_kopf():
    assert not peering_allows({"op-a": peer(100), "op-b": peer(100)}, 100, NOW)
    assert peering_allows({"op-a": peer(100)}, 100, NOW)  # only ourselves
    assert peering_allows({}, 100, NOW)  # not registered yet


def test_malformed_entries_are_ignored():
    assert peering_allows({"x": "junk", "y": {"priority": "high"}, "z": {"lastseen": "never"}}, 1, NOW)


class FakeKube:
    def __init__(self, peerings: dict) -> None:
        self.peerings = peerings
        self.gets: list[tuple] = []

    def get(self, kind, namespace, name):
        self.gets.append((kind[1], namespace, name))
        return self.peerings.get((kind[1], namespace, name))


def stub(name: str, namespace: str) -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"}}


def test_a_round_reconciles_where_peering_allows_and_survives_failures():
    kube = FakeKube({("KopfPeering", "team-a", "modelfleet"): {"status": {"me": peer(5), "boss": peer(9)}},
                     ("KopfPeering", "team-b", "modelfleet"): {"status": {"me": peer(5)}}})
    runs = []

    def run(body, trigger):
        runs.append((body["metadata"]["name"], trigger))
        if body["metadata"]["name"] == "b1":
            raise RuntimeError("API server hiccup")
        if body["metadata"]["name"] == "b2":
            raise kopf.PermanentError("invalid spec")

    stubs = [stub("a1", "team-a"), stub("b1", "team-b"), stub("b2", "team-b"), stub("a2", "team-a")]
    peering = Peering(standalone=False, priority=5, name="modelfleet", clusterwide=False)
    resync = Resync(run, lambda: stubs, 10, kube, peering, clock=lambda: NOW)
    handed = asyncio.run(resync.round())
    assert runs == [("b1", "timer"), ("b2", "timer")]  # team-a has a live peer of higher priority
    assert handed == 2
    assert len(kube.gets) == 2  # one peering read per namespace per round


def test_missing_peering_object_follows_kopf():
    kube = FakeKube({})
    assert not Peering(False, 5, "modelfleet", clusterwide=True).allows(kube, "", NOW)  # named: paused
    assert Peering(False, 5, None, clusterwide=True).allows(kube, "", NOW)  # default absent: standalone
    assert kube.gets == [("ClusterKopfPeering", "", "modelfleet"), ("ClusterKopfPeering", "", "default")]
    assert Peering(True, 5, "modelfleet", clusterwide=True).allows(kube, "", NOW)
