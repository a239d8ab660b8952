"""Events named after what they say: a repeat, from any trigger or any operator process, is the
same Event with a higher count (kube.event_name, event_body, fold_patch, Kube.post_event)."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet.api import ObjectMeta
from modelfleet.operator.conditions import StatusEvent
from modelfleet.operator.kube import MAX_NAME, Kube, event_body, event_name, fold_patch

META = ObjectMeta(name="chat", namespace="team-a", uid="u-1")
SCALED = StatusEvent("Normal", "ScaledToZero", "phase None -> Pending: scaled to zero")
NOW = "2025-01-01T12:00:00Z"


def test_the_same_event_about_the_same_object_has_the_same_name() -> None:
    assert event_name(META, SCALED) == event_name(META.model_copy(), StatusEvent(SCALED.type, SCALED.reason, SCALED.message))
    assert event_name(META, SCALED).startswith("chat.")


@pytest.mark.parametrize(
    "other",
    [
        (META.model_copy(update={"uid": "u-2"}), SCALED),  # a new object under the old name
        (META, StatusEvent("Warning", SCALED.reason, SCALED.message)),
        (META, StatusEvent(SCALED.type, "Scaled", SCALED.message)),
        (META, StatusEvent(SCALED.type, SCALED.reason, "phase Ready -> Pending: scaled to zero")),
    ],
)
def test_anything_else_is_another_event(other: tuple[ObjectMeta, StatusEvent]) -> None:
    assert event_name(*other) != event_name(META, SCALED)


def test_a_long_object_name_still_gives_a_valid_name() -> None:
    meta = META.model_copy(update={"name": "m" * 253})
    name = event_name(meta, SCALED)
    assert len(name) <= MAX_NAME and name.rsplit(".", 1)[1] == event_name(META, SCALED).rsplit(".", 1)[1]


def test_the_body_is_a_first_occurrence_on_the_model_deployment() -> None:
    body = event_body(META, StatusEvent("Warning", "CrashLoopBackOff", "x" * 5000), NOW, "modelfleet-operator")
    assert body["metadata"] == {"name": event_name(META, StatusEvent("Warning", "CrashLoopBackOff", "x" * 5000)),
                                "namespace": "team-a"}
    assert body["involvedObject"]["uid"] == "u-1" and body["involvedObject"]["kind"] == "ModelDeployment"
    assert len(body["message"]) == 1024
    assert (body["count"], body["firstTimestamp"], body["lastTimestamp"]) == (1, NOW, NOW)


def test_a_message_cut_at_the_limit_names_the_event_it_is_posted_as() -> None:
    long = StatusEvent("Warning", "CrashLoopBackOff", "x" * 1024)
    assert event_name(META, long) == event_name(META, StatusEvent(long.type, long.reason, long.message + "tail"))


def test_folding_counts_one_more_from_the_version_read() -> None:
    existing = {"metadata": {"name": "chat.x", "resourceVersion": "41"}, "count": 2, "lastTimestamp": "earlier"}
    assert fold_patch(existing, NOW) == {"metadata": {"resourceVersion": "41"}, "count": 3, "lastTimestamp": NOW}
    assert fold_patch({"metadata": {"resourceVersion": "1"}}, NOW)["count"] == 2  # no count: it was one


class ApiError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status = status


class _Result:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj

    def to_dict(self) -> dict[str, Any]:
        return dict(self.obj)


class FakeEvents:
    """The slice of DynamicClient that post_event uses, over a dict of Events by name; the
    first `conflicts` patches fail as if another writer had bumped the Event meanwhile."""

    def __init__(self, conflicts: int = 0) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.conflicts = conflicts
        self.resources = self

    def get(self, resource: Any = None, name: str = "", namespace: str = "", **_: Any) -> Any:
        if resource is None:  # resources.get(api_version=..., kind=...)
            return "events"
        return _Result(self.events[name])

    def create(self, resource: Any, body: dict[str, Any], namespace: str) -> Any:
        name = body["metadata"]["name"]
        if name in self.events:
            raise ApiError(409)
        self.events[name] = {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
        return _Result(self.events[name])

    def patch(self, resource: Any, body: dict[str, Any], name: str, namespace: str, content_type: str) -> Any:
        assert content_type == "application/merge-patch+json"
        stored = self.events[name]
        version = stored["metadata"]["resourceVersion"]
        if self.conflicts:
            self.conflicts -= 1
            stored["count"] += 1  # the other writer
            version = stored["metadata"]["resourceVersion"] = str(int(version) + 1)
        if body["metadata"]["resourceVersion"] != version:
            raise ApiError(409)
        stored.update({k: v for k, v in body.items() if k != "metadata"})
        stored["metadata"]["resourceVersion"] = str(int(version) + 1)
        return _Result(stored)


def test_a_repeat_posted_by_another_process_bumps_the_count() -> None:
    api = FakeEvents()
    Kube(api).post_event(META, SCALED)
    Kube(api).post_event(META, SCALED)  # a restarted operator: nothing remembered in memory
    (only,) = api.events.values()
    assert only["count"] == 2 and only["reason"] == "ScaledToZero"
    Kube(api).post_event(META, StatusEvent("Normal", "ReplicasReady", "phase Pending -> Ready: 1/1 replicas ready"))
    assert sorted(e["count"] for e in api.events.values()) == [1, 2]


def test_a_concurrent_bump_is_read_again_not_lost() -> None:
    api = FakeEvents(conflicts=1)
    Kube(api).post_event(META, SCALED)
    Kube(api).post_event(META, SCALED)
    assert next(iter(api.events.values()))["count"] == 3  # the other writer's and ours


def test_a_failure_to_post_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    api = FakeEvents(conflicts=10)
    Kube(api).post_event(META, SCALED)
    Kube(api).post_event(META, SCALED)  # every fold attempt conflicts
    assert "could not post event ScaledToZero" in caplog.text


def test_kopf_posts_every_event_as_a_new_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why Kube.post_event exists beside kopf.event (docs/operator.md, "kopf and the operator"):
    kopf's poster (read in kopf 1.45) asks the API server to generate each Event's
    name and sends no count, so a restarted operator's repeat would be a second Event. If kopf
    ever names or folds them, this fails: then switch to kopf.event and drop the poster."""
    import asyncio
    import logging

    import kopf
    from kopf._cogs.clients import api, events
    from kopf._cogs.structs import references

    posted: list[dict[str, Any]] = []

    async def capture(**kwargs: Any) -> None:
        posted.append(kwargs["payload"])

    ref = {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment", "name": "chat",
           "namespace": "team-a", "uid": "u-1"}
    resource = references.Resource("", "v1", "events", namespaced=True)
    monkeypatch.setattr(api, "post", capture)
    for _ in range(2):  # the same news twice, as a restarted operator would post it
        asyncio.run(events.post_event(ref=ref, type="Normal", reason=SCALED.reason, message=SCALED.message,
                                      resource=resource, settings=kopf.OperatorSettings(),
                                      logger=logging.getLogger(__name__)))
    assert len(posted) == 2
    for body in posted:
        assert "name" not in body["metadata"] and "generateName" in body["metadata"]
        assert "count" not in body
