"""Driving the operator against a development cluster: `modelfleet operator` as a process on the
host, ModelDeployment manifests, namespaces, and waits that explain themselves when they time
out. Shared by the end-to-end tests (tests/e2e/operator_harness.py adds what only tests need)
and bench/operator_scale.py, so that neither imports the other.

`wait_for` is also the one polling wait of the tiers that watch processes from outside
(tests/integration, tests/e2e, bench): in-process tests wait on events instead.

Needs a source checkout (it applies crds/ and operator/peering.yaml from it) and kubectl on
PATH with KUBECONFIG set, as `source .cluster/env` leaves them (or `use_cluster_env()` does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from modelfleet.netutil import free_port

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "modeldeployments.modelfleet.dev.yaml"
PEERING = REPO / "operator" / "peering.yaml"
NS_PREFIX = "mf-e2e-op-"
CLUSTER_ENV = REPO / ".cluster" / "env"  # written by `make cluster-up`


def use_cluster_env(env_file: Path = CLUSTER_ENV) -> str:
    """Point this process and its children (kubectl, the kubernetes client) at the local
    cluster, and return the kubeconfig's path: KUBECONFIG and PATH from `env_file`, evaluated
    by bash as a user's `source .cluster/env` is (it extends $PATH), or, with no such file, the
    KUBECONFIG this process already has."""
    if env_file.exists():
        out = subprocess.run(["bash", "-c", 'source "$1" && env -0', "bash", str(env_file)],
                             capture_output=True, check=True).stdout
        env = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
        os.environ.update({k: env[k] for k in ("KUBECONFIG", "PATH") if k in env})
    if not os.environ.get("KUBECONFIG"):
        raise RuntimeError(f"no cluster: {env_file} is missing and KUBECONFIG is not set (make cluster-up)")
    return os.environ["KUBECONFIG"]


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGINT, timeout: float = 30) -> None:
    """Stop a process started with `start_new_session=True` and everything it spawned: `sig` to
    its process group (SIGINT: Ctrl-C, as a user stops `serve` or the gateway; SIGTERM: kopf's
    graceful stop), then SIGKILL after `timeout` seconds. Children such as `serve`'s workers
    share the group, so none outlives a test."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """kubectl with the environment the cluster fixture set (KUBECONFIG, PATH)."""
    proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def get(kind: str, name: str, namespace: str) -> dict | None:
    proc = kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def install_crds(with_peering: bool = False) -> None:
    """Apply (never delete: other tests share the cluster) the CRD, and kopf's peering CRDs."""
    files = [CRD, PEERING] if with_peering else [CRD]
    names = ["modeldeployments.modelfleet.dev"] + (["kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"]
                                                   if with_peering else [])
    for f in files:
        # peering.yaml also holds a ClusterKopfPeering, whose kind exists only once its CRD
        # is established: apply twice and accept the first failure.
        if kubectl("apply", "-f", str(f), check=False).returncode != 0:
            kubectl("wait", "--for=condition=Established", "--timeout=30s", *[f"crd/{n}" for n in names])
            kubectl("apply", "-f", str(f))
    kubectl("wait", "--for=condition=Established", "--timeout=30s", *[f"crd/{n}" for n in names])


def create_namespace(name: str) -> None:
    kubectl("create", "namespace", name)
    wait_for(lambda: get("serviceaccount", "default", name), 30, what=f"the default ServiceAccount in {name}")


def delete_namespace(name: str) -> None:
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def delete_model_deployments(namespace: str, timeout: float = 60) -> None:
    """Delete every ModelDeployment in `namespace` and wait until they are gone, so that
    deleting the namespace afterwards waits for nothing but the garbage collector."""
    kubectl("delete", "md", "--all", "-n", namespace, "--wait=true", f"--timeout={timeout:.0f}s", check=False,
            timeout=timeout + 10)


class OperatorProcess:
    """`modelfleet operator` on the host, logging to a file; start/kill/stop at will."""

    def __init__(self, namespaces: Sequence[str], log_path: Path, *extra: str, resync_seconds: float = 3) -> None:
        self.namespaces = list(namespaces)
        self.log_path = log_path
        self.extra = list(extra)
        self.resync_seconds = resync_seconds
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.liveness_port = 0

    def start(self, wait: bool = True) -> OperatorProcess:
        self.metrics_port, self.liveness_port = free_port(), free_port()
        argv = [sys.executable, "-m", "modelfleet", "operator", *[a for ns in self.namespaces for a in ("-n", ns)],
                "--liveness", f"http://127.0.0.1:{self.liveness_port}/healthz",
                "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--resync-seconds", str(self.resync_seconds), *self.extra]
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=os.environ.copy())
        if wait:
            wait_for(self._live, 60, what="the operator's liveness endpoint", explain=self.tail)
        return self

    def _live(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"the operator exited ({self.proc and self.proc.returncode}):\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when a node dies under it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (kopf's graceful stop, which also leaves the peering), then SIGKILL."""
        stop_group(self.proc, signal.SIGTERM, timeout)

    def reconciles(self) -> float:
        """modelfleet_operator_reconciles_total summed over labels (0 if the endpoint is down)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("modelfleet_operator_reconciles_total{"))

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no operator log)"
        return "\n".join(text.splitlines()[-lines:])


def model_deployment(name: str, source: str, **spec: Any) -> dict:
    """A ModelDeployment with small resources and a short grace period (tests delete a lot)."""
    body: dict[str, Any] = {"model": {"source": source}, "resources": {"cpu": "100m", "memory": "512Mi"},
                            "terminationGracePeriodSeconds": 5}
    body.update(spec)
    return {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
            "spec": body}


# What a poll takes for "not yet" rather than a failure: a server that is not listening yet, or
# too slow to answer this time.
NOT_YET = (ConnectionError, TimeoutError, urllib.error.URLError, httpx.HTTPError)


def wait_for(fn: Callable[[], T | None], timeout: float = 120, what: str = "condition", interval: float = 0.5,
             explain: Callable[[], str] | None = None) -> T:
    """Poll `fn` until it returns something truthy, and return that. An error in NOT_YET counts
    as not yet; any other fails at once. On timeout, fail with `what`, the last value (or
    error) and `explain()`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except NOT_YET as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f"\n\n{explain()}" if explain else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r}){detail}")
