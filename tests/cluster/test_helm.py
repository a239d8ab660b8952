"""helm from .cluster/env installs a chart into the cluster, and its workload runs."""

from __future__ import annotations

import subprocess

import pytest
from localkube.manifests import TEST_IMAGE
from localkube.testing import LocalCluster, wait_for

pytestmark = pytest.mark.e2e

DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {name: {{ .Release.Name }}-web}
spec:
  replicas: {{ .Values.replicas }}
  selector: {matchLabels: {app: {{ .Release.Name }}-web}}
  template:
    metadata: {labels: {app: {{ .Release.Name }}-web}}
    spec:
      containers:
        - name: web
          image: IMAGE
          command: [python3, -m, http.server, "8080"]
          readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
""".replace("IMAGE", TEST_IMAGE)


def test_helm_installs_a_chart(cluster: LocalCluster, namespace: str, tmp_path) -> None:
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n")
    (chart / "values.yaml").write_text("replicas: 1\n")
    (chart / "templates" / "deployment.yaml").write_text(DEPLOYMENT)
    proc = subprocess.run(["helm", "install", "demo", str(chart), "-n", namespace, "--set", "replicas=2", "--wait",
                           "--timeout", "90s"], capture_output=True, text=True, env=cluster.env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dep = wait_for(lambda: cluster.get("deployment", "demo-web", namespace), 10, what="the Deployment")
    assert dep["status"]["readyReplicas"] == 2
    listed = subprocess.run(["helm", "list", "-n", namespace, "-q"], capture_output=True, text=True, env=cluster.env)
    assert listed.stdout.split() == ["demo"]
