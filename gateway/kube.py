"""The gateway's only Kubernetes I/O: list+watch loops on threads, and the demand patch.

The official client is synchronous, so each watched resource gets a daemon thread that lists,
watches from the list's resourceVersion, re-lists when the API server answers 410 Gone (an
expired watch) and backs off on any other error (an API server restart), then hands plain dict
events to the event loop. kopf's watchers serve an operator's handlers, not a proxy's cache,
which is why this small loop is ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
Event = tuple[str, dict[str, Any]]  # ("SYNC", {"items": [...]}) or ("ADDED"|"MODIFIED"|"DELETED", obj)


def load_config() -> Any:
    """In-cluster configuration in a pod, the kubeconfig elsewhere (tests, laptops)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Informer:
    """List + watch one resource; delivers events to `deliver` on the event loop."""

    def __init__(self, name: str, list_fn: Callable[..., Any], deliver: Callable[[str, dict], None],
                 loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        self.name = name
        self.list_fn = list_fn
        self.deliver = deliver
        self.loop = loop
        self.kwargs = kwargs
        self.stopping = threading.Event()
        self.synced = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def _send(self, kind: str, obj: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.deliver, kind, obj)
        except RuntimeError:
            self.stopping.set()  # the loop is gone

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = 0.5
        while not self.stopping.is_set():
            try:
                raw = self.list_fn(_preload_content=False, **self.kwargs)
                listing = json.loads(raw.data)
                self._send("SYNC", listing)
                self.synced.set()
                version = listing["metadata"]["resourceVersion"]
                backoff = 0.5
                while not self.stopping.is_set():
                    w = watch.Watch()
                    for event in w.stream(self.list_fn, resource_version=version, timeout_seconds=120,
                                          allow_watch_bookmarks=True, deserialize=False, **self.kwargs):
                        obj = event.get("object") or {}
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self._send(event["type"], obj)
                        if self.stopping.is_set():
                            w.stop()
                            break
            except ApiException as exc:
                if exc.status == 410:
                    log.info("%s watch expired; listing again", self.name)
                    continue
                log.warning("%s watch failed (%s); retrying in %.1fs", self.name, exc.status, backoff)
            except Exception as exc:  # noqa: BLE001 - connection resets, API server restarts
                log.warning("%s watch failed (%s); retrying in %.1fs", self.name, exc, backoff)
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 10.0)


def patch_annotation(api_client: Any, namespace: str, name: str, key: str, value: str) -> None:
    """Merge-patches one annotation on a ModelDeployment (the scale-from-zero demand signal)."""
    from kubernetes import client

    from modelfleet.api import GROUP, PLURAL, VERSION

    body = {"metadata": {"annotations": {key: value}}}
    client.CustomObjectsApi(api_client).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)


# Stored responses (responses_store.py): one Secret each. Plain dicts in and out, as above.
METADATA_ONLY = {"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"}
CALL_TIMEOUT = 10.0  # seconds; a request waits on these calls


def create_secret(api_client: Any, namespace: str, body: dict[str, Any]) -> None:
    from kubernetes import client

    client.CoreV1Api(api_client).create_namespaced_secret(namespace, body, _request_timeout=CALL_TIMEOUT)


def read_secret(api_client: Any, namespace: str, name: str) -> dict[str, Any] | None:
    """The Secret as a dict, None if there is none."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        raw = client.CoreV1Api(api_client).read_namespaced_secret(name, namespace, _preload_content=False,
                                                                  _request_timeout=CALL_TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return json.loads(raw.data)


def delete_secret(api_client: Any, namespace: str, name: str) -> bool:
    """False if it was already gone (another replica pruned it)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.CoreV1Api(api_client).delete_namespaced_secret(name, namespace, _request_timeout=CALL_TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def list_secret_metadata(api_client: Any, namespace: str, selector: str) -> list[dict[str, Any]]:
    """Only the metadata of the selected Secrets (PartialObjectMetadataList): a prune must not
    fetch every stored conversation to read their expiry labels."""
    from kubernetes import client

    raw = client.CoreV1Api(api_client).list_namespaced_secret(
        namespace, label_selector=selector, _preload_content=False, _headers=METADATA_ONLY,
        _request_timeout=CALL_TIMEOUT * 3)
    return json.loads(raw.data).get("items") or []


def own_namespace() -> str:
    """The pod's namespace (downward API or the service-account file), else "default"."""
    import os

    ns = os.environ.get("POD_NAMESPACE")
    if ns:
        return ns
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"


def wait_synced(informers: list[Informer], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in informers)
