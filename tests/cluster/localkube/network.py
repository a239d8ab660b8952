"""The pod network: one bridge on the host and one network namespace + veth per pod.

Like the CNI bridge plugin, minus everything a test bed does not need. Pods get an address
on the pod CIDR and no default route: they reach each other and the bridge address (where
the API server is forwarded), and nothing else. Only interfaces created here ever carry the
pod CIDR, and `teardown` removes all of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from .config import Network


class NetworkError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def ensure_bridge(net: Network) -> None:
    """Create the bridge with the gateway address; a no-op if it is already there."""
    if _ip("link", "show", net.bridge, check=False).returncode != 0:
        _ip("link", "add", net.bridge, "type", "bridge")
    addr = f"{net.gateway}/{net.cidr.prefixlen}"
    if addr not in _ip("-4", "addr", "show", "dev", net.bridge).stdout:
        _ip("addr", "add", addr, "dev", net.bridge)
    _ip("link", "set", net.bridge, "up")


def delete_bridge(net: Network) -> None:
    if _ip("link", "show", net.bridge, check=False).returncode == 0:
        _ip("link", "delete", net.bridge, check=False)


def bridge_up(net: Network) -> bool:
    return f"{net.gateway}/" in _ip("-4", "addr", "show", "dev", net.bridge, check=False).stdout


def netns_name(net: Network, pod_uid: str) -> str:
    return f"{net.netns_prefix}{pod_uid[:18]}"


def _attach(net: Network, ns: str, host_if: str, ip: str, route: list[str]) -> None:
    """Create namespace `ns` with eth0 (`ip` on the pod CIDR) wired into the bridge through a
    veth whose host end is `host_if`, plus one route; on failure nothing is left."""
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", host_if, "master", net.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/{net.cidr.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", *route)
    except NetworkError:
        kill_netns(ns)
        _ip("netns", "delete", ns, check=False)  # its veth goes with it
        raise


def create_pod_netns(net: Network, pod_uid: str, ip: str) -> str:
    """Namespace + veth pair for one pod; returns the namespace name. The only route besides
    the pod CIDR sends the service CIDR to the services namespace."""
    ns = netns_name(net, pod_uid)
    delete_pod_netns(net, pod_uid)
    _attach(net, ns, f"{net.veth_prefix}{pod_uid.replace('-', '')[:10]}", ip,
            [net.service_cidr, "via", str(net.service_host)])
    return ns


def ensure_service_netns(net: Network) -> str:
    """The namespace where ClusterIPs live: every address of the service CIDR is local there
    (an AnyIP route), so one listener per port sees each Service's traffic with its
    ClusterIP as the local address. Pods route the service CIDR to it over the bridge."""
    ns = net.service_netns
    if not Path(f"/run/netns/{ns}").exists():
        _attach(net, ns, f"{net.veth_prefix}svc", str(net.service_host), ["local", net.service_cidr, "dev", "lo"])
    return ns


def netns_pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_netns(ns: str) -> None:
    for pid in netns_pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete_pod_netns(net: Network, pod_uid: str) -> None:
    """Remove a pod's namespace; its veth goes with it."""
    ns = netns_name(net, pod_uid)
    if Path(f"/run/netns/{ns}").exists():
        kill_netns(ns)
        _ip("netns", "delete", ns, check=False)


def list_netns(net: Network) -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(net.netns_prefix)]


def teardown(net: Network) -> None:
    """Kill whatever still runs in a pod namespace, delete the namespaces, veths and bridge."""
    for ns in list_netns(net):
        kill_netns(ns)
        _ip("netns", "delete", ns, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(net.veth_prefix):
            _ip("link", "delete", name, check=False)
    if _ip("link", "show", net.bridge, check=False).returncode == 0:
        _ip("link", "delete", net.bridge, check=False)
