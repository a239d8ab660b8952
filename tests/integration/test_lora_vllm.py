"""LoRA adapters in one shape on both engines: vLLM's CPU build and modelfleet's worker, each
serving the vLLM demo model with the same adapter from make_demo_adapter, list it alike, load
and unload at runtime with the same texts, and give the same greedy text.

vLLM takes minutes to start here; without its environment these tests skip, unless
MODELFLEET_REQUIRE_VLLM is set (as in test_vllm_engine.py).
"""

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from modelfleet.demo import VLLM_DEMO_SPEC, ensure_demo_model, make_demo_adapter
from modelfleet.devcluster import stop_group, wait_for
from modelfleet.engines import VLLM_SERVER_MODULE, VllmServer, find_vllm_python, vllm_env
from modelfleet.netutil import free_port

from .conftest import require_vllm

pytestmark = pytest.mark.integration

require_vllm()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-engines")
    base = ensure_demo_model(VLLM_DEMO_SPEC)
    return tmp, base, {n: make_demo_adapter(base, tmp / n, rank=8, seed=s) for n, s in (("ada", 1), ("adb", 2))}


@pytest.fixture(scope="module")
def vllm_url(setup):
    tmp, base, adapters = setup
    port = free_port()
    server = VllmServer(model=str(base), served_names=["tiny-chat"], host="127.0.0.1", port=port, dtype="float32",
                        max_model_len=512, max_num_seqs=8, task="generate",
                        extra_args=["--enable-lora", "--lora-modules", f"ada={adapters['ada']}", "--max-loras", "4",
                                    "--max-lora-rank", "16"])
    env = {**os.environ, **vllm_env(gpu=False, kv_cache_gib=1), "HF_HUB_OFFLINE": "1",
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    log = (tmp / "vllm.log").open("w")
    # -P and another directory: the checkout's operator/ must not shadow the standard library's
    proc = subprocess.Popen([find_vllm_python(), "-P", "-m", VLLM_SERVER_MODULE, *server.args()], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{(tmp / 'vllm.log').read_text()[-3000:]}")
        return httpx.get(url + "/health", timeout=2).status_code == 200

    try:
        wait_for(healthy, 480, "vLLM to serve", interval=1)  # within pytest-timeout's 600 s
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def worker_url(setup, launch):
    tmp, base, adapters = setup
    proc, url = launch(["worker", "--model", str(base), "--served-name", "tiny-chat", "--dtype", "float32",
                        "--max-model-len", "512", "--max-num-seqs", "8", "--lora-modules", f"ada={adapters['ada']}"],
                       {"tiny-chat"}, tmp / "worker.log")
    yield url
    stop_group(proc)


def adapter_cards(url: str) -> dict[str, tuple]:
    cards = httpx.get(url + "/v1/models", timeout=10).json()["data"]
    return {c["id"]: (c["parent"], c["root"]) for c in cards if c["parent"] is not None}


def greedy(url: str, model: str) -> str:
    r = httpx.post(url + "/v1/completions", timeout=120,
                   json={"model": model, "prompt": "def main(", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_both_engines_list_load_serve_and_unload_adapters_alike(setup, vllm_url, worker_url):
    _, _, adapters = setup
    urls = {"vllm": vllm_url, "modelfleet": worker_url}
    for url in urls.values():
        assert adapter_cards(url) == {"ada": ("tiny-chat", str(adapters["ada"]))}
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "adb", "lora_path": str(adapters["adb"])})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'adb' added successfully.")
        assert adapter_cards(url)["adb"] == ("tiny-chat", str(adapters["adb"]))
        dup = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "adb", "lora_path": str(adapters["adb"])})
        missing = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(Path("/nope"))})
        assert (dup.status_code, missing.status_code) == (400, 404)
    texts = {name: {m: greedy(url, m) for m in ("tiny-chat", "ada", "adb")} for name, url in urls.items()}
    assert texts["modelfleet"] == texts["vllm"]
    assert len(set(texts["vllm"].values())) == 3  # each adapter changes the output
    for url in urls.values():
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "adb"})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'adb' removed successfully.")
        gone = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "adb"})
        assert gone.status_code == 404 and gone.json()["error"]["message"] == "The lora adapter 'adb' cannot be found."
        r = httpx.post(url + "/v1/completions", json={"model": "adb", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404
        assert set(adapter_cards(url)) == {"ada"}
