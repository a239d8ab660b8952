"""Small manifest builders shared by the harness tests (dicts, as `kubectl apply` takes)."""

from __future__ import annotations

from typing import Any

# The node agent runs images named modelfleet/... from the project's Python environment.
TEST_IMAGE = "modelfleet/testserver:dev"


def http_server(port: int = 8080, **extra: Any) -> dict:
    """A container running Python's http.server, ready when it answers."""
    container = {
        "name": "web",
        "image": TEST_IMAGE,
        "command": ["python3", "-m", "http.server", str(port), "--bind", "0.0.0.0"],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    container.update(extra)
    return container


def deployment(name: str, containers: list[dict], replicas: int = 1, **pod_spec: Any) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": containers, "terminationGracePeriodSeconds": 5, **pod_spec}},
        },
    }


def service(name: str, port: int = 80, target: str | int = "http", type_: str = "ClusterIP") -> dict:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"type": type_, "selector": {"app": name},
                 "ports": [{"name": "http", "port": port, "targetPort": target}]},
    }


def pod(name: str, containers: list[dict], **spec: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"containers": containers, "terminationGracePeriodSeconds": 5, **spec}}
