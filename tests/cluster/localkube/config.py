"""Where the cluster lives and which addresses it uses: one typed value, read once.

Every other module takes a Settings instead of reading the environment, so tests and the
command line can point a cluster at another state folder or other ports.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
CLUSTER_DIR = Path(__file__).resolve().parents[1]


def _versions() -> dict[str, str]:
    """Read tests/cluster/versions.env (shared with the shell build script)."""
    out: dict[str, str] = {}
    for line in (CLUSTER_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _port(name: str, default: int) -> int:
    return int(os.environ.get(f"MODELFLEET_CLUSTER_{name}_PORT", default))


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the control plane; fixed so a second `cluster-up` finds the first."""

    etcd_client: int = field(default_factory=lambda: _port("ETCD", 23790))
    etcd_peer: int = field(default_factory=lambda: _port("ETCD_PEER", 23800))
    apiserver: int = field(default_factory=lambda: _port("APISERVER", 6443))
    controller_manager: int = field(default_factory=lambda: _port("CONTROLLER_MANAGER", 10257))
    scheduler: int = field(default_factory=lambda: _port("SCHEDULER", 10259))
    ingress: int = field(default_factory=lambda: _port("INGRESS", 8480))
    # The real node (node kind `kubelet`): the kubelet's API on the node address, its
    # healthz and kube-proxy's on loopback. Kubernetes' own defaults.
    kubelet: int = field(default_factory=lambda: _port("KUBELET", 10250))
    kubelet_healthz: int = field(default_factory=lambda: _port("KUBELET_HEALTHZ", 10248))
    kube_proxy_metrics: int = field(default_factory=lambda: _port("KUBE_PROXY_METRICS", 10249))
    kube_proxy_healthz: int = field(default_factory=lambda: _port("KUBE_PROXY_HEALTHZ", 10256))


@dataclass(frozen=True)
class Network:
    """The pod network. It exists only on interfaces the harness creates (bridge + veths),
    and pods get no default route, so no pod packet can leave this machine's namespaces."""

    bridge: str = os.environ.get("MODELFLEET_CLUSTER_BRIDGE", "mfk0")
    # The bridge's own address: the node's InternalIP and the API server's advertised address.
    cidr: ipaddress.IPv4Network = ipaddress.IPv4Network(
        os.environ.get("MODELFLEET_CLUSTER_POD_CIDR", "10.244.0.0/16")
    )
    service_cidr: str = os.environ.get("MODELFLEET_CLUSTER_SERVICE_CIDR", "10.96.0.0/16")
    # NodePorts; a second cluster on this machine needs a range of its own, since the real
    # node's kube-proxy answers them on every local address, loopback included.
    node_port_range: str = os.environ.get("MODELFLEET_CLUSTER_NODEPORT_RANGE", "30000-32767")
    netns_prefix: str = "mfk-"
    veth_prefix: str = "mfkv"

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.cidr.network_address + 1

    @property
    def service_host(self) -> ipaddress.IPv4Address:
        """Address of the services namespace: ClusterIP proxy and cluster DNS."""
        return self.cidr.network_address + 2

    @property
    def service_netns(self) -> str:
        return f"{self.netns_prefix}services"

    def node_cidr(self, index: int) -> ipaddress.IPv4Network:
        """Node `index` (0-based) allocates pod IPs from the /24 number index+1."""
        return ipaddress.IPv4Network(f"{self.cidr.network_address + 256 * (index + 1)}/24")

    @property
    def first_service_ip(self) -> str:
        return str(ipaddress.IPv4Network(self.service_cidr).network_address + 1)

    @property
    def dns_service_ip(self) -> str:
        """The cluster DNS Service's ClusterIP (kube-dns), the tenth address as kubeadm has it."""
        return str(ipaddress.IPv4Network(self.service_cidr).network_address + 10)


@dataclass(frozen=True)
class Settings:
    """Paths, versions, ports and network of one local cluster."""

    state: Path = field(default_factory=lambda: Path(os.environ.get("MODELFLEET_CLUSTER_DIR", REPO_ROOT / ".cluster")))
    cache: Path = field(
        default_factory=lambda: Path(os.environ.get("MODELFLEET_CACHE", Path.home() / ".cache" / "modelfleet"))
    )
    ports: Ports = field(default_factory=Ports)
    network: Network = field(default_factory=Network)
    versions: dict[str, str] = field(default_factory=_versions)
    nodes: int = field(default_factory=lambda: int(os.environ.get("MODELFLEET_CLUSTER_NODES", "1")))
    gpus_per_node: int = field(default_factory=lambda: int(os.environ.get("MODELFLEET_CLUSTER_GPUS", "0")))
    python: str = sys.executable
    # `agent`: the Python process agent (localkube/agent) runs pods as host processes.
    # `kubelet`: a real node, containerd + kubelet + kube-proxy + CNI bridge (localkube/node.py).
    node_kind: str = field(default_factory=lambda: os.environ.get("MODELFLEET_CLUSTER_NODE_KIND", "agent"))

    @property
    def k8s_bin(self) -> Path:
        return self.cache / "k8s" / self.versions["K8S_VERSION"] / "bin"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def run(self) -> Path:
        """Pid files of every process the harness started."""
        return self.state / "run"

    @property
    def bin(self) -> Path:
        """kubectl and helm, linked from the cache; .cluster/env puts this on PATH."""
        return self.state / "bin"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def api_host(self) -> str:
        """Where the API server listens. The real node's pods reach it at the bridge address
        (the `kubernetes` Service's endpoint), so there it binds to that address alone;
        the agent forwards the bridge address to a loopback-only API server itself."""
        return str(self.network.gateway) if self.node_kind == "kubelet" else "127.0.0.1"

    @property
    def apiserver_url(self) -> str:
        return f"https://{self.api_host}:{self.ports.apiserver}"

    @property
    def ingress_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.ingress}"
