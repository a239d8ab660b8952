"""kube-proxy of the real node, in iptables mode: ClusterIPs from pods, NodePorts on the
host's loopback and bridge addresses.

Its rules match only this cluster's service CIDR and NodePort range, which a second
cluster on the machine must not share. The chains it writes (KUBE-*) are machine-wide
names, so one real node runs per machine; `cleanup` removes them with kube-proxy's own
`--cleanup` when the cluster stops.
"""

from __future__ import annotations

import subprocess

import yaml

from . import kubeconfig
from .config import Settings
from .controlplane import Component, http_ok
from .files import write_if_changed
from .kubelet import NODE_NAME


def render(s: Settings) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(s.state / "kube-proxy.kubeconfig")},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": str(s.network.cidr),
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{s.ports.kube_proxy_healthz}",
        "metricsBindAddress": f"127.0.0.1:{s.ports.kube_proxy_metrics}",
        # NodePorts answer on loopback (tests' way in) and the bridge, never on eth0.
        "nodePortAddresses": ["127.0.0.1/32", f"{s.network.gateway}/32"],
        "oomScoreAdj": 0,  # lowering it needs CAP_SYS_RESOURCE, which this machine lacks
        # 0 = leave the machine's conntrack settings alone (shared with everything else).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"minSyncPeriod": "1s", "syncPeriod": "30s", "localhostNodePorts": True},
    }


def component(s: Settings) -> Component:
    kubeconfig.write(s.state / "kube-proxy.kubeconfig", s.apiserver_url, s.pki, "kube-proxy")
    config = s.state / "kube-proxy.yaml"
    write_if_changed(config, yaml.safe_dump(render(s), sort_keys=False))  # kube-proxy exits on a write
    url = f"http://127.0.0.1:{s.ports.kube_proxy_healthz}/healthz"

    healthy = http_ok(url)

    return Component("kube-proxy", [str(s.k8s_bin / "kube-proxy"), f"--config={config}", "--v=1"],
                     (s.ports.kube_proxy_healthz, s.ports.kube_proxy_metrics), healthy, timeout=60)


def cleanup(s: Settings) -> None:
    """Remove every rule and chain kube-proxy wrote (its own `--cleanup`)."""
    binary = s.k8s_bin / "kube-proxy"
    if binary.exists():
        subprocess.run([str(binary), "--cleanup", "--v=0"], capture_output=True, timeout=60)
