"""The gateway's Kubernetes calls: the API client, the demand patch, stored responses' Secrets
and its own namespace. The watches live in informer.py.
"""

from __future__ import annotations

import json
from typing import Any


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
