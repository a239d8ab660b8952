"""LoRA adapters in one shape on both engines: vLLM's CPU build and modelfleet's worker, each
serving the vLLM demo model with the same adapter from make_demo_adapter, list it alike, load
and unload at runtime with the same texts, and give the same greedy text.

vLLM is the tier's shared `vllm_direct` server (a start takes minutes here); without its
environment these tests skip, unless MODELFLEET_REQUIRE_VLLM is set (as in test_vllm_engine.py).
"""

from pathlib import Path

import httpx
import pytest

from modelfleet.devcluster import stop_group

from .conftest import require_vllm

pytestmark = pytest.mark.integration

require_vllm()


@pytest.fixture(scope="module")
def worker_url(vllm_direct, launch, tmp_path_factory):
    """modelfleet's worker with vLLM's settings in `vllm_direct` (the tier's shared vLLM server)."""
    proc, url = launch(["worker", "--model", str(vllm_direct.base), "--served-name", "tiny-chat", "--dtype",
                        "float32", "--max-model-len", "512", "--max-num-seqs", "8", "--lora-modules",
                        f"ada={vllm_direct.adapters['ada']}"], {"tiny-chat"},
                       tmp_path_factory.mktemp("lora-worker") / "worker.log")
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


def test_both_engines_list_load_serve_and_unload_adapters_alike(vllm_direct, worker_url):
    adapters = vllm_direct.adapters
    urls = {"vllm": vllm_direct.url, "modelfleet": worker_url}
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
