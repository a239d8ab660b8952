"""/v1/rerank and /v1/score through the gateway, with API keys: the real all-MiniLM-L6-v2
(cosine of its embeddings), a tiny random-weight cross-encoder saved the way
sentence-transformers saves one (so it has a modules.json, like an embedding model), and the
demo chat model, which refuses. Keys, model allowlists, token limits and metrics apply as on
every other path. With vLLM installed, the same requests to MiniLM served by vLLM's pooling
runner must get the same scores and the same errors (MODELFLEET_REQUIRE_VLLM: as in
test_vllm_engine.py)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from modelfleet.demo import ensure_demo_model, minilm_path

from .conftest import tokens_charged

pytestmark = pytest.mark.integration
CHAT, EMBED, CE = "tiny-chat", "all-MiniLM-L6-v2", "tiny-ce"
KEYS = f"""
keys:
  - name: open
    key: sk-open-0123456789
  - name: embed-only
    key: sk-embed-0123456789
    models: [{EMBED}]
  - name: metered
    key: sk-metered-0123456789
    tpm: 30
"""
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "embeddings"
QUERY = "What is the capital of France?"
DOCS = ["Bananas are yellow and grow in bunches.", "Paris is the capital and largest city of France.",
        "The Eiffel Tower stands in Paris.", "Cats sleep for most of the day."]


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer sk-{name}-0123456789"}


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    """A two-layer BertForSequenceClassification with one label and MiniLM's tokenizer, saved by
    sentence-transformers' CrossEncoder."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tmp = tmp_path_factory.mktemp("models")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(tmp / "raw")
    tok.save_pretrained(tmp / "raw")
    CrossEncoder(str(tmp / "raw"), device="cpu", local_files_only=True).save(str(tmp / CE))
    assert (tmp / CE / "modules.json").exists()
    return tmp / CE


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, launch, minilm, cross_encoder):
    tmp = tmp_path_factory.mktemp("rerank")
    (tmp / "keys.yaml").write_text(KEYS)
    proc, url = launch(["serve", "--model", f"{EMBED}={minilm}", "--model", f"{CE}={cross_encoder}",
                        "--model", f"{CHAT}={ensure_demo_model()}", "--api-keys", str(tmp / "keys.yaml")],
                       {EMBED, CE, CHAT}, tmp / "serve.log")
    yield url
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)


def post(url: str, path: str, body: dict, key: str | None = "open") -> httpx.Response:
    return httpx.post(url + path, json=body, headers=auth(key) if key else {}, timeout=60)


def test_rerank_with_minilm_puts_the_answer_first_on_every_path(keyed):
    r = post(keyed, "/v1/rerank", {"model": EMBED, "query": QUERY, "documents": DOCS, "top_n": 2})
    assert r.status_code == 200 and r.headers["x-request-id"]
    body = r.json()
    assert body["model"] == EMBED and [x["index"] for x in body["results"]] == [1, 2]
    assert body["results"][0]["document"] == {"text": DOCS[1]}
    assert body["results"][0]["relevance_score"] > body["results"][1]["relevance_score"] > 0
    assert body["usage"]["total_tokens"] > 0
    for path in ("/rerank", "/v2/rerank"):
        again = post(keyed, path, {"model": EMBED, "query": QUERY, "documents": DOCS, "top_n": 2}).json()
        assert [x["index"] for x in again["results"]] == [1, 2]


def test_score_with_the_cross_encoder_and_the_embedding_model(keyed):
    for model in (CE, EMBED):
        for path in ("/v1/score", "/score"):
            r = post(keyed, path, {"model": model, "text_1": QUERY, "text_2": DOCS})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2, 3]
            assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0
    card = httpx.get(f"{keyed}/v1/models/{CE}", headers=auth("open")).json()
    assert card["task"] == "score" and card["capabilities"]["score"] and not card["capabilities"]["embedding"]


def test_keys_and_allowlists_apply(keyed):
    body = {"model": CE, "query": QUERY, "documents": DOCS}
    assert post(keyed, "/v1/rerank", body, key=None).status_code == 401
    denied = post(keyed, "/v1/rerank", body, key="embed")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert post(keyed, "/v1/rerank", {**body, "model": EMBED}, key="embed").status_code == 200


def test_a_token_limit_is_charged_the_usage_the_answer_reports(keyed):
    r = post(keyed, "/v1/rerank", {"model": CE, "query": QUERY, "documents": DOCS}, key="metered")
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-tokens"] == "30"
    used = r.json()["usage"]["total_tokens"]
    assert used > 30 and tokens_charged(keyed, "metered") == used
    limited = post(keyed, "/v1/score", {"model": CE, "text_1": QUERY, "text_2": DOCS}, key="metered")
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "tokens"


def test_mistakes_and_a_generation_model_get_openai_errors(keyed):
    empty = post(keyed, "/v1/rerank", {"model": EMBED, "query": QUERY, "documents": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "documents"
    uneven = post(keyed, "/v1/score", {"model": CE, "text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert uneven.status_code == 400 and uneven.json()["error"]["param"] == "text_2"
    for path in ("/v1/rerank", "/v1/score"):
        refused = post(keyed, path, {"model": CHAT, "query": QUERY, "documents": DOCS, "text_1": QUERY,
                                     "text_2": DOCS})
        err = refused.json()["error"]
        assert refused.status_code == 400 and err["code"] == "model_not_supported" and err["param"] == "model"
        assert "task `generate`" in err["message"]
    assert httpx.get(keyed + "/v1/rerank", headers=auth("open")).status_code == 405
    lines = httpx.get(keyed + "/metrics").text.splitlines()
    assert any(line.startswith("modelfleet_gateway_requests_total{") and f'model="{CE}"' in line
               and 'status="200"' in line for line in lines)


def test_the_rerank_example_runs_on_whatever_the_server_serves(keyed, tmp_path):
    """examples/embeddings/rerank.py as a user runs it. MiniLM reranking its own candidates is
    the control (same cosine, so the same order); the random-weight cross-encoder's numbers
    are only reported: its scores carry no meaning."""
    env = {**os.environ, "OPENAI_BASE_URL": keyed + "/v1", "OPENAI_API_KEY": "sk-open-0123456789"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "rerank.py"), "--limit", "120", "--results", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| ranking" in proc.stdout
    result = json.loads((tmp_path / "rerank.json").read_text())
    assert result["retriever"] == EMBED and set(result["seconds_per_query"]) == {EMBED, CE}  # not tiny-chat
    similarity, control = result["measures"][f"similarity ({EMBED})"], result["measures"][f"reranked by {EMBED}"]
    assert similarity["recall@10"] >= 0.3  # MiniLM finds the relevant reviews (random ranking: about 0.08)
    assert control == pytest.approx(similarity, abs=0.02)
    assert all(0 <= v <= 1 for m in result["measures"].values() for v in m.values())


# -- vLLM's pooling runner behind the same gateway -----------------------------------------------

def test_vllm_serves_minilm_scores_as_modelfleet_does(keyed, vllm_serve):
    """MiniLM on vLLM's pooling runner (conftest's shared `vllm_serve`), through the gateway."""
    vllm_embed = vllm_serve
    for path, body in [("/v1/rerank", {"model": EMBED, "query": QUERY, "documents": DOCS}),
                       ("/v1/score", {"model": EMBED, "text_1": QUERY, "text_2": DOCS})]:
        ours, theirs = post(keyed, path, body).json(), post(vllm_embed, path, body).json()
        assert ours["usage"]["total_tokens"] == theirs["usage"]["total_tokens"]
        if path == "/v1/rerank":
            assert [x["index"] for x in ours["results"]] == [x["index"] for x in theirs["results"]]
            assert [x["document"]["text"] for x in theirs["results"]] == [DOCS[x["index"]] for x in ours["results"]]
            pairs = [(x["relevance_score"], y["relevance_score"]) for x, y in zip(ours["results"], theirs["results"], strict=True)]
        else:
            pairs = [(x["score"], y["score"]) for x, y in zip(ours["data"], theirs["data"], strict=True)]
        assert all(abs(a - b) < 1e-3 for a, b in pairs), pairs
    empty = post(vllm_embed, "/v1/rerank", {"model": EMBED, "query": QUERY, "documents": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "documents"  # the gateway's check
    assert post(vllm_embed, "/v1/rerank", {"model": EMBED, "query": QUERY, "documents": DOCS}, key=None).status_code \
        == 401

