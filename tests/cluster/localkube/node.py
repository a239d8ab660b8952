"""The real node (node kind `kubelet`): what runs around containerd, the kubelet and
kube-proxy, and everything needed to take it all away again.

`prepare` readies the host before the node's processes start: the bridge (the API server
binds to its address, so it comes first), the CNI configuration, IP forwarding (a pod's
packet to a ClusterIP is translated to another pod and routed back out of the bridge) and an
isolation chain that drops anything a pod sends that would be forwarded anywhere but the
bridge. `remove_pods` deletes every pod sandbox through the CRI while containerd still runs;
`teardown` then removes what is left even of a killed node: runc containers, containerd's
shims, mounts under the state folder, the bridge, kube-proxy's and our iptables chains, and
the sysctls `prepare` changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from . import cni, containerd, kubeproxy, network
from .config import Settings

SYSCTLS = ("net/ipv4/ip_forward", "net/ipv4/conf/all/route_localnet")


def _chain(s: Settings) -> str:
    return f"LK-FWD-{s.network.bridge}"[:28]


def _iptables(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _remember_sysctls(s: Settings) -> None:
    """Save the values of the sysctls the node changes (kube-proxy sets route_localnet for
    loopback NodePorts), once, so `teardown` can put them back."""
    saved = s.run / "sysctls"
    if not saved.exists():
        s.run.mkdir(parents=True, exist_ok=True)
        saved.write_text("".join(f"{k} {Path('/proc/sys', k).read_text().strip()}\n" for k in SYSCTLS))


def _restore_sysctls(s: Settings) -> None:
    saved = s.run / "sysctls"
    if saved.exists():
        for line in saved.read_text().splitlines():
            key, value = line.split()
            Path("/proc/sys", key).write_text(value)
        saved.unlink()


def _isolate(s: Settings) -> None:
    """FORWARD: packets from the bridge may go back to the bridge (a pod reaching another
    through a ClusterIP), nowhere else."""
    chain, br = _chain(s), s.network.bridge
    _iptables("-N", chain)
    _iptables("-F", chain, check=True)
    _iptables("-A", chain, "-o", br, "-j", "ACCEPT", check=True)
    _iptables("-A", chain, "-j", "DROP", check=True)
    if _iptables("-C", "FORWARD", "-i", br, "-j", chain).returncode != 0:
        _iptables("-I", "FORWARD", "-i", br, "-j", chain, check=True)


def prepare(s: Settings) -> None:
    network.ensure_bridge(s.network)
    cni.write(s)
    _remember_sysctls(s)
    _isolate(s)
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")


def remove_pods(s: Settings) -> None:
    """Stop and remove every pod sandbox (and its containers, network and mounts) through the
    CRI, as a kubelet would; containerd must still be running."""
    crictl = s.k8s_bin / "crictl"
    sock = containerd.socket(s)
    if crictl.exists() and sock.exists():
        subprocess.run([str(crictl), "--runtime-endpoint", f"unix://{sock}", "--timeout", "20s", "rmp", "-fa"],
                       capture_output=True, timeout=120)


def _runc_root(s: Settings) -> Path:
    return containerd.home(s) / "runc"


def _kill_containers(s: Settings) -> None:
    """Containers whose shim died with containerd (a killed cluster): runc still knows them."""
    root = _runc_root(s) / "k8s.io"
    if not root.is_dir():
        return
    runc = [containerd.RUNC, "--root", str(root)]
    for entry in root.iterdir():
        subprocess.run([*runc, "kill", "--all", entry.name, "KILL"], capture_output=True, timeout=30)
        subprocess.run([*runc, "delete", "--force", entry.name], capture_output=True, timeout=30)


def _task_ids(s: Settings) -> list[str]:
    """Every container and sandbox containerd ran a task for (its state outlives a kill)."""
    tasks = containerd.home(s) / "state" / "io.containerd.runtime.v2.task" / "k8s.io"
    runc = _runc_root(s) / "k8s.io"
    return sorted({p.name for d in (tasks, runc) if d.is_dir() for p in d.iterdir()})


def _remove_machine_wide_leftovers(s: Settings, ids: list[str]) -> None:
    """What containerd keeps outside its own folders, named after our containers: libcni's
    cached results (/var/lib/cni/results) and killed shims' sockets (/run/containerd/s, named
    by a hash of containerd's address, the namespace and the id)."""
    results = Path("/var/lib/cni/results")
    for cached in results.glob(f"{cni.network_name(s)}-*"):
        cached.unlink(missing_ok=True)
    for task_id in ids:
        for cached in results.glob(f"*-{task_id}-*"):
            cached.unlink(missing_ok=True)
        path = f"{containerd.socket(s)}/k8s.io/{task_id}"
        for name in (path, f"{path}/debug"):
            Path("/run/containerd/s", hashlib.sha256(name.encode()).hexdigest()).unlink(missing_ok=True)
    for empty in (Path("/run/containerd/s"), Path("/run/containerd"), results, results.parent):
        try:
            empty.rmdir()  # only if empty: someone else's files stay
        except OSError:
            pass


def _kill_shims(s: Settings) -> None:
    """containerd's shims run in sessions of their own, so stopping containerd's process
    group leaves them; ours name our socket on their command line."""
    sock = str(containerd.socket(s)).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and sock in cmd:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4].replace("\\040", " ") for line in fh]
    return sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True)


def _unmount(s: Settings) -> None:
    for point in (*mounts_under(s.state), *mounts_under(containerd.root(s))):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _remove_iptables(s: Settings) -> None:
    """kube-proxy's chains (its own --cleanup), the kubelet's KUBE-* canaries, our chain."""
    kubeproxy.cleanup(s)
    chain, br = _chain(s), s.network.bridge
    while _iptables("-D", "FORWARD", "-i", br, "-j", chain).returncode == 0:
        pass
    _iptables("-F", chain)
    _iptables("-X", chain)
    for tool in ("iptables", "ip6tables"):
        for table in ("mangle", "nat", "filter"):
            rules = subprocess.run([tool, "-w", "10", "-t", table, "-S"], capture_output=True, text=True).stdout
            chains = [ln.split()[1] for ln in rules.splitlines() if ln.startswith("-N KUBE-")]
            for ln in rules.splitlines():
                if ln.startswith("-A ") and any(f"-j {c}" in ln for c in chains):
                    subprocess.run([tool, "-w", "10", "-t", table, "-D", *ln.split()[1:]], capture_output=True)
            for c in chains:
                subprocess.run([tool, "-w", "10", "-t", table, "-F", c], capture_output=True)
            for c in chains:
                subprocess.run([tool, "-w", "10", "-t", table, "-X", c], capture_output=True)


def _remove_cgroups() -> None:
    """The kubelet's pod cgroups (kubepods/...) in every v1 hierarchy, deepest first; only
    empty ones can go, and nothing else on this machine makes a `kubepods` tree."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "kubepods"
        if top.is_dir():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                top.rmdir()
            except OSError:
                pass


def teardown(s: Settings) -> None:
    """Remove everything of the node that outlives its processes; safe to run twice."""
    ids = _task_ids(s)
    _kill_containers(s)
    _kill_shims(s)
    _unmount(s)
    netns = containerd.home(s) / "state" / "netns"
    left = mounts_under(s.state)
    if not left:
        for path in (netns, s.state / "kubelet" / "pods", s.state / "cni" / "ipam"):
            shutil.rmtree(path, ignore_errors=True)
    _remove_machine_wide_leftovers(s, ids)
    _remove_cgroups()
    if shutil.which("iptables"):
        _remove_iptables(s)
    _restore_sysctls(s)
    network.delete_bridge(s.network)
