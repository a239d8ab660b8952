"""Every image carries its modules' bytecode. The chart runs them on a read-only root with
PYTHONDONTWRITEBYTECODE, so nothing caches it later: without it, each start compiles what it
imports from source (the worker's torch and transformers 8.5-11.4 s against 2.9 s with it;
each of vLLM's three processes 27 s against 8-12 s), and every cold start waits for that."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .conftest import podman

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/bytecode.py
from bytecode import check_args, compiled  # noqa: E402

pytestmark = pytest.mark.images


@pytest.mark.parametrize(("image", "python", "modules"), [
    ("worker", "python", ("torch/__init__.py", "transformers/modeling_utils.py", "modelfleet/worker/engine.py")),
    ("control-plane", "python", ("kubernetes/client/api/core_v1_api.py", "kopf/__init__.py",
                                 "modelfleet/gateway/app.py")),
    ("vllm-cpu", "python3", ("vllm/entrypoints/openai/api_server.py", "torch/__init__.py")),
])
def test_the_image_carries_bytecode(images, image: str, python: str, modules: tuple[str, ...]) -> None:
    out = podman("run", "--rm", "--read-only", "--entrypoint", python, images[image], *check_args(modules)).stdout
    assert compiled(out) == dict.fromkeys(modules, True), out
