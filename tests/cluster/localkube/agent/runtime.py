"""What every pod worker shares: the API client, the pod network's address pool, paths, and
the environment every container starts from."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..config import Settings
from .container import now
from .env import service_links
from .nodes import NodeSpec
from .store import Store

log = logging.getLogger(__name__)

PASS_THROUGH = ("HOME", "LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
    """Call a client method and read the raw response: an unread response keeps its
    connection checked out, and the API server then logs the request as aborted."""
    return fn(*args, _preload_content=False, **kwargs).data


class AddressPool:
    """Pod IPs of one node's /24 (.2 and up; .1 is never used so a node CIDR never collides
    with the bridge address)."""

    def __init__(self, cidr: ipaddress.IPv4Network) -> None:
        self._free = [str(ip) for ip in list(cidr.hosts())[1:]]
        self._used: dict[str, str] = {}
        self._lock = threading.Lock()

    def allocate(self, uid: str, preferred: str | None = None) -> str:
        """A free address; `preferred` (the IP a restarted agent finds in the pod's status,
        which the API server will not let change) when it is free."""
        with self._lock:
            if uid in self._used:
                return self._used[uid]
            if not self._free:
                raise RuntimeError("pod CIDR exhausted")
            ip = preferred if preferred in self._free else self._free[0]
            self._free.remove(ip)
            self._used[uid] = ip
            return ip

    def release(self, uid: str) -> None:
        with self._lock:
            ip = self._used.pop(uid, None)
            if ip:
                self._free.append(ip)


@dataclass
class Runtime:
    settings: Settings
    api: client.ApiClient
    nodes: dict[str, NodeSpec]
    pools: dict[str, AddressPool]
    backoff_base: float = 2.0
    backoff_cap: float = 60.0
    services: Store | None = None  # for the service-link variables
    launcher: Path = field(default_factory=lambda: Path(__file__).with_name("launcher.py"))

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def pods_dir(self) -> Path:
        return self.settings.state / "pods"

    def base_env(self, pod: dict) -> dict[str, str]:
        """What a container's image and the kubelet would give it before the pod's env."""
        gw, port = str(self.settings.network.gateway), str(self.settings.ports.apiserver)
        env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        if self.services is not None and pod["spec"].get("enableServiceLinks", True):
            env.update(service_links(self.services.items(), pod["metadata"]["namespace"]))
        env.update({
            "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": pod["metadata"]["name"],
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": gw,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{gw}:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://{gw}:{port}",
            f"KUBERNETES_PORT_{port}_TCP_ADDR": gw,
            f"KUBERNETES_PORT_{port}_TCP_PORT": port,
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
        })
        return env

    def read_object(self, kind: str, ns: str, name: str) -> dict | None:
        """A ConfigMap or Secret as the API's dict, or None if it does not exist."""
        fn = self.core.read_namespaced_config_map if kind == "configmap" else self.core.read_namespaced_secret
        try:
            return json.loads(fn(name, ns, _preload_content=False).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def claim_path(self, ns: str, claim: str) -> str:
        """Host folder behind a bound claim (hostPath or local PersistentVolumes)."""
        from .volumes import VolumeError

        try:
            pvc = json.loads(call(self.core.read_namespaced_persistent_volume_claim, claim, ns))
            if not pvc["spec"].get("volumeName") or (pvc.get("status") or {}).get("phase") != "Bound":
                raise VolumeError(f"persistentvolumeclaim {claim!r} is not bound yet")
            pv = json.loads(call(self.core.read_persistent_volume, pvc["spec"]["volumeName"]))
        except ApiException as exc:
            raise VolumeError(f"persistentvolumeclaim {claim!r}: {exc.reason}") from exc
        source = pv["spec"].get("hostPath") or pv["spec"].get("local")
        if not source:
            raise VolumeError(f"persistentvolume {pv['metadata']['name']!r} is neither hostPath nor local")
        Path(source["path"]).mkdir(parents=True, exist_ok=True)
        return source["path"]

    def token(self, pod: dict, sa: str, audience: str | None, seconds: int) -> str:
        meta = pod["metadata"]
        body = {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience] if audience else [], "expirationSeconds": seconds,
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}},
        }
        resp = self.core.create_namespaced_service_account_token(sa, meta["namespace"], body, _preload_content=False)
        return json.loads(resp.data)["status"]["token"]

    def event(self, pod: dict, kind: str, reason: str, message: str) -> None:
        """Best effort, like the kubelet's recorder: `kubectl describe pod` shows these."""
        meta = pod["metadata"]
        ts = now()
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"kind": "Pod", "namespace": meta["namespace"], "name": meta["name"],
                               "uid": meta["uid"], "apiVersion": "v1"},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": ts, "lastTimestamp": ts,
            "source": {"component": "localkube-agent", "host": pod["spec"].get("nodeName", "")},
        }
        try:
            call(self.core.create_namespaced_event, meta["namespace"], body)
        except Exception as exc:
            log.debug("event %s for %s failed: %s", reason, meta["name"], exc)
