"""The kubelet of the real node: its configuration, client identity and process.

One node, `localkube-0`, at the bridge address (its InternalIP, where the API server calls
its API for logs, exec, attach and port-forward). The kubelet serves that API with the
harness CA's `kubelet` certificate and authenticates the API server by client certificate.
Settings this machine needs, and why:

- `failCgroupV1: false`, `cgroupDriver: cgroupfs`: cgroups are hybrid v1 and there is no
  systemd; Kubernetes 1.35+ refuses v1 unless told otherwise.
- `oomScoreAdj: 0`: the kubelet may not lower its own OOM score (no CAP_SYS_RESOURCE).
- Eviction thresholds and image GC effectively off: the disk is shared with other work, and
  a test must never see its pods evicted or its local images deleted because of it.
- `resolvConf: ""`: pods get the cluster DNS and search path only, never the host's.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from . import containerd, kubeconfig
from .config import Settings
from .controlplane import Component, http_ok
from .files import write_if_changed

NODE_NAME = "localkube-0"


def root_dir(s: Settings) -> Path:
    return s.state / "kubelet"


def labels() -> list[str]:
    """The agent's node labels: modelfleet.dev/localkube=true plus MODELFLEET_CLUSTER_NODE_LABELS."""
    extra = [x for x in os.environ.get("MODELFLEET_CLUSTER_NODE_LABELS", "").split(",") if "=" in x]
    return ["modelfleet.dev/localkube=true", *extra]


def render(s: Settings) -> dict:
    pki = s.pki
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": str(s.network.gateway),
        "port": s.ports.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": s.ports.kubelet_healthz,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet.key"),
        "containerRuntimeEndpoint": f"unix://{containerd.socket(s)}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "oomScoreAdj": 0,
        "clusterDomain": "cluster.local",
        "clusterDNS": [s.network.dns_service_ip],
        "resolvConf": "",
        "podLogsDir": str(s.logs / "pods"),
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%",
                         "imagefs.available": "1%", "imagefs.inodesFree": "1%"},
        "serializeImagePulls": False,
        "maxPods": 110,
    }


def component(s: Settings) -> Component:
    root = root_dir(s)
    root.mkdir(parents=True, exist_ok=True)
    (s.logs / "pods").mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    write_if_changed(config, yaml.safe_dump(render(s), sort_keys=False))
    kc = kubeconfig.write(s.state / "kubelet.kubeconfig", s.apiserver_url, s.pki, "kubelet-client")
    url = f"http://127.0.0.1:{s.ports.kubelet_healthz}/healthz"

    healthy = http_ok(url)

    argv = [
        str(s.k8s_bin / "kubelet"), f"--config={config}", f"--kubeconfig={kc}", f"--root-dir={root}",
        f"--node-ip={s.network.gateway}", f"--hostname-override={NODE_NAME}",
        f"--node-labels={','.join(labels())}", "--v=1",
    ]
    return Component("kubelet", argv, (s.ports.kubelet_healthz,), healthy, timeout=60)
