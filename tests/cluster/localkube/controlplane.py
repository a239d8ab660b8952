"""Command lines and health checks of the control-plane components.

Flags are chosen for a small, fast, single-member test cluster: etcd without fsync, the API
server on loopback only (pods reach it through the node agent's forwarder on the bridge
address, which is what it advertises and certifies), no leader election, RBAC on.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from .config import Settings


@dataclass(frozen=True)
class Component:
    """One process of the cluster: how to run it, which loopback ports it needs, how to tell
    it is healthy, and how long it may take to get there."""

    name: str
    argv: list[str]
    ports: tuple[int, ...]
    healthy: Callable[[], bool]
    timeout: float = 90.0
    # Run once it is healthy, before the next component starts (containerd: import images).
    after: Callable[[], object] | None = None


def _get(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read()
    except OSError:
        return 0, b""


def http_ok(url: str) -> Callable[[], bool]:
    """A health check: `url` answers 200 (a node component's plain-HTTP /healthz)."""
    return lambda: _get(url)[0] == 200


def _insecure() -> ssl.SSLContext:
    # controller-manager and scheduler serve /healthz on self-signed certificates.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def etcd(s: Settings) -> Component:
    client = f"http://127.0.0.1:{s.ports.etcd_client}"
    peer = f"http://127.0.0.1:{s.ports.etcd_peer}"

    def healthy() -> bool:
        status, body = _get(f"{client}/health")
        return status == 200 and json.loads(body or b"{}").get("health") == "true"

    return Component(
        "etcd",
        [
            str(s.k8s_bin / "etcd"), "--name", "localkube", "--data-dir", str(s.state / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"localkube={peer}", "--unsafe-no-fsync", "--log-level", "warn",
        ],
        (s.ports.etcd_client, s.ports.etcd_peer),
        healthy,
        timeout=30,
    )


def apiserver(s: Settings) -> Component:
    pki = s.pki
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))

    def healthy() -> bool:
        return _get(f"{s.apiserver_url}/readyz", ctx)[0] == 200

    return Component(
        "kube-apiserver",
        [
            str(s.k8s_bin / "kube-apiserver"),
            f"--bind-address={s.api_host}", f"--secure-port={s.ports.apiserver}",
            f"--advertise-address={s.network.gateway}",
            f"--service-node-port-range={s.network.node_port_range}",
            f"--etcd-servers=http://127.0.0.1:{s.ports.etcd_client}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={s.network.service_cidr}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            # Webhooks and aggregated APIs are called at endpoint (pod) IPs: ClusterIPs exist
            # only inside the pods' network, not where the API server runs.
            "--enable-aggregator-routing=true",
            "--enable-priority-and-fairness=false", "--profiling=false", "--v=1",
        ],
        (s.ports.apiserver,),
        healthy,
        timeout=120,
    )


def _component_kubeconfig_flags(s: Settings, stem: str) -> list[str]:
    kc = str(s.state / f"{stem}.kubeconfig")
    return [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}"]


def controller_manager(s: Settings) -> Component:
    url = f"https://127.0.0.1:{s.ports.controller_manager}/healthz"
    return Component(
        "kube-controller-manager",
        [
            str(s.k8s_bin / "kube-controller-manager"),
            *_component_kubeconfig_flags(s, "controller-manager"),
            "--bind-address=127.0.0.1", f"--secure-port={s.ports.controller_manager}",
            f"--service-account-private-key-file={s.pki / 'sa.key'}",
            f"--root-ca-file={s.pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={s.pki / 'ca.crt'}", f"--cluster-signing-key-file={s.pki / 'ca.key'}",
            "--use-service-account-credentials=true", "--leader-elect=false",
            # All default controllers (deployment, replicaset, endpointslice, garbagecollector,
            # namespace, serviceaccount, ...); node IPAM idles: the agent sets each podCIDR.
            "--controllers=*", "--allocate-node-cidrs=false",
            f"--service-cluster-ip-range={s.network.service_cidr}",
            "--profiling=false", "--v=1",
        ],
        (s.ports.controller_manager,),
        lambda: _get(url, _insecure())[0] == 200,
    )


def scheduler(s: Settings) -> Component:
    url = f"https://127.0.0.1:{s.ports.scheduler}/healthz"
    return Component(
        "kube-scheduler",
        [
            str(s.k8s_bin / "kube-scheduler"),
            *_component_kubeconfig_flags(s, "scheduler"),
            "--bind-address=127.0.0.1", f"--secure-port={s.ports.scheduler}",
            "--leader-elect=false", "--profiling=false", "--v=1",
        ],
        (s.ports.scheduler,),
        lambda: _get(url, _insecure())[0] == 200,
    )
