"""Gateway state that lives in the cluster besides models: API-key Secrets, and how many gateway
replicas share the rate limits (the ready endpoints of the gateway's own Service). Each is a
keyed store (informer.py) whose change callback derives what the gateway reads."""

from __future__ import annotations

import asyncio
from typing import Any

from modelfleet import labels

from .auth import KeyStore, keys_from_secrets
from .discovery import ready_urls
from .informer import Informer, Key, Store


class SecretKeys:
    """Keeps the KeyStore's "secrets" source equal to the labelled Secrets of one namespace."""

    def __init__(self, store: KeyStore, namespace: str) -> None:
        self.store = store
        self.namespace = namespace
        self.secrets = Store(self._on_change)

    def _on_change(self, keys: set[Key]) -> None:
        self.store.replace("secrets", keys_from_secrets(self.secrets.values()))

    def informer(self, api_client: Any, loop: asyncio.AbstractEventLoop) -> Informer:
        from kubernetes import client

        return Informer(f"secrets/{self.namespace}", self.secrets, client.CoreV1Api(api_client).list_namespaced_secret,
                        loop, namespace=self.namespace, label_selector=f"{labels.API_KEY}=true")


class GatewayPeers:
    """Counts the ready endpoints of the gateway's own Service (at least 1: this replica)."""

    def __init__(self, namespace: str, service: str) -> None:
        self.namespace = namespace
        self.service = service
        self.slices = Store(self._on_change)
        self.ready: dict[Key, int] = {}  # slice -> its ready endpoints

    def count(self) -> int:
        return max(1, sum(self.ready.values()))

    def _on_change(self, keys: set[Key]) -> None:
        for key in keys:
            obj = self.slices.objects.get(key)
            if obj is None:
                self.ready.pop(key, None)
            else:
                self.ready[key] = len(ready_urls(obj))

    def informer(self, api_client: Any, loop: asyncio.AbstractEventLoop) -> Informer:
        from kubernetes import client

        return Informer(f"peers/{self.service}", self.slices,
                        client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice, loop,
                        namespace=self.namespace, label_selector=f"kubernetes.io/service-name={self.service}")
