"""The harness on the real cluster: Deployments become Ready, Services get endpoints and
answer on their NodePort, probes and restarts behave as a kubelet's, GC removes pods."""

from __future__ import annotations

import ipaddress
import os
import signal
import urllib.request

import pytest
from localkube import network
from localkube.config import Network
from localkube.manifests import TEST_IMAGE, deployment, http_server, pod, service
from localkube.testing import LocalCluster, wait_for

pytestmark = pytest.mark.e2e


def ready_pods(cluster: LocalCluster, ns: str, app: str) -> list[dict]:
    pods = cluster.list("pods", ns, f"app={app}")
    return [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                   for c in (p.get("status") or {}).get("conditions") or [])]


def slice_addresses(cluster: LocalCluster, ns: str, svc: str, ready_only: bool = True) -> set[str]:
    out = set()
    for sl in cluster.list("endpointslices", ns, f"kubernetes.io/service-name={svc}"):
        for ep in sl.get("endpoints") or []:
            if not ready_only or (ep.get("conditions") or {}).get("ready"):
                out.update(ep["addresses"])
    return out


def test_deployment_becomes_ready_and_its_nodeport_answers(cluster: LocalCluster, namespace: str) -> None:
    cluster.apply(deployment("web", [http_server()], replicas=2), service("web", type_="NodePort"), namespace=namespace)
    pods = wait_for(lambda: len(ready_pods(cluster, namespace, "web")) == 2 and ready_pods(cluster, namespace, "web"),
                    90, what="2 ready pods")
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        assert not addr.is_loopback and addr in Network().cidr
    dep = wait_for(lambda: (d := cluster.get("deployment", "web", namespace)) and
                   d["status"].get("readyReplicas") == 2 and d, 30, what="deployment readyReplicas=2")
    assert dep["status"]["availableReplicas"] == 2
    wait_for(lambda: slice_addresses(cluster, namespace, "web") == ips, 30, what="EndpointSlice = pod IPs")
    node_port = cluster.get("service", "web", namespace)["spec"]["ports"][0]["nodePort"]
    body = wait_for(lambda: _get(f"http://127.0.0.1:{node_port}/"), 30, what="NodePort answer")
    assert "Directory listing" in body


def test_failing_readiness_probe_leaves_endpoints(cluster: LocalCluster, namespace: str, tmp_path) -> None:
    flag = tmp_path / "ready"
    flag.write_text("yes")
    os.chmod(tmp_path, 0o755)
    web = http_server(
        readinessProbe={"exec": {"command": ["test", "-f", "/flags/ready"]}, "periodSeconds": 1, "failureThreshold": 1},
        volumeMounts=[{"name": "flags", "mountPath": "/flags"}],
    )
    cluster.apply(
        deployment("flip", [web], volumes=[{"name": "flags", "hostPath": {"path": str(tmp_path)}}]),
        service("flip"), namespace=namespace,
    )
    [p] = wait_for(lambda: ready_pods(cluster, namespace, "flip"), 90, what="a ready pod")
    ip = p["status"]["podIP"]
    wait_for(lambda: slice_addresses(cluster, namespace, "flip") == {ip}, 30, what="the pod in the endpoints")
    flag.unlink()
    wait_for(lambda: not ready_pods(cluster, namespace, "flip"), 30, what="the pod to turn unready")
    wait_for(lambda: slice_addresses(cluster, namespace, "flip") == set(), 30, what="the pod to leave the endpoints")
    assert ip in slice_addresses(cluster, namespace, "flip", ready_only=False)  # still listed, as not ready
    flag.write_text("yes")
    wait_for(lambda: slice_addresses(cluster, namespace, "flip") == {ip}, 30, what="the pod back in the endpoints")


def test_killed_process_is_restarted_and_counted(cluster: LocalCluster, namespace: str) -> None:
    web = http_server(livenessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 2})
    cluster.apply(pod("crashy", [web]), namespace=namespace)
    wait_for(lambda: ready_pods(cluster, namespace, "crashy"), 90, what="a ready pod")
    uid = cluster.get("pod", "crashy", namespace)["metadata"]["uid"]
    pids = network.netns_pids(network.netns_name(Network(), uid))
    assert pids, "the container should run inside the pod's network namespace"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    def restarted() -> dict | None:
        p = cluster.get("pod", "crashy", namespace)
        st = p["status"]["containerStatuses"][0]
        return st if st["restartCount"] >= 1 and st["ready"] else None

    st = wait_for(restarted, 60, what="restartCount >= 1 and ready again")
    assert st["lastState"]["terminated"]["exitCode"] == 137
    assert st["state"].get("running")


def test_deleting_a_deployment_removes_its_pods(cluster: LocalCluster, namespace: str) -> None:
    cluster.apply(deployment("gone", [http_server()], replicas=2), namespace=namespace)
    pods = wait_for(lambda: len(ready_pods(cluster, namespace, "gone")) == 2 and ready_pods(cluster, namespace, "gone"),
                    90, what="2 ready pods")
    uids = [p["metadata"]["uid"] for p in pods]
    cluster.kubectl("delete", "deployment", "gone", "-n", namespace, "--wait=false")
    wait_for(lambda: not cluster.list("pods", namespace, "app=gone"), 60, what="the garbage collector to remove the pods")
    assert not cluster.list("replicasets", namespace, "app=gone")
    live = set(network.list_netns(Network()))
    assert not {network.netns_name(Network(), u) for u in uids} & live, "pod namespaces must be gone"


def test_grace_period_then_sigkill(cluster: LocalCluster, namespace: str) -> None:
    stubborn = {"name": "stubborn", "image": TEST_IMAGE,
                "command": ["sh", "-c", "trap '' TERM; echo ignoring TERM; while true; do sleep 0.2; done"]}
    cluster.apply(pod("stubborn", [stubborn], terminationGracePeriodSeconds=2), namespace=namespace)
    # Running is not enough: a busy machine may not have run the shell's trap yet, and a SIGTERM
    # before it ends the pod at once. The container says when it ignores TERM.
    wait_for(lambda: "ignoring TERM" in cluster.kubectl("logs", "stubborn", "-n", namespace, check=False).stdout,
             60, what="the trap set")
    import time

    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=true", "--timeout=30s")
    took = time.monotonic() - t0
    assert 1.5 <= took < 15, f"deletion took {took:.1f}s; expected the 2 s grace period, then SIGKILL"


def test_gpu_request_beyond_capacity_stays_pending(cluster: LocalCluster, namespace: str) -> None:
    greedy = http_server(resources={"limits": {"nvidia.com/gpu": "64"}})
    cluster.apply(pod("greedy", [greedy]), namespace=namespace)

    def unschedulable() -> dict | None:
        p = cluster.get("pod", "greedy", namespace)
        cond = {c["type"]: c for c in p["status"].get("conditions") or []}.get("PodScheduled")
        return cond if cond and cond["status"] == "False" else None

    cond = wait_for(unschedulable, 60, what="PodScheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert cluster.get("pod", "greedy", namespace)["status"]["phase"] == "Pending"


def test_image_not_from_this_project_is_err_image_pull(cluster: LocalCluster, namespace: str) -> None:
    cluster.apply(pod("foreign", [{"name": "c", "image": "docker.io/library/nginx:1.27"}]), namespace=namespace)

    def waiting_reason() -> str | None:
        p = cluster.get("pod", "foreign", namespace)
        sts = p["status"].get("containerStatuses") or []
        return sts and (sts[0]["state"].get("waiting") or {}).get("reason")

    assert wait_for(waiting_reason, 60, what="a waiting reason") == "ErrImagePull"
    assert cluster.get("pod", "foreign", namespace)["status"]["phase"] == "Pending"


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - loopback
            return resp.read().decode()
    except OSError:
        return None


def test_crashing_container_backs_off(cluster: LocalCluster, namespace: str) -> None:
    crasher = {"name": "crash", "image": TEST_IMAGE, "command": ["sh", "-c", "echo boom; exit 3"]}
    cluster.apply(pod("crasher", [crasher]), namespace=namespace)

    def backing_off() -> dict | None:
        sts = cluster.get("pod", "crasher", namespace)["status"].get("containerStatuses") or []
        st = sts[0] if sts else {}
        waiting = (st.get("state") or {}).get("waiting") or {}
        return st if waiting.get("reason") == "CrashLoopBackOff" and st["restartCount"] >= 1 else None

    st = wait_for(backing_off, 60, what="CrashLoopBackOff")
    assert st["lastState"]["terminated"]["exitCode"] == 3
    assert st["lastState"]["terminated"]["reason"] == "Error"
    assert "boom" in cluster.kubectl("logs", "crasher", "-n", namespace, "--previous").stdout


def test_kubectl_logs_reads_container_output(cluster: LocalCluster, namespace: str) -> None:
    talker = {"name": "talk", "image": TEST_IMAGE, "command": ["sh", "-c", "echo hello-from-$(HOSTNAME); sleep 60"]}
    cluster.apply(pod("talker", [talker]), namespace=namespace)
    out = wait_for(lambda: cluster.kubectl("logs", "talker", "-n", namespace, check=False).stdout, 60, what="logs")
    assert out.strip() == "hello-from-talker"


def test_prestop_hook_runs_before_sigterm(cluster: LocalCluster, namespace: str, tmp_path) -> None:
    os.chmod(tmp_path, 0o755)
    c = {"name": "c", "image": TEST_IMAGE,
         "command": ["sh", "-c", "trap 'echo term >> /out/log; exit 0' TERM; echo trapping TERM; "
                     "while true; do sleep 0.1; done"],
         "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo prestop >> /out/log"]}}},
         "volumeMounts": [{"name": "out", "mountPath": "/out"}]}
    cluster.apply(pod("hooked", [c], volumes=[{"name": "out", "hostPath": {"path": str(tmp_path)}}]), namespace=namespace)
    # Once the shell's trap is set (Running comes before it: see test_grace_period_then_sigkill).
    wait_for(lambda: "trapping TERM" in cluster.kubectl("logs", "hooked", "-n", namespace, check=False).stdout,
             60, what="the trap set")
    cluster.kubectl("delete", "pod", "hooked", "-n", namespace, "--wait=true", "--timeout=30s")
    assert (tmp_path / "log").read_text().split() == ["prestop", "term"]


def test_pod_resolves_its_own_hostname(cluster: LocalCluster, namespace: str) -> None:
    c = {"name": "c", "image": TEST_IMAGE,
         "command": ["python3", "-c", "import socket; print(socket.gethostbyname(socket.gethostname()))"]}
    cluster.apply(pod("named", [c], restartPolicy="Never"), namespace=namespace)
    done = wait_for(lambda: (p := cluster.get("pod", "named", namespace)) and p["status"].get("phase") == "Succeeded" and p,
                    60, what="Succeeded")
    assert cluster.kubectl("logs", "named", "-n", namespace).stdout.strip() == done["status"]["podIP"]
