"""The only module that talks to the Kubernetes API server.

Children are written with server-side apply under one field manager, with force: the operator
takes back the fields it renders when someone edits them (drift is corrected), and never
touches fields it does not render (HPA, `kubectl rollout restart`, API server defaults).

Built on the kubernetes client's DynamicClient, whose get/patch/server_side_apply interface is
the same across client releases, unlike the generated typed APIs.

Events are posted here rather than with kopf.event: kopf posts each one under a generated name
from an in-memory queue, so a repeat is a second Event and a killed process loses what it
queued. Ours are named after what they say (event_name) and a repeat bumps the existing
Event's count, as client-go's recorder folds them, but across restarts too. A first occurrence
costs one call, as kopf.event's POST does; a repeat three (POST answered 409, GET, PATCH).
tests/unit/operator/test_kube.py checks that kopf still posts every Event as a new object.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from modelfleet import labels
from modelfleet.api import API_VERSION, KIND, ObjectMeta

from .conditions import StatusEvent

log = logging.getLogger(__name__)

# Kinds the operator applies, deletes or reads, by (apiVersion, kind).
DEPLOYMENT = ("apps/v1", "Deployment")
SERVICE = ("v1", "Service")
PDB = ("policy/v1", "PodDisruptionBudget")
POD = ("v1", "Pod")
EVENT = ("v1", "Event")
PVC = ("v1", "PersistentVolumeClaim")  # the weight cache (cache.py)
JOB = ("batch/v1", "Job")  # its fill
MODEL_DEPLOYMENT = (API_VERSION, KIND)

MAX_EVENT_MESSAGE = 1024  # as kopf cuts them, and events.k8s.io/v1 caps a note
MAX_NAME = 253
# Tries to bump an existing Event's count when another writer bumps it at the same time.
FOLD_TRIES = 3


class KubeApi(Protocol):
    """What reconcile() needs from the cluster; kube.Kube implements it, tests fake it."""

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...
    def delete(self, kind: tuple[str, str], namespace: str, name: str, propagation: str | None = None) -> bool: ...
    def get(self, kind: tuple[str, str], namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch(
        self, kind: tuple[str, str], namespace: str, name: str, body: Mapping[str, Any], strategic: bool = False
    ) -> dict[str, Any]: ...
    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str: ...
    def list(
        self, kind: tuple[str, str], namespace: str, label_selector: str = "", field_selector: str = ""
    ) -> list[dict[str, Any]]: ...
    def patch_status(self, meta: ObjectMeta, status: Mapping[str, Any]) -> None: ...
    def post_event(self, meta: ObjectMeta, event: StatusEvent) -> None: ...


def _status_code(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


def event_name(meta: ObjectMeta, event: StatusEvent) -> str:
    """The object's name and a digest of its uid and the event's type, reason and message.

    What client-go's EventCorrelator keys repeats on, written into the name: the same event
    about the same object is the same Event, whichever process or trigger posts it.
    """
    key = "\0".join((meta.uid, event.type, event.reason, event.message[:MAX_EVENT_MESSAGE]))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{meta.name[: MAX_NAME - len(digest) - 1]}.{digest}"


def event_body(meta: ObjectMeta, event: StatusEvent, now: str, component: str) -> dict[str, Any]:
    """A core/v1 Event about the ModelDeployment, seen for the first time at `now`."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(meta, event), "namespace": meta.namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta.name,
            "namespace": meta.namespace,
            "uid": meta.uid,
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:MAX_EVENT_MESSAGE],
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def fold_patch(existing: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The merge patch that records one more occurrence on an existing Event.

    Its resourceVersion makes it conditional: two writers folding at once cannot both count
    from the same number (one gets 409 and reads again).
    """
    meta = existing.get("metadata") or {}
    return {
        "metadata": {"resourceVersion": meta.get("resourceVersion")},
        "count": int(existing.get("count") or 1) + 1,
        "lastTimestamp": now,
    }


class Kube:
    """KubeApi over a kubernetes DynamicClient (built by main.py from the kubeconfig)."""

    def __init__(
        self, dynamic: Any, field_manager: str = labels.FIELD_MANAGER, component: str = "modelfleet-operator"
    ) -> None:
        self._dyn = dynamic
        self._field_manager = field_manager
        self._component = component
        self._resources: dict[tuple[str, str], Any] = {}

    def _resource(self, kind: tuple[str, str]) -> Any:
        if kind not in self._resources:
            self._resources[kind] = self._dyn.resources.get(api_version=kind[0], kind=kind[1])
        return self._resources[kind]

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply; returns the object as stored (with its status)."""
        kind = (obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        result = self._dyn.server_side_apply(
            self._resource(kind),
            body=dict(obj),
            name=meta["name"],
            namespace=meta["namespace"],
            field_manager=self._field_manager,
            force_conflicts=True,
        )
        return result.to_dict()

    def delete(self, kind: tuple[str, str], namespace: str, name: str, propagation: str | None = None) -> bool:
        """Delete if present; False when it was already gone. `propagation` (Background,
        Foreground): what happens to its dependents, since a Job's default orphans its pods."""
        body = {"propagationPolicy": propagation} if propagation else None
        try:
            self._dyn.delete(self._resource(kind), name=name, namespace=namespace, body=body)
        except Exception as exc:
            if _status_code(exc) == 404:
                return False
            raise
        return True

    def get(self, kind: tuple[str, str], namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._dyn.get(self._resource(kind), name=name, namespace=namespace).to_dict()
        except Exception as exc:
            if _status_code(exc) == 404:
                return None
            raise

    def patch(
        self, kind: tuple[str, str], namespace: str, name: str, body: Mapping[str, Any], strategic: bool = False
    ) -> dict[str, Any]:
        """A merge patch, or a strategic merge patch (built-in kinds only), which merges lists
        such as ownerReferences by their key instead of replacing them."""
        content_type = "application/strategic-merge-patch+json" if strategic else "application/merge-patch+json"
        result = self._dyn.patch(self._resource(kind), body=dict(body), name=name, namespace=namespace,
                                 content_type=content_type)  # fmt: skip
        return result.to_dict()

    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        """The last lines of a container's log (pods/log), through the typed client: the dynamic
        one decodes every answer as JSON."""
        from kubernetes.client import CoreV1Api

        return str(CoreV1Api(self._dyn.client).read_namespaced_pod_log(
            name, namespace, container=container, tail_lines=tail_lines))

    def list(
        self, kind: tuple[str, str], namespace: str, label_selector: str = "", field_selector: str = ""
    ) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {"namespace": namespace}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if field_selector:
            kwargs["field_selector"] = field_selector
        return list(self._dyn.get(self._resource(kind), **kwargs).to_dict().get("items") or [])

    def patch_status(self, meta: ObjectMeta, status: Mapping[str, Any]) -> None:
        """Merge-patch the status subresource (the whole status: we own all of it)."""
        resource = self._resource(MODEL_DEPLOYMENT).subresources["status"]
        self._dyn.patch(
            resource,
            body={"status": dict(status)},
            name=meta.name,
            namespace=meta.namespace,
            content_type="application/merge-patch+json",
        )

    def post_event(self, meta: ObjectMeta, event: StatusEvent) -> None:
        """A core/v1 Event on the ModelDeployment (what `kubectl describe md` shows): created
        under event_name(), or, when it exists already, its count and lastTimestamp bumped.

        Failures are logged, not raised: an Event is a courtesy, status is the record.
        """
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = event_body(meta, event, now, self._component)
        try:
            self._post_or_fold(body, now)
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("could not post event %s on %s/%s: %s", event.reason, meta.namespace, meta.name, exc)

    def _post_or_fold(self, body: Mapping[str, Any], now: str) -> None:
        resource = self._resource(EVENT)
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        try:
            self._dyn.create(resource, body=dict(body), namespace=namespace)
            return
        except Exception as exc:
            if _status_code(exc) != 409:  # 409: AlreadyExists, a repeat
                raise
        for attempt in range(FOLD_TRIES):
            existing = self._dyn.get(resource, name=name, namespace=namespace).to_dict()
            try:
                self._dyn.patch(
                    resource,
                    body=fold_patch(existing, now),
                    name=name,
                    namespace=namespace,
                    content_type="application/merge-patch+json",
                )
                return
            except Exception as exc:
                if _status_code(exc) != 409 or attempt == FOLD_TRIES - 1:  # 409: Conflict, read again
                    raise
