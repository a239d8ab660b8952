"""Helpers for tests that run against the local cluster (the e2e tier and the harness's own
tests): a handle on the running cluster with kubectl/apply/get, and a polling wait."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_env(path: Path) -> dict[str, str]:
    """Evaluate .cluster/env in a shell, the way a user's `source` would."""
    out = subprocess.run(["bash", "-c", f'source "{path}" && env -0'], capture_output=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


@dataclass
class LocalCluster:
    """A running local cluster and a few helpers tests use against it."""

    root: Path
    env: dict[str, str]
    started_here: bool = False
    _api: Any = field(default=None, repr=False)

    @property
    def kubeconfig(self) -> Path:
        return Path(self.env["KUBECONFIG"])

    @property
    def ingress_url(self) -> str:
        return self.env["INGRESS_URL"]

    @property
    def api(self) -> Any:
        """A kubernetes.client.ApiClient for the admin user."""
        if self._api is None:
            from kubernetes import config

            self._api = config.new_client_from_config(str(self.kubeconfig))
        return self._api

    def restart(self, component: str) -> None:
        """Stop and start one component (kube-apiserver, node-agent, ...) and wait until healthy."""
        harness = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(harness)}
        proc = subprocess.run([sys.executable, "-m", "localkube", "restart", component], env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"restarting {component} failed:\n{proc.stdout}{proc.stderr}")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True,
                              env=self.env, check=check, timeout=60)

    def apply(self, *objects: dict, namespace: str | None = None) -> None:
        """`kubectl apply` of manifests given as dicts."""
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
        ns = ["-n", namespace] if namespace else []
        proc = self.kubectl("apply", *ns, "-f", "-", input=doc, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"kubectl apply failed: {proc.stderr.strip()}")

    def get(self, kind: str, name: str, namespace: str) -> dict | None:
        proc = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def list(self, kind: str, namespace: str, selector: str = "") -> list[dict]:
        args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.kubectl(*args).stdout)["items"]


def wait_for(fn: Callable[[], T | None], timeout: float = 60, interval: float = 0.5, what: str = "condition") -> T:
    """Poll `fn` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
