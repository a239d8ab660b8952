"""Gateway state that lives in the cluster besides models: API-key Secrets, and how many gateway
replicas share the rate limits (the ready endpoints of the gateway's own Service)."""

from __future__ import annotations

import asyncio
from typing import Any

from modelfleet import labels

from .auth import KeyStore, keys_from_secrets
from .discovery import ready_urls
from .kube import Informer


class SecretKeys:
    """Keeps the KeyStore's "secrets" source equal to the labelled Secrets of one namespace."""

    def __init__(self, store: KeyStore, namespace: str) -> None:
        self.store = store
        self.namespace = namespace
        self.secrets: dict[str, dict[str, Any]] = {}

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "SYNC":
            self.secrets = {s["metadata"]["name"]: s for s in obj.get("items", [])}
        elif kind == "DELETED":
            self.secrets.pop(obj["metadata"]["name"], None)
        else:
            self.secrets[obj["metadata"]["name"]] = obj
        self.store.replace("secrets", keys_from_secrets(self.secrets.values()))

    def informer(self, api_client: Any, loop: asyncio.AbstractEventLoop) -> Informer:
        from kubernetes import client

        return Informer(f"secrets/{self.namespace}", client.CoreV1Api(api_client).list_namespaced_secret,
                        self.on_event, loop, namespace=self.namespace, label_selector=f"{labels.API_KEY}=true")


class GatewayPeers:
    """Counts the ready endpoints of the gateway's own Service (at least 1: this replica)."""

    def __init__(self, namespace: str, service: str) -> None:
        self.namespace = namespace
        self.service = service
        self.slices: dict[str, int] = {}

    def count(self) -> int:
        return max(1, sum(self.slices.values()))

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "SYNC":
            self.slices = {s["metadata"]["name"]: len(ready_urls(s)) for s in obj.get("items", [])}
        elif kind == "DELETED":
            self.slices.pop(obj["metadata"]["name"], None)
        else:
            self.slices[obj["metadata"]["name"]] = len(ready_urls(obj))

    def informer(self, api_client: Any, loop: asyncio.AbstractEventLoop) -> Informer:
        from kubernetes import client

        return Informer(f"peers/{self.service}", client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice,
                        self.on_event, loop, namespace=self.namespace,
                        label_selector=f"kubernetes.io/service-name={self.service}")
