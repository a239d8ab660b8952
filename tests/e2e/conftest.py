"""The end-to-end tier's cluster: `make cluster-up` once per session (or reuse a running
cluster), `make cluster-down` at the end if this session started it.

Tests under tests/cluster/ share these fixtures (their conftest loads this file). Set
MODELFLEET_KEEP_CLUSTER=1 to leave a cluster this session started running afterwards, and
MODELFLEET_SKIP_CLUSTER=1 to skip the tier on a machine that cannot run it (not root).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "cluster") not in sys.path:
    sys.path.insert(0, str(REPO / "tests" / "cluster"))  # the harness package, localkube

from localkube.testing import LocalCluster, read_env  # noqa: E402

from modelfleet.devcluster import wait_for  # noqa: E402

__all__ = ["LocalCluster", "cluster", "namespace", "wait_for"]


def _make(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", target], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    if os.environ.get("MODELFLEET_SKIP_CLUSTER"):
        pytest.skip("MODELFLEET_SKIP_CLUSTER is set")
    started = False
    if _make("cluster-status").returncode != 0:
        proc = _make("cluster-up")
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            pytest.fail(f"make cluster-up failed: {lines[-1] if lines else proc.returncode}", pytrace=False)
        started = True
    state = Path(os.environ.get("MODELFLEET_CLUSTER_DIR", REPO / ".cluster"))  # as localkube's Settings
    env = read_env(state / "env")
    saved = {k: os.environ.get(k) for k in ("KUBECONFIG", "PATH", "INGRESS_URL")}
    os.environ.update({k: env[k] for k in saved})
    try:
        yield LocalCluster(state, env, started)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started and not os.environ.get("MODELFLEET_KEEP_CLUSTER"):
            _make("cluster-down")


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace, ready for pods (its default ServiceAccount exists), deleted after."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.get("serviceaccount", "default", name), 30, what=f"default ServiceAccount in {name}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
