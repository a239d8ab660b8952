"""The only module that talks to the Kubernetes API server.

Children are written with server-side apply under one field manager, with force: the operator
takes back the fields it renders when someone edits them (drift is corrected), and never
touches fields it does not render (HPA, `kubectl rollout restart`, API server defaults).

Built on the kubernetes client's DynamicClient, whose get/patch/server_side_apply interface is
the same across client releases, unlike the generated typed APIs.
"""

from __future__ import annotations

import itertools
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
MODEL_DEPLOYMENT = (API_VERSION, KIND)


class KubeApi(Protocol):
    """What reconcile() needs from the cluster; kube.Kube implements it, tests fake it."""

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...
    def delete(self, kind: tuple[str, str], namespace: str, name: str) -> bool: ...
    def get(self, kind: tuple[str, str], namespace: str, name: str) -> dict[str, Any] | None: ...
    def list(
        self, kind: tuple[str, str], namespace: str, label_selector: str = "", field_selector: str = ""
    ) -> list[dict[str, Any]]: ...
    def patch_status(self, meta: ObjectMeta, status: Mapping[str, Any]) -> None: ...
    def post_event(self, meta: ObjectMeta, event: StatusEvent) -> None: ...


def _status_code(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


class Kube:
    """KubeApi over a kubernetes DynamicClient (built by main.py from the kubeconfig)."""

    def __init__(
        self, dynamic: Any, field_manager: str = labels.FIELD_MANAGER, component: str = "modelfleet-operator"
    ) -> None:
        self._dyn = dynamic
        self._field_manager = field_manager
        self._component = component
        self._resources: dict[tuple[str, str], Any] = {}
        self._seq = itertools.count()

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

    def delete(self, kind: tuple[str, str], namespace: str, name: str) -> bool:
        """Delete if present; False when it was already gone."""
        try:
            self._dyn.delete(self._resource(kind), name=name, namespace=namespace)
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
        """A core/v1 Event on the ModelDeployment (what `kubectl describe md` shows).

        Failures are logged, not raised: an Event is a courtesy, status is the record.
        """
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta.name}.{time.time_ns():x}{next(self._seq)}",
                "namespace": meta.namespace,
            },
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta.name,
                "namespace": meta.namespace,
                "uid": meta.uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": self._component},
            "reportingComponent": self._component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._dyn.create(self._resource(EVENT), body=body, namespace=meta.namespace)
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("could not post event %s on %s/%s: %s", event.reason, meta.namespace, meta.name, exc)
