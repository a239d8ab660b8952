"""reconcile() against an in-memory cluster: idempotence, drift, PDB lifecycle, status, events,
autoscaling from zero and back, invalid specs; and that operator/rbac.yaml grants every call."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet import labels
from modelfleet.api import ObjectMeta
from modelfleet.operator.conditions import StatusEvent
from modelfleet.operator.config import OperatorConfig
from modelfleet.operator.kube import DEPLOYMENT, PDB, SERVICE
from modelfleet.operator.reconcile import ApplyFailed, Gone, InvalidSpec, reconcile

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
CONFIG = OperatorConfig(default_image="modelfleet:test")
RBAC = Path(__file__).resolve().parents[3] / "operator" / "rbac.yaml"


class ApiError(Exception):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = json.dumps({"message": message})


class FakeKube:
    """A namespace in memory, with the merge semantics the operator relies on (a strategic
    merge patch merges ownerReferences by uid, a merge patch's null deletes) and pods listed by
    label selector. Records (verb, kind) for the RBAC check. The weight cache's tests use it too."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.status_patches: list[dict[str, Any]] = []
        self.other_mds: list[dict[str, Any]] = []  # the namespace's other ModelDeployments
        self.events: list[StatusEvent] = []
        self.pods: list[dict[str, Any]] = []
        self.pod_events: list[dict[str, Any]] = []
        self.reject: dict[str, ApiError] = {}
        self.md: dict[str, Any] | None = None  # the ModelDeployment as stored
        self.logs: dict[str, str] = {}  # pod name -> its log
        self.deleted: list[tuple[str, str, str | None]] = []  # (kind, name, propagation)

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        kind = obj["kind"]
        self.calls.append(("patch", kind))
        if kind in self.reject:
            raise self.reject[kind]
        key = (obj["apiVersion"], kind, obj["metadata"]["namespace"], obj["metadata"]["name"])
        stored = copy.deepcopy(dict(obj))
        if key in self.objects:
            stored["status"] = self.objects[key].get("status", {})
            stored["metadata"]["generation"] = self.objects[key]["metadata"].get("generation", 1) + (
                self.objects[key]["spec"] != stored["spec"]
            )
        else:
            stored["metadata"]["generation"] = 1
            stored["status"] = {}
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def delete(self, kind: tuple[str, str], namespace: str, name: str, propagation: str | None = None) -> bool:
        self.calls.append(("delete", kind[1]))
        self.deleted.append((kind[1], name, propagation))
        return self.objects.pop((*kind, namespace, name), None) is not None

    def patch(self, kind: tuple[str, str], namespace: str, name: str, body: Mapping[str, Any],
              strategic: bool = False) -> dict[str, Any]:
        self.calls.append(("patch", kind[1]))
        obj = self.objects[(*kind, namespace, name)]
        meta, patch = obj["metadata"], body["metadata"]
        for key in ("labels", "annotations"):
            meta.setdefault(key, {}).update(patch.get(key) or {})
        if "ownerReferences" in patch:
            refs = patch["ownerReferences"]
            if refs is None:
                meta.pop("ownerReferences", None)
            else:
                assert strategic, "a merge patch would replace the other owners"
                mine = meta.setdefault("ownerReferences", [])
                for ref in refs:
                    mine[:] = [r for r in mine if r["uid"] != ref["uid"]]
                    if ref.get("$patch") != "delete":
                        mine.append(ref)
        return copy.deepcopy(obj)

    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        self.calls.append(("get", "pods/log"))
        return self.logs.get(name, "")

    def get(self, kind: tuple[str, str], namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind[1]))
        if kind[1] == "ModelDeployment":
            return copy.deepcopy(self.md)
        obj = self.objects.get((*kind, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def list(
        self, kind: tuple[str, str], namespace: str, label_selector: str = "", field_selector: str = ""
    ) -> list[dict[str, Any]]:
        self.calls.append(("list", kind[1]))
        if kind[1] == "ModelDeployment":
            return copy.deepcopy([*([self.md] if self.md else []), *self.other_mds])
        if kind[1] != "Pod":
            return copy.deepcopy(self.pod_events)
        wanted = dict(term.split("=", 1) for term in label_selector.split(",") if term)
        return [copy.deepcopy(p) for p in self.pods
                if wanted.items() <= (p["metadata"].get("labels") or {}).items()]

    def patch_status(self, meta: ObjectMeta, status: Mapping[str, Any]) -> None:
        self.calls.append(("patch", "ModelDeployment/status"))
        self.status_patches.append(dict(status))

    def post_event(self, meta: ObjectMeta, event: StatusEvent) -> None:
        self.calls.append(("create", "Event"))
        self.events.append(event)

    # Test helpers -------------------------------------------------------------------------
    def deployment(self) -> dict[str, Any]:
        return self.objects[(*DEPLOYMENT, "default", "tiny-chat")]

    def set_deployment_status(self, replicas: int, ready: int) -> None:
        dep = self.deployment()
        dep["status"] = {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas,
        }


def body(
    spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, annotations: dict | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "tiny-chat",
            "namespace": "default",
            "uid": "u-1",
            "generation": 1,
            "annotations": annotations or {},
        },
        "spec": {"model": {"source": "file:///models/tiny-chat"}, **(spec or {})},
        "status": status or {},
    }


def ready_pod(ip: str = "10.0.0.1") -> dict[str, Any]:
    return {
        "metadata": {"name": f"tiny-chat-{ip}", "labels": labels.selector_labels("tiny-chat")},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "worker", "ready": True, "state": {"running": {}}}],
        },
    }


def unknown_load(pods):
    return None


def run(kube: FakeKube, b: dict[str, Any], probe=unknown_load, now: datetime = NOW):
    """One reconcile, then store the written status on the body as the API server would."""
    kube.md = b
    try:
        return reconcile(b, kube, CONFIG, probe, now)
    finally:
        for patch in kube.status_patches:
            b["status"] = {k: v for k, v in {**b["status"], **patch}.items() if v is not None}
        kube.status_patches.clear()


def test_creates_children_and_status_then_is_a_no_op() -> None:
    kube, b = FakeKube(), body({"replicas": 2})
    first = run(kube, b)
    assert {k[1] for k in kube.objects} == {"Deployment", "Service", "PodDisruptionBudget"}
    assert kube.deployment()["spec"]["replicas"] == 2
    assert first.status_written and b["status"]["phase"] == "Pending"
    assert b["status"]["selector"] == "modelfleet.dev/model=tiny-chat"
    before = copy.deepcopy(kube.objects)
    second = run(kube, b)
    assert not second.status_written and second.events == []
    assert kube.objects == before


def test_status_follows_the_deployment_and_posts_one_event_per_transition() -> None:
    kube, b = FakeKube(), body()
    run(kube, b)
    kube.set_deployment_status(replicas=1, ready=1)
    kube.pods = [ready_pod()]
    outcome = run(kube, b)
    assert b["status"]["phase"] == "Ready" and b["status"]["readyReplicas"] == 1
    assert [e.reason for e in outcome.events] == ["ReplicasReady"]
    assert run(kube, b).events == []


def test_deleted_deployment_comes_back() -> None:
    kube, b = FakeKube(), body()
    run(kube, b)
    kube.objects.pop((*DEPLOYMENT, "default", "tiny-chat"))
    run(kube, b)
    assert (*DEPLOYMENT, "default", "tiny-chat") in kube.objects


def test_hand_edited_replicas_are_put_back() -> None:
    kube, b = FakeKube(), body({"replicas": 2})
    run(kube, b)
    kube.deployment()["spec"]["replicas"] = 7
    run(kube, b)
    assert kube.deployment()["spec"]["replicas"] == 2


def test_pdb_removed_when_scaled_to_one() -> None:
    kube, b = FakeKube(), body({"replicas": 3})
    run(kube, b)
    assert (*PDB, "default", "tiny-chat") in kube.objects
    b["spec"]["replicas"] = 1
    run(kube, b)
    assert (*PDB, "default", "tiny-chat") not in kube.objects
    assert (*SERVICE, "default", "tiny-chat") in kube.objects


def test_scale_to_zero_and_back_on_demand() -> None:
    auto = {"autoscaling": {"minReplicas": 0, "maxReplicas": 3, "scaleDownDelaySeconds": 60}}
    kube, b = FakeKube(), body(auto)
    run(kube, b)
    assert kube.deployment()["spec"]["replicas"] == 0  # nothing asked yet
    assert b["status"]["conditions"][0]["reason"] == "ScaledToZero"
    # The gateway signals two waiting requests: up to one replica at once.
    b["metadata"]["annotations"][labels.DEMAND] = labels.Demand(NOW, 2).encode()
    outcome = run(kube, b, now=NOW + timedelta(seconds=1))
    assert kube.deployment()["spec"]["replicas"] == 1
    assert outcome.scale_reason and outcome.scaled_from == 0
    assert any(e.reason == "Scaled" for e in outcome.events)
    # Serving, then idle: stays for the delay after the last activity (the demand signal
    # counts as activity while fresh, until NOW+60 s), then goes to zero.
    kube.set_deployment_status(1, 1)
    kube.pods = [ready_pod()]
    run(kube, b, probe=lambda pods: 3, now=NOW + timedelta(seconds=10))
    run(kube, b, probe=lambda pods: 0, now=NOW + timedelta(seconds=40))
    run(kube, b, probe=lambda pods: 0, now=NOW + timedelta(seconds=95))
    assert kube.deployment()["spec"]["replicas"] == 1
    run(kube, b, probe=lambda pods: 0, now=NOW + timedelta(seconds=101))
    assert kube.deployment()["spec"]["replicas"] == 0
    assert b["status"]["autoscaler"]["desiredReplicas"] == 0


def test_autoscaling_turned_off_clears_its_memory() -> None:
    kube, b = FakeKube(), body({"autoscaling": {"maxReplicas": 2}})
    run(kube, b)
    assert "autoscaler" in b["status"]
    del b["spec"]["autoscaling"]
    run(kube, b)
    assert "autoscaler" not in b["status"] and kube.deployment()["spec"]["replicas"] == 1


def test_invalid_spec_reports_in_status_and_is_permanent() -> None:
    kube, b = FakeKube(), body()
    b["spec"]["model"]["source"] = "s3://bucket/model"
    with pytest.raises(InvalidSpec, match="spec.model.source"):
        run(kube, b)
    assert b["status"]["phase"] == "Failed"
    ready = next(c for c in b["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.model.source" in ready["message"]
    assert [e.reason for e in kube.events] == ["InvalidSpec"]
    assert kube.objects == {}  # nothing half-applied


def test_api_rejection_of_a_child_is_reported() -> None:
    kube, b = FakeKube(), body()
    kube.reject["Deployment"] = ApiError(422, 'Deployment.apps "tiny-chat" is invalid: bad toleration key')
    with pytest.raises(InvalidSpec, match="bad toleration key"):
        run(kube, b)
    assert b["status"]["phase"] == "Failed"


# What server-side apply answers (500) for a Deployment with two env entries of one name.
SSA_DUPLICATE_ENV = ('failed to create typed patch object (default/tiny-chat; apps/v1, Kind=Deployment): '
                     '.spec.template.spec.containers[name="worker"].env: duplicate entries for key [name="X"]')


def test_a_refused_apply_shows_in_status_and_an_event_and_is_retried() -> None:
    """Found on the cluster: the object kept an empty status while kopf retried the 500."""
    import kopf

    from modelfleet.operator.handlers import classify

    kube, b = FakeKube(), body()
    kube.reject["Deployment"] = ApiError(500, SSA_DUPLICATE_ENV)
    with pytest.raises(ApplyFailed) as raised:
        run(kube, b)
    assert isinstance(classify(raised.value), kopf.TemporaryError)  # a 500 may also be the API server's trouble
    assert b["status"]["phase"] == "Failed" and b["status"]["observedGeneration"] == 1
    ready = next(c for c in b["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ApplyFailed")
    assert ready["message"].startswith("the API server refused the worker Deployment: ")
    assert 'duplicate entries for key [name="X"]' in ready["message"]
    assert [(e.type, e.reason) for e in kube.events] == [("Warning", "ApplyFailed")]
    # kopf's retries of a still-refused object write nothing and post nothing more.
    for _ in range(3):
        with pytest.raises(ApplyFailed):
            run(kube, b)
    assert len(kube.events) == 1 and ("patch", "ModelDeployment/status") not in kube.calls[-4:]
    # Fixed: the next reconcile applies and status moves on.
    del kube.reject["Deployment"]
    run(kube, b)
    assert next(c for c in b["status"]["conditions"] if c["type"] == "Ready")["reason"] != "ApplyFailed"
    assert b["status"]["phase"] == "Pending"


def test_a_refused_spec_change_keeps_counting_the_replicas_that_serve() -> None:
    kube, b = FakeKube(), body()
    run(kube, b)
    kube.set_deployment_status(replicas=1, ready=1)
    kube.pods = [ready_pod()]
    run(kube, b)
    b["metadata"]["generation"] = 2
    kube.reject["Deployment"] = ApiError(500, SSA_DUPLICATE_ENV)
    with pytest.raises(ApplyFailed):
        run(kube, b)
    assert b["status"]["phase"] == "Degraded" and b["status"]["readyReplicas"] == 1
    assert next(c for c in b["status"]["conditions"] if c["type"] == "Ready")["reason"] == "ApplyFailed"
    assert kube.events[-1].type == "Warning" and kube.events[-1].reason == "ApplyFailed"


def test_a_refused_apply_keeps_the_autoscalers_memory_as_stored() -> None:
    """The decision that was not applied is not remembered: the retry decides again from the
    memory the last applied decision left."""
    auto = {"autoscaling": {"minReplicas": 0, "maxReplicas": 3, "scaleDownDelaySeconds": 60}}
    kube, b = FakeKube(), body(auto)
    run(kube, b)
    stored = copy.deepcopy(b["status"]["autoscaler"])
    assert stored["desiredReplicas"] == 0
    b["metadata"]["annotations"][labels.DEMAND] = labels.Demand(NOW, 2).encode()  # would scale to 1
    kube.reject["Deployment"] = ApiError(500, SSA_DUPLICATE_ENV)
    with pytest.raises(ApplyFailed):
        run(kube, b, now=NOW + timedelta(seconds=1))
    assert b["status"]["autoscaler"] == stored
    assert next(c for c in b["status"]["conditions"] if c["type"] == "Ready")["reason"] == "ApplyFailed"
    del kube.reject["Deployment"]
    run(kube, b, now=NOW + timedelta(seconds=2))
    assert b["status"]["autoscaler"]["desiredReplicas"] == 1 and kube.deployment()["spec"]["replicas"] == 1


def test_a_refused_service_names_the_service() -> None:
    kube, b = FakeKube(), body()
    kube.reject["Service"] = ApiError(500, "boom")
    with pytest.raises(ApplyFailed, match="refused the worker Service: boom"):
        run(kube, b)


def test_conflicts_propagate_for_retry() -> None:
    kube, b = FakeKube(), body()
    kube.reject["Service"] = ApiError(409, "conflict")
    with pytest.raises(ApiError):
        run(kube, b)


def _granted() -> set[tuple[str, str]]:
    role = next(d for d in yaml.safe_load_all(RBAC.read_text()) if d["kind"] == "ClusterRole")
    return {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}


RESOURCE_OF = {
    "Deployment": "deployments",
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Pod": "pods",
    "Event": "events",
    "ModelDeployment": "modeldeployments",
    "ModelDeployment/status": "modeldeployments/status",
}


def test_rbac_grants_every_call_reconcile_makes() -> None:
    kube, b = FakeKube(), body({"replicas": 2, "autoscaling": {"maxReplicas": 3}})
    kube.pods = [ready_pod(), {"metadata": {"name": "p2", "labels": labels.selector_labels("tiny-chat")},
                               "status": {"phase": "Pending"}}]
    run(kube, b)
    b["spec"]["autoscaling"]["minReplicas"] = 0
    run(kube, b)
    kube.objects[(*DEPLOYMENT, "default", "tiny-chat")]["spec"]["replicas"] = 1
    b["spec"].pop("autoscaling")
    b["spec"]["replicas"] = 1
    run(kube, b)  # deletes the PDB
    used = {(RESOURCE_OF[kind], verb) for verb, kind in kube.calls}
    assert ("poddisruptionbudgets", "delete") in used
    granted = _granted()
    missing = {u for u in used if u not in granted}
    # Server-side apply of a new object also needs create.
    missing |= {
        (res, "create")
        for res, verb in used
        if verb == "patch"
        and "/" not in res
        and res not in ("modeldeployments",)
        and (res, "create") not in granted
    }
    assert missing == set()


def test_a_stale_body_does_not_repeat_events() -> None:
    """kopf may hand over an object from before our last status write."""
    kube, b = FakeKube(), body()
    stale = copy.deepcopy(b)
    run(kube, b)
    kube.set_deployment_status(1, 1)
    kube.pods = [ready_pod()]
    first = run(kube, b)
    assert [e.reason for e in first.events] == ["ReplicasReady"]
    kube.md = b
    again = reconcile(stale, kube, CONFIG, unknown_load, NOW)
    assert again.events == [] and not again.status_written


def test_deleted_meanwhile_is_gone() -> None:
    kube = FakeKube()
    kube.md = None
    with pytest.raises(Gone):
        reconcile(body(), kube, CONFIG, unknown_load, NOW)
    assert not [c for c in kube.calls if c[0] != "get"]


def test_being_deleted_is_gone_without_writes() -> None:
    kube = FakeKube()
    kube.md = body()
    kube.md["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    with pytest.raises(Gone):
        reconcile(kube.md, kube, CONFIG, unknown_load, NOW)
    assert not [c for c in kube.calls if c[0] != "get"]


def test_steady_state_costs_few_calls() -> None:
    """A resync with nothing to do: read, apply two objects, no PDB delete, no status write
    (and no GET of the Deployment: without autoscaling the apply returns what status needs)."""
    kube, b = FakeKube(), body()
    run(kube, b)
    kube.set_deployment_status(1, 1)
    kube.pods = [ready_pod()]
    run(kube, b)
    kube.calls.clear()
    outcome = run(kube, b)
    assert not outcome.status_written
    assert sorted(kube.calls) == sorted(
        [
            ("get", "ModelDeployment"),
            ("list", "ModelDeployment"),
            ("list", "Pod"),
            ("patch", "Service"),
            ("patch", "Deployment"),
        ]
    )


def test_a_new_object_at_zero_skips_calls_that_cannot_find_anything() -> None:
    """Created at zero replicas and never changed: no pod can exist and no earlier reconcile can
    have made a PDB, so neither is looked for (a burst of such objects is API-server bound)."""
    kube, b = FakeKube(), body({"replicas": 0})
    run(kube, b)
    assert ("list", "Pod") not in kube.calls
    assert ("delete", "PodDisruptionBudget") not in kube.calls
    # Once the spec changed, an earlier reconcile may have asked for two replicas: look.
    kube.calls.clear()
    b2 = body({"replicas": 1})
    b2["metadata"]["generation"] = 2
    run(kube, b2)
    assert ("list", "Pod") in kube.calls and ("delete", "PodDisruptionBudget") in kube.calls


def test_scaling_to_zero_still_reads_the_pods_it_had() -> None:
    kube, b = FakeKube(), body({"replicas": 1})
    run(kube, b)
    kube.set_deployment_status(1, 1)
    kube.pods = [ready_pod()]
    run(kube, b)
    b["spec"]["replicas"] = 0
    b["metadata"]["generation"] = 2
    kube.calls.clear()
    run(kube, b)  # status still says one replica: its pod may be terminating
    assert ("list", "Pod") in kube.calls


def test_a_still_invalid_object_is_reported_once() -> None:
    kube, b = FakeKube(), body()
    b["spec"]["model"]["source"] = "s3://bucket/model"
    for _ in range(3):
        with pytest.raises(InvalidSpec):
            run(kube, b, now=NOW + timedelta(seconds=_ * 10))
    assert [e.reason for e in kube.events] == ["InvalidSpec"]
    ready = next(c for c in b["status"]["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2025-01-01T12:00:00Z"


def applies(kube: FakeKube) -> list[str]:
    return [kind for verb, kind in kube.calls if verb == "patch" and kind != "ModelDeployment/status"]


def test_a_deployment_status_update_recomputes_status_without_applying() -> None:
    kube, b = FakeKube(), body({"replicas": 1})
    kube.pods = [ready_pod()]
    first = run(kube, b)
    kube.set_deployment_status(replicas=1, ready=1)
    kube.calls.clear()
    kube.md = b
    outcome = reconcile(b, kube, CONFIG, unknown_load, NOW, child=kube.deployment(), applied=first.applied)
    assert applies(kube) == []
    assert outcome.status.ready_replicas == 1 and outcome.status.phase == "Ready"


def test_a_deployment_edited_by_hand_is_applied_back_on_its_event() -> None:
    kube, b = FakeKube(), body({"replicas": 1})
    first = run(kube, b)
    edited = kube.deployment()
    edited["spec"]["replicas"] = 5
    edited["metadata"]["generation"] += 1
    kube.calls.clear()
    reconcile(b, kube, CONFIG, unknown_load, NOW, child=copy.deepcopy(edited), applied=first.applied)
    assert "Deployment" in applies(kube)
    assert kube.deployment()["spec"]["replicas"] == 1


def test_a_spec_change_is_applied_even_when_a_child_event_runs_first() -> None:
    kube, b = FakeKube(), body({"replicas": 1})
    first = run(kube, b)
    b["spec"]["replicas"] = 3
    b["metadata"]["generation"] = 2
    kube.calls.clear()
    reconcile(b, kube, CONFIG, unknown_load, NOW, child=kube.deployment(), applied=first.applied)
    assert kube.deployment()["spec"]["replicas"] == 3


def test_a_first_create_skips_the_re_read_and_applies_the_deployment_first() -> None:
    kube, b = FakeKube(), body({"replicas": 1})
    kube.md = b
    reconcile(b, kube, CONFIG, unknown_load, NOW, fresh=True)
    assert ("get", "ModelDeployment") not in kube.calls
    assert kube.calls[0] == ("patch", "Deployment")
    kube.calls.clear()
    reconcile(b, kube, CONFIG, unknown_load, NOW)  # every other trigger reads what is stored first
    assert kube.calls[0] == ("get", "ModelDeployment")


def test_after_a_restart_a_create_listed_before_a_child_reconcile_posts_nothing_again() -> None:
    """The restart race behind duplicate Events: an operator killed between applying the
    Deployment and writing status. Its successor's Deployment watch reconciles the object
    first (status, ScaledToZero); then kopf hands over the create with the body it listed
    before that, with no status, which must not be trusted as stored."""
    from modelfleet.operator.handlers import Deps, make_runner
    from modelfleet.operator.metrics import OperatorMetrics

    kube, stored = FakeKube(), body({"replicas": 0})
    listed = copy.deepcopy(stored)  # what kopf's watch of ModelDeployments saw at start-up
    kube.md = stored
    run_trigger = make_runner(Deps(kube, CONFIG, unknown_load, OperatorMetrics(), lambda: NOW))
    left_by_the_killed_operator = {"metadata": {"generation": 1}, "spec": {"replicas": 0}, "status": {}}
    run_trigger(stored, "child", deployment=left_by_the_killed_operator)
    for patch in kube.status_patches:
        stored["status"] = {k: v for k, v in {**stored["status"], **patch}.items() if v is not None}
    assert [e.reason for e in kube.events] == ["ScaledToZero"]
    kube.status_patches.clear()
    run_trigger(listed, "create", fresh=True)
    assert [e.reason for e in kube.events] == ["ScaledToZero"] and kube.status_patches == []


def _other(name: str, created: str, spec: dict[str, Any]) -> dict[str, Any]:
    other = body(spec)
    other["metadata"].update(name=name, uid=f"u-{name}", creationTimestamp=created)
    return other


def test_a_newer_object_claiming_a_served_name_reports_the_holder_until_it_goes() -> None:
    kube, b = FakeKube(), body({"model": {"source": "file:///m", "servedName": "chat"}})
    b["metadata"]["creationTimestamp"] = "2025-01-01T12:00:05Z"
    kube.other_mds = [_other("chat-v1", "2025-01-01T11:00:00Z", {"model": {"source": "file:///m",
                                                                           "servedName": "chat"}})]
    outcome = run(kube, b)
    ready = outcome.status.condition("Ready")
    assert (outcome.status.phase, ready.status, ready.reason) == ("Failed", "False", "NameConflict")
    assert "default/chat-v1" in ready.message and "spec.routing.weight" in ready.message
    assert [e.reason for e in kube.events] == ["NameConflict"]
    # The holder is deleted: the next reconcile lifts the condition.
    kube.other_mds = []
    assert run(kube, b).status.condition("Ready").reason != "NameConflict"


def test_weighted_objects_share_a_name_and_an_alias_clash_names_the_holder() -> None:
    kube, b = FakeKube(), body({"model": {"source": "file:///m", "servedName": "chat"}, "routing": {"weight": 5}})
    b["metadata"]["creationTimestamp"] = "2025-01-01T12:00:05Z"
    kube.other_mds = [_other("chat-v1", "2025-01-01T11:00:00Z",
                             {"model": {"source": "file:///m", "servedName": "chat"}, "routing": {"weight": 95}})]
    assert run(kube, b).status.condition("Ready").reason != "NameConflict"
    kube.other_mds.append(_other("old", "2024-01-01T00:00:00Z",
                                 {"model": {"source": "file:///m", "servedName": "x", "aliases": ["chat"]}}))
    message = run(kube, b).status.condition("Ready").message
    assert "default/old" in message and "spec.routing.weight" not in message
