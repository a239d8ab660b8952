"""A pod sees what a real pod sees: its service-account token and CA at the standard path
(so the kubernetes client's in-cluster config works against the API server), env from
ConfigMaps, Secrets and the downward API, and ConfigMap volumes."""

from __future__ import annotations

import pytest
from localkube.manifests import TEST_IMAGE, pod
from localkube.testing import LocalCluster, wait_for

pytestmark = pytest.mark.e2e

CHECK = r'''
import json, os, pathlib, socket
from kubernetes import client, config
config.load_incluster_config()
who = client.AuthenticationV1Api().create_self_subject_review({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
sa = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
print(json.dumps({
    "user": who.status.user_info.username,
    "namespace_file": (sa / "namespace").read_text(),
    "env": {k: os.environ.get(k) for k in ("GREETING", "PASSWORD", "POD_NAME", "POD_IP", "KUBERNETES_SERVICE_HOST", "EXPANDED")},
    "config_file": pathlib.Path("/etc/app/settings.txt").read_text(),
    "hostname": socket.gethostname(),
}))
'''


def test_pod_reaches_api_server_with_its_service_account(cluster: LocalCluster, namespace: str) -> None:
    cluster.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app"},
         "data": {"greeting": "hello", "settings.txt": "mode=test"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}},
        namespace=namespace,
    )
    checker = {
        "name": "check", "image": TEST_IMAGE, "command": ["python3", "-c", CHECK],
        "env": [
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "greeting"}}},
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "EXPANDED", "value": "$(GREETING)-$(POD_NAME)"},
        ],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/app", "readOnly": True}],
    }
    cluster.apply(pod("incluster", [checker], restartPolicy="Never",
                      volumes=[{"name": "cfg", "configMap": {"name": "app", "items": [{"key": "settings.txt", "path": "settings.txt"}]}}]),
                  namespace=namespace)
    done = wait_for(lambda: (p := cluster.get("pod", "incluster", namespace)) and
                    p["status"].get("phase") in ("Succeeded", "Failed") and p, 90, what="the pod to finish")
    logs = (cluster.root / "logs" / "pods" / f"{namespace}_incluster_check.log").read_text()
    assert done["status"]["phase"] == "Succeeded", logs
    import json

    report = json.loads(logs.strip().splitlines()[-1])
    assert report["user"] == f"system:serviceaccount:{namespace}:default"
    assert report["namespace_file"] == namespace
    env = report["env"]
    assert env["GREETING"] == "hello" and env["PASSWORD"] == "s3cret" and env["POD_NAME"] == "incluster"
    assert env["POD_IP"] == done["status"]["podIP"]
    assert env["EXPANDED"] == "hello-incluster"
    assert env["KUBERNETES_SERVICE_HOST"] == done["status"]["hostIP"]
    assert report["config_file"] == "mode=test"
    assert report["hostname"] == "incluster"
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"


def test_missing_configmap_is_a_config_error(cluster: LocalCluster, namespace: str) -> None:
    c = {"name": "c", "image": TEST_IMAGE, "command": ["sleep", "60"],
         "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}]}
    cluster.apply(pod("cfgerr", [c]), namespace=namespace)

    def reason() -> str | None:
        sts = cluster.get("pod", "cfgerr", namespace)["status"].get("containerStatuses") or []
        return sts and (sts[0]["state"].get("waiting") or {}).get("reason")

    assert wait_for(reason, 60, what="a waiting reason") == "CreateContainerConfigError"


def test_project_image_runs_the_modelfleet_command(cluster: LocalCluster, namespace: str) -> None:
    """An image built from this project runs `modelfleet` (its entrypoint) from the project's
    Python environment when the container gives only args."""
    c = {"name": "cli", "image": "modelfleet/modelfleet:dev", "args": ["--help"]}
    cluster.apply(pod("cli", [c], restartPolicy="Never"), namespace=namespace)
    done = wait_for(lambda: (p := cluster.get("pod", "cli", namespace)) and
                    p["status"].get("phase") in ("Succeeded", "Failed") and p, 90, what="the pod to finish")
    out = cluster.kubectl("logs", "cli", "-n", namespace).stdout
    assert done["status"]["phase"] == "Succeeded", out
    assert "usage: modelfleet" in out


def test_configmap_volume_follows_updates(cluster: LocalCluster, namespace: str) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "live"}, "data": {"v": "one"}}
    reader = {"name": "r", "image": TEST_IMAGE,
              "command": ["sh", "-c", "while true; do cat /cfg/v; echo; sleep 0.5; done"],
              "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}
    cluster.apply(cm, pod("reader", [reader], volumes=[{"name": "cfg", "configMap": {"name": "live"}}]),
                  namespace=namespace)
    wait_for(lambda: "one" in cluster.kubectl("logs", "reader", "-n", namespace, check=False).stdout, 60, what="one")
    cluster.apply(dict(cm, data={"v": "two"}), namespace=namespace)
    wait_for(lambda: "two" in cluster.kubectl("logs", "reader", "-n", namespace, "--tail=2").stdout, 30, what="two")
