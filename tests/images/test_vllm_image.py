"""The vLLM CPU image (images/vllm-cpu.Dockerfile) run as the operator's vLLM pods run it: the
command, arguments and environment that operator/render.py gives a vllm-engine container, uid
65532 on a read-only root, serving the vLLM demo model (a random Llama whose head size vLLM's CPU
attention takes) from a read-only volume; and the control-plane image's gateway in front of it.

vLLM takes minutes to start here (torch.compile builds its kernels with g++ at start), so one
container serves the whole module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from modelfleet.demo import VLLM_DEMO_KV_BYTES, VLLM_DEMO_SPEC, ensure_demo_model
from modelfleet.devcluster import wait_for
from modelfleet.engines import VLLM_SERVER_MODULE, VllmServer, vllm_env
from modelfleet.netutil import free_port

from .conftest import CHAT, Container, container, readable_copy

pytestmark = [pytest.mark.images, pytest.mark.timeout(1800)]  # the first test may build the images
MODEL_DIR = f"/models/{CHAT}"


@pytest.fixture(scope="module")
def vllm(images, tmp_path_factory) -> Iterator[Container]:
    """vLLM's OpenAI server in the image, started exactly as the operator renders its container
    (the image's own user and caches; /dev/shm sized as the operator's memory volume)."""
    model = readable_copy(ensure_demo_model(VLLM_DEMO_SPEC), tmp_path_factory.mktemp("vllm-model") / CHAT)
    port = free_port()
    server = VllmServer(model=MODEL_DIR, served_names=[CHAT], host="127.0.0.1", port=port, dtype="float32",
                        max_model_len=512, max_num_seqs=8, task="generate", kv_cache_bytes=VLLM_DEMO_KV_BYTES)
    # HF_HUB_OFFLINE: the model is local, and no traffic leaves the machine.
    env = {**vllm_env(False, server_args=server.args()), "HF_HUB_OFFLINE": "1"}
    options = ["--entrypoint", json.dumps(["python3", "-m", VLLM_SERVER_MODULE]), "--shm-size", "1g",
               "--volume", f"{model}:{MODEL_DIR}:ro", *(f"--env={k}={v}" for k, v in env.items())]
    with container(images["vllm-cpu"], server.args(), port, options=options) as c:

        def healthy() -> bool:
            status = c.status()
            if status != "running":
                raise AssertionError(f"container {c.name} is {status}:\n{c.logs()}")
            return httpx.get(c.url + "/health", timeout=2).status_code == 200

        # vLLM has no readiness endpoint of its own: /health answers once the engine is up.
        wait_for(healthy, 900, f"vLLM in {c.name} to serve", interval=1, explain=c.logs)
        yield c


@pytest.fixture(scope="module")
def vllm_gateway(images, vllm) -> Iterator[Container]:
    """The control-plane image's gateway with the vLLM container as its one static backend."""
    port = free_port()
    args = ["gateway", "--discovery", "static", "--backend", f"{CHAT}={vllm.url}", "--host", "127.0.0.1",
            "--port", str(port)]
    with container(images["control-plane"], args, port) as c:
        c.wait_ready({CHAT})
        yield c


def test_models_are_listed_as_vllm_lists_them(vllm) -> None:
    cards = httpx.get(vllm.url + "/v1/models", timeout=10).json()["data"]
    assert [(c["id"], c["owned_by"], c["root"], c["max_model_len"]) for c in cards] == [(CHAT, "vllm", MODEL_DIR, 512)]


def test_chat_completion(vllm) -> None:
    r = httpx.post(vllm.url + "/v1/chat/completions", timeout=120, json={
        "model": CHAT, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == CHAT
    assert body["choices"][0]["message"]["role"] == "assistant" and isinstance(body["choices"][0]["message"]["content"], str)
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8


def test_structured_output_with_the_rendered_backend(vllm) -> None:
    """The operator's flags pick xgrammar for structured outputs: it compiles in the image."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = httpx.post(vllm.url + "/v1/chat/completions", timeout=120, json={
        "model": CHAT, "messages": [{"role": "user", "content": "A number"}], "max_tokens": 40, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content)["n"], int)
    else:  # a random model may run out of tokens inside a long number; what it wrote still fits the grammar
        assert content.startswith('{"n":')


def test_runs_as_65532_on_a_read_only_root(vllm) -> None:
    assert vllm.exec("id", "-u").stdout.strip() == "65532"
    proc = vllm.exec("touch", "/opt/vllm/x")
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr


def test_no_cuda_pieces_a_cpu_never_loads(vllm) -> None:
    """The CUDA packages left out of the image stay out (what they weigh is images/README.md's)."""
    proc = vllm.exec("python3", "-c", "import importlib.util as u; print([m for m in ('triton', 'cuda.bindings') "
                     "if u.find_spec(m.split('.')[0])])")
    assert proc.stdout.strip() == "[]", proc.stderr


def test_chat_through_the_gateway(vllm_gateway) -> None:
    cards = httpx.get(vllm_gateway.url + "/v1/models", timeout=10).json()["data"]
    assert [c["id"] for c in cards] == [CHAT]
    r = httpx.post(vllm_gateway.url + "/v1/chat/completions", timeout=120, json={
        "model": CHAT, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant" and r.json()["usage"]["completion_tokens"] <= 8
