"""The worker image serves a chat model and an embedding model from read-only volumes, as uid
65532 on a read-only root, and turns bad input into OpenAI-format errors."""

from __future__ import annotations

import httpx
import pytest

from .conftest import CHAT, EMBED, podman

pytestmark = [pytest.mark.images, pytest.mark.timeout(1800)]  # the first test may build the images


def test_chat_completion(chat_worker) -> None:
    r = httpx.post(chat_worker.url + "/v1/chat/completions", timeout=60, json={
        "model": CHAT, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == CHAT
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= body["usage"]["completion_tokens"] <= 8


def test_streamed_chat_completion(chat_worker) -> None:
    with httpx.stream("POST", chat_worker.url + "/v1/chat/completions", timeout=60, json={
            "model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2


def test_embeddings(embed_worker) -> None:
    r = httpx.post(embed_worker.url + "/v1/embeddings", timeout=60,
                   json={"model": EMBED, "input": ["a container", "an image"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert all(len(d["embedding"]) == 384 for d in data)


def test_bad_request_is_an_openai_error_and_the_worker_serves_on(chat_worker) -> None:
    r = httpx.post(chat_worker.url + "/v1/chat/completions", timeout=60,
                   json={"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": -1})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert chat_worker.status() == "running"
    assert httpx.get(chat_worker.url + "/ready", timeout=5).status_code == 200


def test_runs_as_65532_on_a_read_only_root(chat_worker) -> None:
    assert chat_worker.exec("id", "-u").stdout.strip() == "65532"
    for path in ("/opt/modelfleet/x", f"/models/{CHAT}/x"):
        proc = chat_worker.exec("touch", path)
        assert proc.returncode != 0 and "Read-only file system" in proc.stderr, path


def test_torch_is_the_cpu_route(images) -> None:
    """The slim torch of worker.torch.requirements.txt: imports and computes on CPU, without the
    CUDA pieces a CPU never loads."""
    code = ("import importlib.util, torch; print(torch.__version__, torch.cuda.is_available(), "
            "importlib.util.find_spec('triton') is None, float(torch.ones(2, 2).sum()))")
    proc = podman("run", "--rm", "--read-only", "--entrypoint", "python", images["worker"], "-c", code, timeout=180)
    version, cuda, no_triton, total = proc.stdout.split()
    assert version.startswith("2.15.0") and (cuda, no_triton, total) == ("False", "True", "4.0")
