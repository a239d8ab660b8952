"""Score and rerank without a model: pairing, cosine, ranking, the answers' shapes, the request
checks the worker and the gateway share, and how the worker tells a cross-encoder."""

import pytest
import torch

from modelfleet.gateway.engines import check_for_engine
from modelfleet.protocol import RerankRequest, ScoreRequest, parse_request
from modelfleet.worker.loader import is_cross_encoder
from modelfleet.worker.scoring import cosine_scores, pairs, rank, rerank_response, score_response


def test_pairs_one_to_many_and_pairwise():
    assert pairs(["q"], ["a", "b"]) == [("q", "a"), ("q", "b")]
    assert pairs(["q", "r"], ["a", "b"]) == [("q", "a"), ("r", "b")]
    assert pairs(["q"], ["a"]) == [("q", "a")]


def test_cosine_is_computed_not_assumed_and_one_first_vector_serves_all():
    q = [torch.tensor([3.0, 0.0])]
    docs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([-5.0, 0.0]), torch.tensor([1.0, 1.0])]
    assert cosine_scores(q, docs) == pytest.approx([1.0, 0.0, -1.0, 2 ** -0.5])
    assert cosine_scores(docs[:2], docs[2:]) == pytest.approx([-1.0, 2 ** -0.5])


def test_rank_sorts_by_score_stable_on_ties_and_cuts_to_top_n():
    scores, docs = [0.1, 0.9, 0.5, 0.9], ["a", "b", "c", "d"]
    results = rank(scores, docs, None)
    assert [r["index"] for r in results] == [1, 3, 2, 0]
    assert results[0] == {"index": 1, "relevance_score": 0.9, "document": {"text": "b"}}
    assert [r["index"] for r in rank(scores, docs, 0)] == [1, 3, 2, 0]  # vLLM's 0: all of them
    assert [r["index"] for r in rank(scores, docs, 2)] == [1, 3]
    assert len(rank(scores, docs, 10)) == 4
    assert all("document" not in r for r in rank(scores, docs, 2, return_documents=False))


def test_answers_have_vllms_shapes():
    rerank = rerank_response("m", [0.2, 0.7], ["a", "b"], 1, True, 12)
    assert set(rerank) == {"id", "model", "usage", "results"}
    assert rerank["usage"] == {"prompt_tokens": 12, "total_tokens": 12}
    assert rerank["results"] == [{"index": 1, "relevance_score": 0.7, "document": {"text": "b"}}]
    score = score_response("m", [0.2, 0.7], 9)
    assert score["object"] == "list" and score["model"] == "m" and score["id"].startswith("score-")
    assert score["data"] == [{"index": 0, "object": "score", "score": 0.2}, {"index": 1, "object": "score", "score": 0.7}]
    assert score["usage"]["prompt_tokens"] == score["usage"]["total_tokens"] == 9
    assert score["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("first, second", [("text_1", "text_2"), ("queries", "documents"), ("queries", "items"),
                                           ("data_1", "data_2")])
def test_score_request_takes_vllms_names_for_both_sides(first, second):
    req = parse_request(ScoreRequest, f'{{"model": "m", "{first}": "q", "{second}": ["a", "b"]}}'.encode())
    assert req.text_1 == "q" and req.text_2 == ["a", "b"]


@pytest.mark.parametrize("body, param, words", [
    ('{"text_1": [], "text_2": "a"}', "text_1", "At least one text element"),
    ('{"text_1": "q", "text_2": []}', "text_2", "At least one text_pair element"),
    ('{"text_1": ["q", "r"], "text_2": ["a", "b", "c"]}', "text_2", "1:1, 1:N or N:N"),
    ('{"text_1": "q"}', "text_2", "required"),
    ('{"text_1": 3, "text_2": "a"}', "text_1", ""),
])
def test_score_request_checks(body, param, words):
    from modelfleet.protocol import OpenAIError

    with pytest.raises(OpenAIError) as exc:
        parse_request(ScoreRequest, body.encode())
    assert exc.value.status == 400 and exc.value.param == param and words in exc.value.message


def test_rerank_request_defaults_and_checks():
    from modelfleet.protocol import OpenAIError

    req = parse_request(RerankRequest, b'{"model": "m", "query": "q", "documents": "one", "extra": 1}')
    assert req.documents == "one" and req.top_n is None and req.return_documents is True
    for body, param in [(b'{"query": "q", "documents": []}', "documents"),
                        (b'{"query": "q", "documents": ["a"], "top_n": -1}', "top_n"),
                        (b'{"documents": ["a"]}', "query"),
                        (b'{"query": "q", "documents": ["a"], "return_documents": "yes please"}', "return_documents")]:
        with pytest.raises(OpenAIError) as exc:
            parse_request(RerankRequest, body)
        assert exc.value.param == param


def test_gateway_checks_score_bodies_for_vllm_replicas_as_the_worker_does():
    from modelfleet.protocol import OpenAIError

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        with pytest.raises(OpenAIError) as exc:
            check_for_engine("vllm", path, b'{"model": "m", "query": "q", "documents": []}', "m")
        assert exc.value.param == "documents"
    for path in ("/v1/score", "/score"):
        with pytest.raises(OpenAIError) as exc:
            check_for_engine("vllm", path, b'{"model": "m", "text_1": ["a", "b"], "text_2": ["c"]}', "m")
        assert exc.value.param == "text_2"
    check_for_engine("vllm", "/v1/rerank", b'{"model": "m", "query": "q", "documents": ["a"], "top_n": 1}', "m")


@pytest.mark.parametrize("config, expected", [
    ({"architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"}}, True),
    ({"architectures": ["XLMRobertaForSequenceClassification"], "num_labels": 1}, True),
    ({"architectures": ["BertForSequenceClassification"], "id2label": {"0": "NEG", "1": "POS"}}, False),
    ({"architectures": ["BertForSequenceClassification"]}, False),  # transformers' default: two labels
    ({"architectures": ["BertModel"]}, False),
    ({"architectures": ["LlamaForCausalLM"], "id2label": {"0": "LABEL_0"}}, False),
])
def test_cross_encoder_is_a_one_label_sequence_classifier(config, expected):
    assert is_cross_encoder(config) is expected
