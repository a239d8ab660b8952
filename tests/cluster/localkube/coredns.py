"""Cluster DNS of the real node: CoreDNS as a Deployment in kube-system behind the
`kube-dns` Service, the way kubeadm installs it, from the image the harness makes of the
CoreDNS binary build.sh compiled (only the plugins used here).

It answers `<svc>.<ns>.svc.cluster.local`, pod and reverse names from the API; any other
name is refused at once, nothing is forwarded (pods have no way out of the machine).
"""

from __future__ import annotations

import json
import subprocess

from . import images
from .config import Settings

NAMESPACE = "kube-system"
NAME = "coredns"
LABELS = {"k8s-app": "kube-dns"}

COREFILE = """\
.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
}
"""


def manifests(s: Settings) -> list[dict]:
    meta = {"name": NAME, "namespace": NAMESPACE}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                 "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": COREFILE}},
        {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {**meta, "labels": LABELS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": LABELS},
                "template": {
                    "metadata": {"labels": LABELS},
                    "spec": {
                        "serviceAccountName": NAME,
                        "priorityClassName": "system-cluster-critical",
                        "dnsPolicy": "Default",
                        "containers": [{
                            "name": "coredns",
                            "image": images.COREDNS.ref,
                            "imagePullPolicy": "Never",
                            "args": ["-conf", "/etc/coredns/Corefile"],
                            "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                      {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
                            "securityContext": {
                                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                            },
                            "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                        }],
                        "volumes": [{"name": "config", "configMap": {"name": NAME}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": NAMESPACE, "labels": LABELS},
            "spec": {
                "selector": LABELS, "clusterIP": s.network.dns_service_ip,
                "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                          {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}],
            },
        },
    ]


def _kubectl(s: Settings, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(s.k8s_bin / "kubectl"), f"--kubeconfig={s.kubeconfig}", *args],
                          input=input, capture_output=True, text=True, timeout=60)


def apply(s: Settings) -> None:
    doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests(s)})
    proc = _kubectl(s, "apply", "-f", "-", input=doc)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl apply (CoreDNS): {proc.stderr.strip()}")


def ready(s: Settings) -> bool:
    proc = _kubectl(s, "get", "deployment", NAME, "-n", NAMESPACE, "-o", "jsonpath={.status.readyReplicas}")
    return proc.returncode == 0 and proc.stdout.strip() not in ("", "0")
