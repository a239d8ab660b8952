"""Bring the whole local cluster up or down, all or nothing.

`up` is idempotent (a healthy cluster is left as it is) and transactional: the first
component that cannot start stops everything started so far and raises one ClusterError
naming the component and its log file. `down` stops every process, deletes every pod
namespace, veth and the bridge, and the cluster's data (certificates and logs stay).
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from . import (
    containerd,
    controlplane,
    coredns,
    hostcontrollers,
    kubeconfig,
    kubelet,
    kubeproxy,
    network,
    nginxconf,
    node,
    pki,
    procs,
)
from .config import Settings

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# Started in this order, stopped in reverse.
ORDER = (*CONTROL_PLANE, "nginx", "node-agent")
# The real node: its ingress (nginx, fed by the host-side controllers) and PVC provisioner
# run on the host beside it, as the agent runs them in its own process.
NODE_ORDER = (*CONTROL_PLANE, "containerd", "kubelet", "kube-proxy", "nginx", hostcontrollers.NAME)
NODE_BINARIES = ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "crictl", "pause", "coredns")


def order(s: Settings) -> tuple[str, ...]:
    return NODE_ORDER if s.node_kind == "kubelet" else ORDER


class ClusterError(RuntimeError):
    """One line for the user: what failed, and where to look."""


def say(msg: str) -> None:
    print(f"[cluster-up] {msg}", flush=True)


def _log(s: Settings, name: str) -> str:
    return os.path.relpath(s.logs / f"{name}.log")


def _wait(s: Settings, name: str, healthy: Callable[[], bool], timeout: float, what: str = "") -> None:
    """Poll `healthy`, failing early if process `name` died; shows progress every 10 s.
    `what` names what is awaited when it is not the process itself (CoreDNS, on the kubelet)."""
    what = what or name
    start = time.monotonic()
    next_note = start + 10
    while not healthy():
        now = time.monotonic()
        if not procs.alive(procs.read_pid(s.run, name)):
            raise ClusterError(f"{name} exited during start-up (see {_log(s, name)})")
        if now - start > timeout:
            raise ClusterError(f"{what} did not become healthy within {timeout:.0f}s (see {_log(s, name)})")
        if now > next_note:
            say(f"  waiting for {what} ({now - start:.0f}s)")
            next_note = now + 10
        time.sleep(0.25)
    say(f"{what} healthy ({time.monotonic() - start:.1f}s)")


def _check_prerequisites(s: Settings) -> None:
    if s.node_kind not in ("agent", "kubelet"):
        raise ClusterError(f"MODELFLEET_CLUSTER_NODE_KIND={s.node_kind}: must be `agent` or `kubelet`")
    real = s.node_kind == "kubelet"
    wanted = (*CONTROL_PLANE, "kubectl", "helm", *(NODE_BINARIES if real else ()))
    missing = [b for b in wanted if not (s.k8s_bin / b).exists()]
    if missing:
        raise ClusterError(f"{missing[0]}: binary missing in {s.k8s_bin} (run `make cluster-build`)")
    tools = ("ip", "openssl", "runc", "iptables", "conntrack", "nginx") if real else ("ip", "openssl", "nginx", "unshare")
    for tool in tools:
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool}: command not found (run tests/cluster/scripts/install-deps.sh)")
    if os.geteuid() != 0:
        raise ClusterError("node-agent: network namespaces need root (run as root)")


def _ensure_free(s: Settings, name: str, ports: tuple[int, ...]) -> None:
    for port in ports:
        if not procs.port_free("127.0.0.1", port):
            raise ClusterError(f"{name}: port 127.0.0.1:{port} is in use (see {_log(s, name)})")


def _nginx_argv(s: Settings) -> list[str]:
    prefix = s.state / "nginx"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginxconf.render([], s.ports.ingress, prefix, s.logs, os.geteuid() == 0))
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(s.logs / "nginx-error.log"), "-g", "daemon off;"]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _nginx(s: Settings) -> controlplane.Component:
    return controlplane.Component("nginx", _nginx_argv(s), (s.ports.ingress,), lambda: _port_open(s.ports.ingress), 20)


def _agent_argv(s: Settings) -> list[str]:
    return [s.python, "-m", "localkube.agent", "--nodes", str(s.nodes), "--gpus", str(s.gpus_per_node)]


def _cluster_ready(s: Settings) -> Callable[[], bool]:
    """Nodes Ready, and what a pod needs at admission: the default ServiceAccount and the
    root CA ConfigMap that its projected token volume reads."""
    kubectl = str(s.k8s_bin / "kubectl")
    env = {**os.environ, "KUBECONFIG": str(s.kubeconfig)}

    def ready() -> bool:
        def get(*args: str) -> str:
            p = subprocess.run([kubectl, "get", *args], capture_output=True, text=True, env=env, timeout=10)
            return p.stdout if p.returncode == 0 else ""

        conds = get("nodes", "-o", "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status} {end}")
        return (
            conds.split().count("True") >= s.nodes
            and bool(get("serviceaccount", "default", "-n", "default", "-o", "name"))
            and bool(get("configmap", "kube-root-ca.crt", "-n", "default", "-o", "name"))
        )

    return ready


def _agent(s: Settings) -> controlplane.Component:
    return controlplane.Component("node-agent", _agent_argv(s), (), _cluster_ready(s), 90)


def _env(s: Settings) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "KUBECONFIG": str(s.state / "node-agent.kubeconfig")}
    if s.node_kind == "kubelet":
        # The node's binaries first on PATH: containerd finds its runc shim there.
        env["PATH"] = f"{s.k8s_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return env


def _node_ready(s: Settings) -> Callable[[], bool]:
    ready = _cluster_ready(s)
    return lambda: procs.alive(procs.read_pid(s.run, "kubelet")) and ready()


def _containerd(s: Settings) -> controlplane.Component:
    runtime = containerd.component(s)
    return controlplane.Component(runtime.name, runtime.argv, runtime.ports, runtime.healthy,
                                  runtime.timeout, after=lambda: containerd.load_images(s))


def _kube_proxy(s: Settings) -> controlplane.Component:
    """kube-proxy is healthy once it has synced; then the node must be Ready too."""
    proxy = kubeproxy.component(s)
    synced = proxy.healthy
    node_ready = _node_ready(s)
    return controlplane.Component(proxy.name, proxy.argv, proxy.ports, lambda: synced() and node_ready(), 120)


def _controllers(s: Settings) -> controlplane.Component:
    return controlplane.Component(hostcontrollers.NAME, hostcontrollers.argv(s), (), hostcontrollers.healthy(s), 60)


def _builders(s: Settings) -> dict[str, Callable[[], controlplane.Component]]:
    """Each component's name (in `order`) and what builds it. Building one writes the files it
    reads (configs, kubeconfigs), so `restart` builds only the component it restarts."""
    plane = {"etcd": lambda: controlplane.etcd(s), "kube-apiserver": lambda: controlplane.apiserver(s),
             "kube-controller-manager": lambda: controlplane.controller_manager(s),
             "kube-scheduler": lambda: controlplane.scheduler(s)}
    if s.node_kind == "kubelet":
        node_parts = {"containerd": lambda: _containerd(s), "kubelet": lambda: kubelet.component(s),
                      "kube-proxy": lambda: _kube_proxy(s), "nginx": lambda: _nginx(s),
                      hostcontrollers.NAME: lambda: _controllers(s)}
        return {**plane, **node_parts}
    return {**plane, "nginx": lambda: _nginx(s), "node-agent": lambda: _agent(s)}


def _components(s: Settings) -> list[controlplane.Component]:
    return [build() for build in _builders(s).values()]


def healthy(s: Settings) -> bool:
    """Every process alive and the API server ready: what makes `up` a no-op."""
    if not all(procs.alive(procs.read_pid(s.run, name)) for name in order(s)):
        return False
    return controlplane.apiserver(s).healthy()


def env_text(s: Settings, environ: Mapping[str, str]) -> str:
    """The env file `up` leaves: sourcing it alone points a shell (kubectl, helm, pytest, `make
    cluster-status`, `localkube restart`) at this cluster. Besides KUBECONFIG, PATH and
    INGRESS_URL it exports MODELFLEET_CLUSTER_DIR and every other MODELFLEET_CLUSTER_* setting
    the cluster was started with (`environ`, which Settings read): without them the e2e
    fixture and `localkube` fall back to the default cluster in `.cluster`."""
    settings = {k: v for k, v in environ.items() if k.startswith("MODELFLEET_CLUSTER_")}
    settings["MODELFLEET_CLUSTER_DIR"] = str(s.state.resolve())
    lines = [
        "# Written by `make cluster-up`: source it to use the local cluster.",
        f"export KUBECONFIG={shlex.quote(str(s.kubeconfig))}",
        f'export PATH={shlex.quote(str(s.bin))}:"$PATH"',
        f"export INGRESS_URL={shlex.quote(s.ingress_url)}",
        *(f"export {k}={shlex.quote(v)}" for k, v in sorted(settings.items())),
    ]
    if s.node_kind == "kubelet":
        # crictl and ctr read these: both then talk to this node's containerd.
        lines += [f"export CRI_CONFIG_FILE={shlex.quote(str(s.state / 'crictl.yaml'))}",
                  f"export CONTAINERD_ADDRESS={shlex.quote(str(containerd.socket(s)))}",
                  "export CONTAINERD_NAMESPACE=k8s.io"]
    return "\n".join(lines) + "\n"


def _write_env(s: Settings) -> None:
    s.bin.mkdir(parents=True, exist_ok=True)
    tools = ("kubectl", "helm", *(("crictl", "ctr") if s.node_kind == "kubelet" else ()))
    for tool in tools:
        link = s.bin / tool
        link.unlink(missing_ok=True)
        link.symlink_to(s.k8s_bin / tool)
    if s.node_kind == "kubelet":
        (s.state / "crictl.yaml").write_text(f"runtime-endpoint: unix://{containerd.socket(s)}\n")
    (s.state / "env").write_text(env_text(s, os.environ))


def _prepare(s: Settings) -> None:
    for d in (s.logs, s.run):
        d.mkdir(parents=True, exist_ok=True)
    for name in order(s):
        (s.logs / f"{name}.log").write_text("")  # logs are per cluster-up
    ips = ["127.0.0.1", str(s.network.gateway), s.network.first_service_ip]
    names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local"]
    try:
        pki.ensure(s.pki, ips, names, str(s.network.gateway))
    except pki.PkiError as exc:
        raise ClusterError(f"certificates: {exc}") from exc
    kubeconfig.write(s.kubeconfig, s.apiserver_url, s.pki, "admin")
    kubeconfig.write(s.state / "controller-manager.kubeconfig", s.apiserver_url, s.pki, "controller-manager")
    kubeconfig.write(s.state / "scheduler.kubeconfig", s.apiserver_url, s.pki, "scheduler")
    kubeconfig.write(s.state / "node-agent.kubeconfig", s.apiserver_url, s.pki, "node-agent")


def _fresh_network(s: Settings) -> None:
    """Pod namespaces of a cluster whose processes were killed (not stopped) would still
    hold their addresses; free ports say no live cluster owns them, so start clean."""
    try:
        if s.node_kind == "kubelet":
            node.teardown(s)
            node.prepare(s)
        else:
            network.teardown(s.network)
            network.ensure_bridge(s.network)
    except (network.NetworkError, RuntimeError, OSError) as exc:
        raise ClusterError(f"network bridge {s.network.bridge}: {exc}") from exc


def up(s: Settings) -> float:
    """Start the cluster (or find it running); returns seconds taken."""
    start = time.monotonic()
    _check_prerequisites(s)
    if healthy(s):
        say(f"already up and healthy ({s.kubeconfig})")
        return time.monotonic() - start
    if s.run.exists():
        # A cluster that is partly up, or whose processes were killed (a session that
        # ended): stop what is left and start from empty, as after `cluster-down`.
        say("found a stopped or partial cluster, clearing it first")
        down(s, quiet=True)
    s.state.mkdir(parents=True, exist_ok=True)
    try:
        _prepare(s)
        env = _env(s)
        components = _components(s)
        if procs.kill_orphaned_nginx_workers():
            time.sleep(0.2)  # let the kernel release the port
        for comp in components:  # all ports first: fail before anything has started
            _ensure_free(s, comp.name, comp.ports)
        _fresh_network(s)
        for comp in components:
            say(f"starting {comp.name}")
            procs.start(s.run, s.logs, comp.name, comp.argv, env)
            _wait(s, comp.name, comp.healthy, comp.timeout)
            if comp.after is not None:
                began = time.monotonic()
                done = comp.after()
                say(f"{comp.name}: {done} ({time.monotonic() - began:.1f}s)")
        if s.node_kind == "kubelet":
            say("starting cluster DNS (CoreDNS)")
            coredns.apply(s)
            _wait(s, "kubelet", lambda: coredns.ready(s), 120, what="CoreDNS")
        _write_env(s)
    except BaseException:
        down(s, quiet=True)
        raise
    took = time.monotonic() - start
    say(f"cluster up in {took:.1f}s: source {os.path.relpath(s.state / 'env')}")
    return took


def restart(s: Settings, name: str) -> None:
    """Restart one component: the node agent after changing its code (its pods are restarted
    too), or the API server, to test that clients' watches recover. The others keep running
    untouched: on the real node kube-proxy would exit if its config file were rewritten."""
    builders = _builders(s)
    if name not in builders:
        raise ClusterError(f"{name}: no such component (one of {', '.join(builders)})")
    if not healthy(s):
        raise ClusterError(f"{name}: the cluster is not up (run `make cluster-up`)")
    comp = builders[name]()  # writes this component's files only, and only what changed
    procs.stop(s.run, name, grace=20 if name == "node-agent" else 10)
    procs.start(s.run, s.logs, comp.name, comp.argv, _env(s))
    _wait(s, comp.name, comp.healthy, comp.timeout)


def down(s: Settings, quiet: bool = False) -> None:
    """Stop everything `up` started, in reverse order, and remove the cluster's state."""
    for name in reversed(order(s)):
        if name == "containerd":
            node.remove_pods(s)  # through the CRI while containerd still runs
        procs.kill_orphans(s.run, name)
        if procs.read_pid(s.run, name):
            if not quiet:
                print(f"[cluster-down] stopping {name}", flush=True)
            procs.stop(s.run, name, grace=20 if name == "node-agent" else 10)
    if s.node_kind == "kubelet":
        node.teardown(s)
    else:
        network.teardown(s.network)
    for path in (s.state / "etcd", s.state / "pods", s.state / "volumes", s.state / "env", s.bin, s.run):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if not quiet:
        print("[cluster-down] done", flush=True)
