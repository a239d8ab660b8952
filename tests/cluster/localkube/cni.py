"""The real node's pod network: one CNI bridge configuration for containerd.

The bridge and host-local plugins Debian ships (/usr/lib/cni) wire each pod to the bridge
the harness made (its address is the node's InternalIP and the API server's). Pods get two
routes only, the pod CIDR on the link and the service CIDR through the bridge address, where
kube-proxy's rules translate ClusterIPs: no default route, so no pod packet is meant for
anything but the cluster; `node.isolate` drops whatever tries to be forwarded elsewhere.
IP allocations are kept under the state folder, not in the machine-wide /var/lib/cni.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Settings
from .files import write_if_changed

PLUGIN_DIR = "/usr/lib/cni"


def conf_dir(s: Settings) -> Path:
    return s.state / "cni" / "net.d"


def network_name(s: Settings) -> str:
    return f"localkube-{s.network.bridge}"


def render(s: Settings) -> dict:
    net = s.network
    pods = net.node_cidr(0)
    return {
        "cniVersion": "1.0.0",
        "name": network_name(s),
        "plugins": [{
            "type": "bridge",
            "bridge": net.bridge,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{
                    "subnet": str(net.cidr),
                    "rangeStart": str(pods.network_address + 2),
                    "rangeEnd": str(pods.broadcast_address - 1),
                    "gateway": str(net.gateway),
                }]],
                "routes": [{"dst": net.service_cidr}],
                "dataDir": str(s.state / "cni" / "ipam"),
            },
        }],
    }


def write(s: Settings) -> Path:
    d = conf_dir(s)
    path = d / "10-localkube.conflist"
    for old in d.glob("*.conflist"):
        if old != path:
            old.unlink()
    write_if_changed(path, json.dumps(render(s), indent=2) + "\n")
    return path
