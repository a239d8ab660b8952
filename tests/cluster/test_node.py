"""The real node (MODELFLEET_CLUSTER_NODE_KIND=kubelet): containerd, a kubelet and kube-proxy
run pods from local images, and what a user sees comes from them, not from the harness:
`kubectl logs/exec/port-forward` through the kubelet, ClusterIPs and NodePorts through
kube-proxy, names through CoreDNS, and what the operator diagnoses (ErrImagePull, a crash
loop's back-off) as the kubelet reports it. The ingress stand-in and the `standard`
StorageClass run on the host beside the node (localkube/hostcontrollers.py) and serve its pods.
Skipped on a cluster whose node is the agent."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
from localkube import containerd, images
from localkube.config import Network, Settings
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


def http_get(url: str, host: str | None = None) -> str | None:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - loopback only
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


def test_project_images_are_in_containerd_under_podmans_ids(node: dict) -> None:
    """`localkube load-images` (run by `make test-node` after `make images`) copied what podman
    built, and the kubelet sees each image under the ID podman gave it. (Compared with every
    image podman holds, tagged or not: a `make images` since the copy moves the tags.)"""
    s = Settings()
    held = images.cri_images(s.k8s_bin / "crictl", containerd.socket(s))
    ours = {ref: image_id for ref, image_id in held.items() if ref.startswith(images.PROJECT_PREFIX)}
    assert {images.project_image(name) for name in ("control-plane", "worker", "vllm-cpu")} <= set(ours), held
    listed = subprocess.run(["podman", "images", "--all", "--quiet", "--no-trunc"], capture_output=True, text=True,
                            env=images.podman_env(), check=True).stdout.split()
    assert set(ours.values()) <= set(listed), ours


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


def test_ingress_reaches_the_pods_from_the_host(cluster: LocalCluster, node: dict, namespace: str) -> None:
    host = f"{namespace}.node.test"
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web"},
               "spec": {"rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
                   "service": {"name": "web", "port": {"number": 80}}}}]}}]}}
    cluster.apply(deployment("web", [probe("web")]), service("web"), ingress, namespace=namespace)
    body = wait_for(lambda: http_get(f"{cluster.ingress_url}/", host=host), 60, what="the pod through the Ingress")
    assert body.startswith("hello from web-")
    lb = wait_for(lambda: (cluster.get("ingress", "web", namespace) or {}).get("status", {}).get("loadBalancer", {})
                  .get("ingress"), 30, what="the Ingress's address")
    assert lb[0]["ip"] == "127.0.0.1"


def test_claim_is_provisioned_and_writable_by_a_non_root_container(cluster: LocalCluster, node: dict,
                                                                  namespace: str) -> None:
    """The `standard` class's folders are open to any user, as local-path-provisioner's: the
    project's containers run as uid 65532 (the control-plane image has a Python to write with)."""
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    writer = {"name": "w", "image": images.project_image("control-plane"), "imagePullPolicy": "Never",
              "command": ["python3", "-c", "open('/models/tiny.bin', 'w').write('weights')"],
              "securityContext": {"runAsUser": 65532, "runAsNonRoot": True, "readOnlyRootFilesystem": True},
              "volumeMounts": [{"name": "m", "mountPath": "/models"}]}
    cluster.apply(claim, pod("writer", [writer], restartPolicy="Never",
                             volumes=[{"name": "m", "persistentVolumeClaim": {"claimName": "models"}}]),
                  namespace=namespace)
    pvc = wait_for(lambda: (c := cluster.get("pvc", "models", namespace)) and c["status"].get("phase") == "Bound" and c,
                   60, what="the claim to be Bound")
    assert pvc["spec"]["storageClassName"] == "standard"
    phase = wait_for(lambda: (cluster.get("pod", "writer", namespace) or {}).get("status", {}).get("phase")
                     in ("Succeeded", "Failed") and cluster.get("pod", "writer", namespace)["status"]["phase"],
                     90, what="the writer to finish")
    assert phase == "Succeeded", cluster.kubectl("logs", "writer", "-n", namespace, check=False).stdout
    pv = cluster.get("pv", pvc["spec"]["volumeName"], "default")
    written = Path(pv["spec"]["hostPath"]["path"]) / "tiny.bin"
    assert written.read_text() == "weights" and written.stat().st_uid == 65532
