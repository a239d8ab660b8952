"""Renders charts/modelfleet with helm: the one on PATH, else the one `make cluster-build`
builds from source (Go) into the cache. helm has no PyPI form, so it is the one thing these
unit tests may lack.

No cluster is needed: `helm template` and `helm lint` run offline. Every test that needs helm
is marked `helm` (deselect them with `-m "not helm"`); without a helm they skip saying where
it was looked for and how to get it, and the chart's other tests (values, schema, CRDs, RBAC
table) run as usual.
"""

from __future__ import annotations

import shutil
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


def helm_binary() -> Path | None:
    """helm on PATH, else the cluster build's; None if neither exists."""
    on_path = shutil.which("helm")
    built = Settings().k8s_bin / "helm"
    return Path(on_path) if on_path else built if built.exists() else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"helm", "render"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.helm)


@pytest.fixture(scope="session")
def helm() -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = helm_binary()
    if binary is None:
        pytest.skip(f"needs the helm CLI: none on PATH and none built at {Settings().k8s_bin / 'helm'}; "
                    "`make cluster-build` builds it (needs Go), or put helm 3 on PATH")

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

