"""Every image carries its modules' bytecode. The chart runs them on a read-only root with
PYTHONDONTWRITEBYTECODE, so nothing caches it later: without it, each start compiles what it
imports from source (the worker's torch and transformers 8.5-11.4 s against 2.9 s with it;
each of vLLM's three processes 27 s against 8-12 s), and every cold start waits for that."""

from __future__ import annotations

import pytest

from .conftest import podman

pytestmark = pytest.mark.images

# For each path (relative to an import root): is its source there, and its compiled bytecode beside it?
CHECK = ("import importlib.util, os, sys\n"
         "for rel in sys.argv[1:]:\n"
         "    roots = [p for p in sys.path if p and os.path.exists(os.path.join(p, rel))]\n"
         "    print(rel, bool(roots) and os.path.exists(importlib.util.cache_from_source(os.path.join(roots[0], rel))))\n")


@pytest.mark.parametrize(("image", "python", "modules"), [
    ("worker", "python", ("torch/__init__.py", "transformers/modeling_utils.py", "modelfleet/worker/engine.py")),
    ("control-plane", "python", ("kubernetes/client/api/core_v1_api.py", "kopf/__init__.py",
                                 "modelfleet/gateway/app.py")),
    ("vllm-cpu", "python3", ("vllm/entrypoints/openai/api_server.py", "torch/__init__.py")),
])
def test_the_image_carries_bytecode(images, image: str, python: str, modules: tuple[str, ...]) -> None:
    out = podman("run", "--rm", "--read-only", "--entrypoint", python, images[image], "-c", CHECK, *modules).stdout
    assert dict(line.split() for line in out.splitlines()) == dict.fromkeys(modules, "True"), out
