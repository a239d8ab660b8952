import asyncio
import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelfleet.demo import ensure_demo_model


@pytest.fixture(scope="session")
def demo_path():
    return ensure_demo_model()


@pytest.fixture(scope="session")
def tiny(demo_path):
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(demo_path)
    model = AutoModelForCausalLM.from_pretrained(demo_path, attn_implementation="sdpa").eval()
    return model, tok


class Api:
    """The worker's app in-process, through httpx.ASGITransport (no sockets, no subprocess).
    Each call runs on its own event loop, as the engine thread serves any loop."""

    def __init__(self, app) -> None:
        self.app = app

    def post(self, path: str, json=None, **kw) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=120) as client:
                return await client.post(path, json=json, **kw)

        return asyncio.run(call())

    def ok(self, path: str, body: dict) -> dict:
        r = self.post(path, json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def events(self, path: str, body: dict) -> list[dict]:
        """The JSON events of a streamed answer; chat and completions streams must end with
        [DONE] (the Responses API's do not), which is left out."""
        r = self.post(path, json={**body, "stream": True})
        assert r.status_code == 200, r.text
        lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        if path != "/v1/responses":
            assert lines.pop() == "[DONE]"
        return [json.loads(line) for line in lines]

    def error(self, path: str, body: dict, param: str | None = None, status: int = 400) -> dict:
        r = self.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if param is not None:
            assert err["param"] == param, err
        return err


@pytest.fixture(scope="session")
def worker(demo_path):
    """A ModelService on the demo model, its engine running, served by the worker's own app."""
    from modelfleet.worker.app import WorkerSettings, create_app, load_service

    service, metrics = load_service(WorkerSettings(source=str(demo_path), served_names=["tiny-chat"],
                                                   max_num_seqs=8))
    service.engine.start()
    yield create_app(service, metrics), service
    service.engine.stop()


@pytest.fixture(scope="session")
def api(worker) -> Api:
    return Api(worker[0])


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory):
    """A random-weight cross-encoder as sentence-transformers loads one: a two-layer
    BertForSequenceClassification with one label and MiniLM's tokenizer. Weights are drawn wider
    than BERT's init so that different pairs get visibly different scores."""
    from transformers import BertConfig, BertForSequenceClassification

    from modelfleet.demo import minilm_path

    path = tmp_path_factory.mktemp("models") / "tiny-cross-encoder"
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
