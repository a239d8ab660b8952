"""The real node (MODELFLEET_CLUSTER_NODE_KIND=kubelet): containerd, a kubelet and kube-proxy
run pods from local images, and what a user sees comes from them, not from the harness:
`kubectl logs/exec/port-forward` through the kubelet, ClusterIPs and NodePorts through
kube-proxy, names through CoreDNS, and what the operator diagnoses (ErrImagePull, a crash
loop's back-off) as the kubelet reports it. Skipped on a cluster whose node is the agent."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import urllib.request

import pytest
from localkube.config import Network
from localkube.images import NODEPROBE
from localkube.manifests import deployment, pod, service
from localkube.testing import LocalCluster, wait_for

from modelfleet.netutil import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(cluster: LocalCluster) -> dict:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    runtime = nodes[0]["status"]["nodeInfo"]["containerRuntimeVersion"]
    if not runtime.startswith("containerd://"):
        pytest.skip(f"the node runs {runtime!r}, not containerd (MODELFLEET_CLUSTER_NODE_KIND=kubelet)")
    return nodes[0]


def probe(name: str = "probe", *args: str, port: int = 8080, **extra) -> dict:
    """A container of the node's test image; `serve` (HTTP on `port`) unless args say else."""
    container = {
        "name": name,
        "image": NODEPROBE.ref,
        "imagePullPolicy": "Never",
        "args": list(args) or ["serve", f":{port}"],
        "ports": [{"name": "http", "containerPort": port}],
        "securityContext": {"runAsUser": 65532, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
    }
    if not args:
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
    container.update(extra)
    return container


def running(cluster: LocalCluster, ns: str, name: str, timeout: float = 60) -> dict:
    def ready() -> dict | None:
        p = cluster.get("pod", name, ns)
        conds = (p or {}).get("status", {}).get("conditions") or []
        return p if any(c["type"] == "Ready" and c["status"] == "True" for c in conds) else None

    return wait_for(ready, timeout, what=f"pod {name} Ready")


def waiting_reason(cluster: LocalCluster, ns: str, name: str) -> str:
    p = cluster.get("pod", name, ns) or {}
    for status in p.get("status", {}).get("containerStatuses") or []:
        return ((status.get("state") or {}).get("waiting") or {}).get("reason", "")
    return ""


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
            return resp.read().decode()
    except OSError:
        return None


def test_node_is_a_ready_kubelet_on_containerd(cluster: LocalCluster, node: dict) -> None:
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.36.3"
    assert info["containerRuntimeVersion"].startswith("containerd://2.")
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", ready
    assert node["metadata"]["labels"]["modelfleet.dev/localkube"] == "true"


def test_pod_runs_from_a_local_image_with_logs_and_exec(cluster: LocalCluster, node: dict, namespace: str) -> None:
    cluster.apply(pod("web", [probe("web")]), namespace=namespace)
    p = running(cluster, namespace, "web")
    assert ipaddress.ip_address(p["status"]["podIP"]) in Network().cidr
    status = p["status"]["containerStatuses"][0]
    assert status["imageID"].startswith(f"{NODEPROBE.ref.rsplit(':', 1)[0]}@sha256:") or "sha256:" in status["imageID"]
    assert status["containerID"].startswith("containerd://")
    logs = cluster.kubectl("logs", "web", "-n", namespace).stdout
    assert "serving on :8080" in logs
    # exec runs in the container: its hostname is the pod's, its root is read-only.
    out = cluster.kubectl("exec", "web", "-n", namespace, "--", "/nodeprobe", "cat", "/etc/hostname").stdout
    assert out.strip() == "web"
    exited = cluster.kubectl("exec", "web", "-n", namespace, "--", "/nodeprobe", "crash", "7", check=False)
    assert exited.returncode == 7 and "crashing with exit code 7" in exited.stdout
    # The pod's only routes: the pod CIDR on the link, the service CIDR through the node.
    routes = cluster.kubectl("exec", "web", "-n", namespace, "--", "/nodeprobe", "cat", "/proc/net/route").stdout
    destinations = {line.split()[1] for line in routes.splitlines()[1:]}
    assert "00000000" not in destinations and len(destinations) == 2, routes


def test_port_forward_reaches_the_pod(cluster: LocalCluster, node: dict, namespace: str) -> None:
    cluster.apply(pod("web", [probe("web")]), namespace=namespace)
    running(cluster, namespace, "web")
    port = free_port()
    fwd = subprocess.Popen(["kubectl", "port-forward", "-n", namespace, "pod/web", f"{port}:8080"],
                           env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/"), 30, what="an answer through port-forward")
        assert body == "hello from web\n"
    finally:
        fwd.terminate()
        fwd.wait(10)


def test_service_reaches_pods_by_name_clusterip_and_nodeport(cluster: LocalCluster, node: dict,
                                                              namespace: str) -> None:
    svc = service("web", port=80, type_="NodePort")
    cluster.apply(deployment("web", [probe("web")], replicas=2), svc, pod("client", [probe("client")]),
                  namespace=namespace)
    running(cluster, namespace, "client")
    web = json.loads(cluster.kubectl("get", "service", "web", "-n", namespace, "-o", "json").stdout)
    cluster_ip, node_port = web["spec"]["clusterIP"], web["spec"]["ports"][0]["nodePort"]

    def from_client(url: str) -> str | None:
        proc = cluster.kubectl("exec", "client", "-n", namespace, "--", "/nodeprobe", "get", url, check=False)
        return proc.stdout if proc.returncode == 0 else None

    # kube-proxy: another pod through the ClusterIP; CoreDNS: the full name and, through the
    # pod's search path, the short one.
    for url in (f"http://{cluster_ip}/", f"http://web.{namespace}.svc.cluster.local/", "http://web/"):
        body = wait_for(lambda u=url: from_client(u), 60, what=f"{url} from another pod")
        assert body.startswith("hello from web-"), body
    # The host reaches it on loopback at the NodePort.
    body = wait_for(lambda: http_get(f"http://127.0.0.1:{node_port}/"), 30, what="the NodePort on 127.0.0.1")
    assert body.startswith("hello from web-")


def test_missing_image_is_reported_by_the_kubelet(cluster: LocalCluster, node: dict, namespace: str) -> None:
    cluster.apply(pod("missing", [{"name": "app", "image": "localkube.dev/not-built:1"}]), namespace=namespace)
    wait_for(lambda: waiting_reason(cluster, namespace, "missing") == "ImagePullBackOff", 90, what="ImagePullBackOff")
    p = cluster.get("pod", "missing", namespace)
    assert "localkube.dev/not-built:1" in p["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    # The pull's own failure (ErrImagePull) precedes the back-off; the kubelet's events keep it.
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=missing",
                             "-o", "jsonpath={range .items[*]}{.message}{'\\n'}{end}").stdout
    assert "ErrImagePull" in events, events


def test_crashing_container_is_backed_off_by_the_kubelet(cluster: LocalCluster, node: dict, namespace: str) -> None:
    """Kubelet 1.36 requeues a crashed pod exactly when its back-off ends, so the status's
    `waiting: CrashLoopBackOff` is written (if at all) just before the restart: between
    restarts the status shows the failed run as `terminated`. What it reliably reports is
    the back-off event, the restart count and the last exit code (operator/conditions.py
    reads a non-zero `terminated` as the same crash loop)."""
    cluster.apply(pod("crash", [probe("app", "crash", "3")]), namespace=namespace)

    def backed_off() -> dict | None:
        events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                                 "involvedObject.name=crash,reason=BackOff", "-o", "name").stdout
        status = ((cluster.get("pod", "crash", namespace) or {}).get("status", {}).get("containerStatuses") or [{}])[0]
        return status if events.strip() and status.get("restartCount", 0) >= 2 else None

    status = wait_for(backed_off, 90, what="a BackOff event and two restarts")
    last = status["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (3, "Error")
    state = status["state"]
    assert state.get("terminated", {}).get("exitCode") == 3 or "running" in state \
        or state.get("waiting", {}).get("reason") == "CrashLoopBackOff", state
    # Between restarts the crashed container is the pod's latest, so plain `kubectl logs`
    # shows its output (`--previous` names the run before it, which the kubelet's container
    # GC, keeping one dead container, removes within a minute).
    wait_for(lambda: "crashing with exit code 3" in cluster.kubectl("logs", "crash", "-n", namespace,
                                                                    check=False).stdout, 30, what="its output")
