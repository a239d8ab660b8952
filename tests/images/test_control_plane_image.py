"""The control-plane image: its gateway (uid 65532, read-only root) in front of the worker
containers, and its operator entrypoint up to where it needs a cluster."""

from __future__ import annotations

import httpx
import pytest

from .conftest import CHAT, EMBED, LOCKED_DOWN, podman

pytestmark = [pytest.mark.images, pytest.mark.timeout(1800)]  # the first test may build the images


def test_gateway_health_and_models(gateway) -> None:
    assert httpx.get(gateway.url + "/health", timeout=5).json() == {"status": "ok"}
    models = httpx.get(gateway.url + "/v1/models", timeout=5).json()
    assert {m["id"] for m in models["data"]} == {CHAT, EMBED}


def test_chat_through_the_gateway(gateway) -> None:
    r = httpx.post(gateway.url + "/v1/chat/completions", timeout=60, json={
        "model": CHAT, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_embeddings_through_the_gateway(gateway) -> None:
    r = httpx.post(gateway.url + "/v1/embeddings", timeout=60, json={"model": EMBED, "input": "hello"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 384


def test_unknown_model_is_an_openai_404(gateway) -> None:
    r = httpx.post(gateway.url + "/v1/chat/completions", timeout=30,
                   json={"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_gateway_runs_as_65532_on_a_read_only_root(gateway) -> None:
    assert gateway.exec("id", "-u").stdout.strip() == "65532"
    proc = gateway.exec("touch", "/opt/modelfleet/x")
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr


def test_no_model_stack(images) -> None:
    proc = podman("run", "--rm", "--read-only", "--entrypoint", "python", images["control-plane"], "-c",
                  "import torch", check=False)
    assert proc.returncode == 1 and "No module named 'torch'" in proc.stderr


def test_operator_help(images) -> None:
    proc = podman("run", "--rm", *LOCKED_DOWN, images["control-plane"], "operator", "--help")
    assert "Run the ModelDeployment operator" in proc.stdout


def test_operator_without_a_cluster_says_so_in_one_line(images) -> None:
    """Every operator module imports in the image (kopf, the kubernetes client, the handlers);
    with no cluster to talk to it stops with one clear line, not a traceback."""
    proc = podman("run", "--rm", *LOCKED_DOWN, images["control-plane"], "operator", "--standalone", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfleet operator: "), proc.stderr
