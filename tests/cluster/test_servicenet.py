"""Pods reach Services the way they do in a real cluster: by DNS name and ClusterIP (the
agent's userspace proxy in the services namespace), and names outside the cluster fail
at once instead of leaving the machine."""

from __future__ import annotations

import json

import pytest
from localkube.manifests import TEST_IMAGE, deployment, http_server, pod, service
from localkube.testing import LocalCluster, wait_for

pytestmark = pytest.mark.e2e

CLIENT = r'''
import json, socket, time, urllib.request
out = {}
out["web"] = socket.gethostbyname("web")
out["web_fqdn"] = socket.gethostbyname("web.{ns}.svc.cluster.local")
out["kubernetes"] = socket.gethostbyname("kubernetes.default.svc")
out["body"] = urllib.request.urlopen("http://web/", timeout=5).read().decode()[:200]
t = time.monotonic()
try:
    socket.gethostbyname("example.com")
    out["external"] = "resolved"
except OSError as exc:
    out["external"] = type(exc).__name__
out["links"] = __import__("os").environ.get("WEB_SERVICE_HOST")
out["external_seconds"] = time.monotonic() - t
print(json.dumps(out))
'''


def test_pods_reach_services_by_name_and_cluster_ip(cluster: LocalCluster, namespace: str) -> None:
    cluster.apply(deployment("web", [http_server()]), service("web"), namespace=namespace)
    wait_for(lambda: (d := cluster.get("deployment", "web", namespace)) and d["status"].get("readyReplicas") == 1,
             90, what="web ready")
    client = {"name": "client", "image": TEST_IMAGE, "command": ["python3", "-c", CLIENT.replace("{ns}", namespace)]}
    cluster.apply(pod("client", [client], restartPolicy="Never"), namespace=namespace)
    done = wait_for(lambda: (p := cluster.get("pod", "client", namespace)) and
                    p["status"].get("phase") in ("Succeeded", "Failed") and p, 60, what="the client to finish")
    logs = cluster.kubectl("logs", "client", "-n", namespace).stdout
    assert done["status"]["phase"] == "Succeeded", logs
    out = json.loads(logs.strip().splitlines()[-1])
    cluster_ip = cluster.get("service", "web", namespace)["spec"]["clusterIP"]
    assert out["web"] == out["web_fqdn"] == cluster_ip
    assert out["kubernetes"] == cluster.get("service", "kubernetes", "default")["spec"]["clusterIP"]
    assert "Directory listing" in out["body"]
    assert out["external"] == "gaierror" and out["external_seconds"] < 2
    assert out["links"] == cluster_ip  # the kubelet's service-link variables
