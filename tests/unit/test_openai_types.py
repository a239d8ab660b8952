"""The typed OpenAI response bodies: which fields are left out and which are sent as null, and
that the stream's hand-framed chunks (the hot path) are exactly what the typed chunks say."""

import json

import pytest

from modelfleet.openai_types import (
    ChatCompletion,
    ChatCompletionChunk,
    CompletionChunk,
    ModelCard,
    ModelPermission,
    RerankResult,
    Usage,
)
from modelfleet.protocol import error_body
from modelfleet.worker.formatting import Shown, token_id_name
from modelfleet.worker.streams import Chunks


def test_null_fields_are_sent_and_omitted_fields_are_left_out():
    body = ChatCompletion(id="chatcmpl-1", created=1, model="m", choices=[
        {"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}], usage=Usage.of(3, 2, 1)).dump()
    assert body == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                  "prompt_tokens_details": {"cached_tokens": 1}},
    }
    assert "document" not in RerankResult(index=0, relevance_score=0.5).dump()
    assert error_body("no", code="c") == {"error": {"message": "no", "type": "invalid_request_error",
                                                    "param": None, "code": "c"}}


def test_one_card_shape_for_the_worker_and_the_gateway():
    worker = ModelCard.of("alias", "chat", created=5, max_model_len=2048, task="generate",
                          permission=[ModelPermission(id="modelperm-alias", created=5)]).dump()
    assert worker["root"] == "chat" and worker["parent"] == "chat" and worker["owned_by"] == "modelfleet"
    assert "ready" not in worker and "capabilities" not in worker
    vllm = {"id": "chat", "object": "model", "created": 5, "owned_by": "vllm", "root": "/models/x",
            "parent": None, "permission": [{"id": "p", "allow_create_engine": False}]}
    listed = ModelCard.from_backend(vllm, "chat").dump()
    assert listed == {"id": "chat", "object": "model", "created": 5, "owned_by": "modelfleet", "root": "chat",
                      "parent": None, "permission": [{"id": "p", "allow_create_engine": False}]}


@pytest.mark.parametrize("include_usage, continuous", [(False, False), (True, False), (True, True)])
def test_hand_framed_chunks_are_the_typed_chunks(include_usage, continuous):
    shown = Shown(token_id_name, include_usage=include_usage, continuous_usage=continuous)
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "system_fingerprint": "fp_1"}
    chunk = Chunks(base, shown)
    sent = [
        chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
              (3, 0), prompt_token_ids=[1, 2, 3]),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                     "function": {"name": "f", "arguments": ""}}]},
               "logprobs": None, "finish_reason": None, "token_ids": [7]}, (3, 1)),
        chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}, (3, 1)),
        chunk.usage(3, 1, 2),
    ]
    for raw in sent:
        body = json.loads(raw.removeprefix(b"data: "))
        assert ChatCompletionChunk.model_validate(body).dump() == body
    text = Chunks({**base, "object": "text_completion"}, shown)(
        {"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}, (3, 1))
    body = json.loads(text.removeprefix(b"data: "))
    assert CompletionChunk.model_validate(body).dump() == body
    assert ("usage" in body) is include_usage
