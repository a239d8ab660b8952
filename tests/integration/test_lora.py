"""LoRA adapters through `modelfleet serve --lora-modules`: the worker loads the adapter at start
and the gateway in front (static discovery) routes the adapter's name to it."""

import httpx
import pytest

from modelfleet.demo import ensure_demo_model, make_demo_adapter

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lora_serve(tmp_path_factory, launch):
    tmp = tmp_path_factory.mktemp("lora")
    base = ensure_demo_model()
    adapter = make_demo_adapter(base, tmp / "adapter", rank=8, seed=1)
    proc, url = launch(["serve", "--model", f"tiny-chat={base}", "--lora-modules", f"tiny-chat-lora={adapter}",
                        "--max-num-seqs", "8", "--dtype", "float32"], {"tiny-chat"}, tmp / "serve.log")
    yield url
    from .conftest import stop

    stop(proc)


def test_the_adapter_is_listed_and_routable_through_the_gateway(lora_serve):
    cards = {c["id"]: c for c in httpx.get(lora_serve + "/v1/models", timeout=10).json()["data"]}
    assert {"tiny-chat", "tiny-chat-lora"} <= set(cards)
    assert cards["tiny-chat-lora"]["parent"] == "tiny-chat"

    body = {"prompt": "def main(", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    answers = {}
    for model in ("tiny-chat", "tiny-chat-lora"):
        r = httpx.post(lora_serve + "/v1/completions", json={**body, "model": model}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        answers[model] = r.json()["choices"][0]["text"]
    assert answers["tiny-chat-lora"] != answers["tiny-chat"]

    chat = {"model": "tiny-chat-lora", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    r = httpx.post(lora_serve + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny-chat-lora", r.text
    r = httpx.post(lora_serve + "/v1/embeddings", json={"model": "tiny-chat-lora", "input": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
