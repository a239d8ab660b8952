"""Renders charts/modelfleet with the helm binary that `make cluster-build` puts in the cache.

No cluster is needed: `helm template` and `helm lint` run offline. Without the binary every
chart test skips with the command that builds it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "modelfleet"
if str(REPO / "tests" / "cluster") not in sys.path:
    sys.path.insert(0, str(REPO / "tests" / "cluster"))  # localkube.config knows where helm is built

from localkube.config import Settings  # noqa: E402

Render = Callable[..., list[dict]]


def helm_binary() -> Path:
    return Settings().k8s_bin / "helm"


@pytest.fixture(scope="session")
def helm() -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = helm_binary()
    if not binary.exists():
        pytest.skip(f"helm is not built ({binary} missing): run `make cluster-build`")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    return run


def set_args(values: dict[str, object]) -> list[str]:
    """--set-json per value, so lists, nulls and numbers keep their types."""
    import json

    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


@pytest.fixture(scope="session")
def render(helm) -> Render:
    """`helm template` -> the rendered objects (CRDs left out unless include_crds)."""

    def run(values: dict[str, object] | None = None, *, namespace: str = "mf-system", release: str = "mf",
            include_crds: bool = False, chart: Path = CHART) -> list[dict]:
        args = ["template", release, str(chart), "-n", namespace, *set_args(values or {})]
        if include_crds:
            args.append("--include-crds")
        return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]

    return run

