"""Node objects and their heartbeats: register each node, keep it Ready with Lease renewals.

The node lifecycle controller marks a node NotReady (and evicts its pods) when its Lease
stops being renewed, so these heartbeats are what keeps scheduled pods alive.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import threading
from dataclasses import dataclass, field

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

LEASE_SECONDS = 40
RENEW_EVERY = 10.0


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class NodeSpec:
    """What one node advertises."""

    name: str
    pod_cidr: str
    internal_ip: str
    kubelet_port: int
    cpu: str = "8"
    memory: str = "32Gi"
    pods: int = 110
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    version: str = "v1.36.3"

    def capacity(self) -> dict[str, str]:
        cap = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods), "ephemeral-storage": "100Gi"}
        if self.gpus:
            cap["nvidia.com/gpu"] = str(self.gpus)
        return cap

    def all_labels(self) -> dict[str, str]:
        base = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "localkube",
            "modelfleet.dev/localkube": "true",
        }
        if self.gpus:
            base["nvidia.com/gpu.present"] = "true"
        return {**base, **self.labels}

    def status(self) -> dict:
        t = now()
        cond = [
            ("Ready", "True", "KubeletReady", "localkube node agent is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
        ]
        return {
            "capacity": self.capacity(),
            "allocatable": self.capacity(),
            "conditions": [
                {"type": c, "status": st, "reason": r, "message": m, "lastHeartbeatTime": t, "lastTransitionTime": t}
                for c, st, r, m in cond
            ],
            "addresses": [{"type": "InternalIP", "address": self.internal_ip}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": self.name, "systemUUID": self.name, "bootID": self.name,
                "kernelVersion": platform.release(), "osImage": "localkube", "operatingSystem": "linux",
                "architecture": "amd64", "containerRuntimeVersion": "localkube://1",
                "kubeletVersion": self.version, "kubeProxyVersion": self.version,
            },
        }


class NodeRegistry:
    """Creates the nodes, then renews their Leases until stopped."""

    def __init__(self, api: client.ApiClient, nodes: list[NodeSpec]) -> None:
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.nodes = nodes

    def register(self) -> None:
        for n in self.nodes:
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": n.name, "labels": n.all_labels()}, "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]}}
            try:
                self.core.create_node(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self.core.patch_node(n.name, {"metadata": {"labels": n.all_labels()}})
            self.core.patch_node_status(n.name, {"status": n.status()})
            self._renew(n)
            log.info("registered node %s (pod CIDR %s, capacity %s)", n.name, n.pod_cidr, n.capacity())

    def _renew(self, n: NodeSpec) -> None:
        spec = {"holderIdentity": n.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}
        try:
            self.coord.patch_namespaced_lease(n.name, "kube-node-lease", {"spec": spec})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coord.create_namespaced_lease(
                "kube-node-lease", {"metadata": {"name": n.name}, "spec": spec}
            )

    def heartbeat(self, stop: threading.Event) -> None:
        beats = 0
        while not stop.wait(RENEW_EVERY):
            beats += 1
            for n in self.nodes:
                try:
                    self._renew(n)
                    if beats % 3 == 0:  # conditions' heartbeat times, as a kubelet's status update
                        self.core.patch_node_status(n.name, {"status": n.status()})
                except Exception as exc:
                    log.warning("heartbeat for %s failed: %s", n.name, exc)
