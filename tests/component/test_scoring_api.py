"""/v1/score and /v1/rerank on the worker's own app: a tiny random-weight cross-encoder (scores
must equal sentence-transformers' CrossEncoder.predict), the real all-MiniLM-L6-v2 (scores must
equal the cosine of SentenceTransformer.encode's embeddings), and the demo chat model, which
refuses both in OpenAI's error format."""

import asyncio
import math

import httpx
import numpy as np
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer

from modelfleet.demo import minilm_path

from .conftest import Api

QUERY = "What is the capital of France?"
DOCS = ["Bananas are yellow and grow in bunches.", "Paris is the capital and largest city of France.",
        "The Eiffel Tower stands in Paris.", "Cats sleep for most of the day."]


class OneLoopApi(Api):
    """Api on one event loop: the batcher that scores and embeds waits on an asyncio.Event,
    which binds to the first loop it waits on (a server has one loop; Api makes one per call)."""

    def __init__(self, app) -> None:
        super().__init__(app)
        self.loop = asyncio.new_event_loop()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def post(self, path: str, json=None, **kw) -> httpx.Response:
        async def call() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://worker",
                                         timeout=120) as client:
                return await client.post(path, json=json, **kw)

        return self.run(call())


def load_api(source, name: str):
    from modelfleet.worker.app import WorkerSettings, create_app, load_service

    service, metrics = load_service(WorkerSettings(source=str(source), served_names=[name]))
    api = OneLoopApi(create_app(service, metrics))
    yield api
    api.loop.close()


@pytest.fixture(scope="module")
def ce(tiny_cross_encoder):
    yield from load_api(tiny_cross_encoder, "tiny-ce")


@pytest.fixture(scope="module")
def ce_reference(tiny_cross_encoder):
    return CrossEncoder(str(tiny_cross_encoder), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def minilm():
    yield from load_api(minilm_path(), "minilm")


@pytest.fixture(scope="module")
def minilm_reference():
    return SentenceTransformer(str(minilm_path()), device="cpu")


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- cross-encoder -----------------------------------------------------------------------------

def test_cross_encoder_is_detected_and_says_what_it_serves(ce):
    models = ce.run(_get(ce.app, "/v1/models"))["data"]
    assert models[0]["task"] == "score"
    assert models[0]["capabilities"] == {"chat": False, "completion": False, "embedding": False, "score": True}
    err = ce.error("/v1/embeddings", {"model": "tiny-ce", "input": "x"}, param="model")
    assert err["code"] == "model_not_supported" and "cross-encoder" in err["message"]
    err = ce.error("/v1/chat/completions", {"model": "tiny-ce", "messages": [{"role": "user", "content": "x"}]},
                   param="model")
    assert "task `score`" in err["message"]


async def _get(app, path: str) -> dict:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
        r = await client.get(path)
        assert r.status_code == 200, r.text
        return r.json()


def test_rerank_scores_are_the_cross_encoders_ranked(ce, ce_reference):
    expected = ce_reference.predict([(QUERY, d) for d in DOCS])
    assert len(set(np.round(expected, 4))) == len(DOCS)  # the tiny model tells the documents apart
    body = ce.ok("/v1/rerank", {"model": "tiny-ce", "query": QUERY, "documents": DOCS})
    assert set(body) == {"id", "model", "usage", "results"} and body["model"] == "tiny-ce"
    assert [r["index"] for r in body["results"]] == list(np.argsort(-expected))
    for r in body["results"]:
        assert r["relevance_score"] == pytest.approx(float(expected[r["index"]]), abs=1e-5)
        assert r["document"] == {"text": DOCS[r["index"]]}
    tokens = sum(len(ce_reference.tokenizer(QUERY, d)["input_ids"]) for d in DOCS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_rerank_top_n_return_documents_and_vllms_other_paths(ce):
    full = ce.ok("/v1/rerank", {"model": "tiny-ce", "query": QUERY, "documents": DOCS})["results"]
    top = ce.ok("/v1/rerank", {"model": "tiny-ce", "query": QUERY, "documents": DOCS, "top_n": 2,
                               "return_documents": False})["results"]
    assert [r["index"] for r in top] == [r["index"] for r in full[:2]]
    assert all("document" not in r for r in top)
    for path in ("/rerank", "/v2/rerank"):
        same = ce.ok(path, {"model": "tiny-ce", "query": QUERY, "documents": DOCS})["results"]
        assert [(r["index"], round(r["relevance_score"], 5)) for r in same] == \
            [(r["index"], round(r["relevance_score"], 5)) for r in full]
    one = ce.ok("/v1/rerank", {"model": "tiny-ce", "query": QUERY, "documents": DOCS[1]})["results"]
    assert [r["index"] for r in one] == [0]


def test_score_one_to_many_pairwise_and_raw_logits(ce, ce_reference):
    body = ce.ok("/v1/score", {"model": "tiny-ce", "text_1": QUERY, "text_2": DOCS})
    assert body["object"] == "list" and isinstance(body["created"], int) and body["id"]
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and {d["object"] for d in body["data"]} == {"score"}
    expected = ce_reference.predict([(QUERY, d) for d in DOCS])
    assert [d["score"] for d in body["data"]] == pytest.approx(list(map(float, expected)), abs=1e-5)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0

    pairwise = ce.ok("/score", {"model": "tiny-ce", "queries": DOCS[:2], "documents": DOCS[2:]})
    expected = ce_reference.predict([(DOCS[0], DOCS[2]), (DOCS[1], DOCS[3])])
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(list(map(float, expected)), abs=1e-5)

    raw = ce.ok("/v1/score", {"model": "tiny-ce", "text_1": QUERY, "text_2": DOCS[0], "use_activation": False})
    logit = raw["data"][0]["score"]
    assert 1 / (1 + math.exp(-logit)) == pytest.approx(body["data"][0]["score"], abs=1e-5)


def test_more_documents_than_one_forward_pass_takes(ce, ce_reference):
    docs = [f"{DOCS[i % 4]} Number {i}." for i in range(150)]  # the scorer runs 64 pairs a pass
    body = ce.ok("/v1/score", {"model": "tiny-ce", "text_1": QUERY, "text_2": docs})
    expected = ce_reference.predict([(QUERY, d) for d in docs])
    assert [d["score"] for d in body["data"]] == pytest.approx(list(map(float, expected)), abs=1e-5)


def test_concurrent_requests_share_batches_and_keep_their_own_answers(ce):
    alone = [ce.ok("/v1/score", {"model": "tiny-ce", "text_1": d, "text_2": DOCS})["data"] for d in DOCS]

    async def together() -> list[dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ce.app), base_url="http://worker") as c:
            answers = await asyncio.gather(*(c.post("/v1/score", json={"model": "tiny-ce", "text_1": d,
                                                                         "text_2": DOCS}) for d in DOCS))
        return [a.json()["data"] for a in answers]

    for mine, single in zip(ce.run(together()), alone, strict=True):
        assert [d["score"] for d in mine] == pytest.approx([d["score"] for d in single], abs=1e-5)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
    ("/v1/rerank", {"documents": DOCS}, "query"),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": -1}, "top_n"),
    ("/v1/rerank", {"query": QUERY, "documents": [{"text": "cohere's object form"}]}, "documents"),
    ("/v1/score", {"text_1": DOCS[:2], "text_2": DOCS[:3]}, "text_2"),
    ("/v1/score", {"text_1": [], "text_2": DOCS}, "text_1"),
    ("/v1/score", {"text_1": QUERY}, "text_2"),
    ("/v1/score", {"text_1": QUERY, "text_2": ["x"] * 2049}, "text_2"),
])
def test_bad_requests_get_a_400_naming_the_parameter(ce, path, body, param):
    ce.error(path, {"model": "tiny-ce", **body}, param=param)


def test_unknown_model_is_a_404(ce):
    ce.error("/v1/rerank", {"model": "nope", "query": QUERY, "documents": DOCS}, param="model", status=404)


# -- embedding model: cosine -----------------------------------------------------------------------

def test_embedding_model_scores_by_cosine_of_its_embeddings(minilm, minilm_reference):
    vectors = minilm_reference.encode([QUERY, *DOCS])
    expected = [cosine(vectors[0], v) for v in vectors[1:]]
    body = minilm.ok("/v1/score", {"model": "minilm", "text_1": QUERY, "text_2": DOCS})
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-4)
    tokens = sum(len(minilm_reference.tokenizer(t)["input_ids"]) for t in [QUERY, *DOCS])
    assert body["usage"]["total_tokens"] == tokens

    ranked = minilm.ok("/v1/rerank", {"model": "minilm", "query": QUERY, "documents": DOCS, "top_n": 2})
    assert [r["index"] for r in ranked["results"]] == [1, 2]  # the capital, then the Eiffel Tower
    assert ranked["results"][0]["relevance_score"] == pytest.approx(expected[1], abs=1e-4)

    same = minilm.ok("/v1/score", {"model": "minilm", "text_1": [DOCS[0], DOCS[1]], "text_2": [DOCS[0], DOCS[1]]})
    assert [d["score"] for d in same["data"]] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_embedding_model_card_offers_score(minilm):
    card = minilm.run(_get(minilm.app, "/v1/models"))["data"][0]
    assert card["task"] == "embed" and card["capabilities"]["score"] and card["capabilities"]["embedding"]


# -- generation model: refused -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/rerank", "/v1/score"])
def test_generation_model_refuses_naming_its_task(api, path):
    body = {"model": "tiny-chat", "query": QUERY, "documents": DOCS, "text_1": QUERY, "text_2": DOCS}
    err = api.error(path, body, param="model")
    assert err["code"] == "model_not_supported" and "task `generate`" in err["message"]
    card = asyncio.run(_get(api.app, "/v1/models"))["data"][0]
    assert card["capabilities"]["score"] is False
