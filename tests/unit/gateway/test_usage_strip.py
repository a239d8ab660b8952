"""A stream whose usage the gateway asked for on the client's behalf reaches the client as the
client asked for it: no usage chunk and no `usage: null`, however the bytes are cut."""

import json

from modelfleet.gateway.registry import model_card
from modelfleet.gateway.usage import UsageScanner, UsageStripper, ask_for_usage

CHUNKS = [
    {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"t{i}"}}],
     "usage": None}
    for i in range(5)
]
USAGE = {"id": "c", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}


def stream(events: list[dict]) -> bytes:
    return b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n")


def test_the_usage_chunk_and_nulls_are_removed_at_every_cut():
    raw = stream([*CHUNKS, USAGE])
    expected = stream([{k: v for k, v in c.items() if k != "usage"} for c in CHUNKS])
    for cut in range(1, len(raw)):
        for step in (cut, 7):
            stripper, scanner, out = UsageStripper(), UsageScanner(0), b""
            pieces = [raw[:cut], *(raw[i:i + step] for i in range(cut, len(raw), step))]
            for piece in pieces:
                scanner.feed(piece)
                out += stripper.feed(piece)
            out += stripper.feed(b"")
            assert out == expected
            assert scanner.tokens() == 12  # the gateway still charged the exact usage


def test_vllm_shaped_chunks_without_usage_fields_pass_unchanged():
    events = [{k: v for k, v in c.items() if k != "usage"} for c in CHUNKS]
    raw = stream([*events, USAGE])
    stripper = UsageStripper()
    assert stripper.feed(raw) + stripper.feed(b"") == stream(events)


def test_asking_for_usage_keeps_the_clients_other_stream_options():
    body = json.dumps({"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": True},
                       "messages": [{"role": "user", "content": "héllo"}]}).encode()
    sent = json.loads(ask_for_usage(body))
    assert sent["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert sent["messages"][0]["content"] == "héllo"


def test_vllm_model_cards_are_listed_in_the_gateways_shape():
    card = {"id": "chat", "object": "model", "created": 5, "owned_by": "vllm", "root": "/models/secret/path",
            "parent": None, "max_model_len": 2048, "permission": []}
    assert model_card(card, "chat") == {"id": "chat", "object": "model", "created": 5, "owned_by": "modelfleet",
                                        "root": "chat", "parent": None, "max_model_len": 2048, "permission": []}
    assert model_card({**card, "id": "alias"}, "chat")["parent"] == "chat"


def test_another_engines_errors_are_reworded_in_openais_shape_once():
    from modelfleet.gateway.engines import ErrorRewriter

    vllm = b'{"error":{"message":"temperature must be in [0, 2]","type":"BadRequestError","param":"temperature",' \
           b'"code":400}}'
    rewriter = ErrorRewriter(400)
    assert rewriter.feed(vllm[:10]) == b"" and rewriter.feed(vllm[10:]) == b""
    assert json.loads(rewriter.feed(b"")) == {"error": {"message": "temperature must be in [0, 2]",
                                                        "type": "invalid_request_error", "param": "temperature",
                                                        "code": None}}
    assert rewriter.feed(b"") == b""
    flat = ErrorRewriter(503)
    flat.feed(b'{"message": "overloaded", "object": "error"}')
    assert json.loads(flat.feed(b""))["error"]["type"] == "service_unavailable"


def test_a_request_for_a_vllm_model_is_checked_like_one_for_modelfleets_engine():
    import pytest

    from modelfleet.gateway.engines import check_for_engine
    from modelfleet.protocol import OpenAIError

    bad = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 5}).encode()
    with pytest.raises(OpenAIError) as info:
        check_for_engine("vllm", "/v1/chat/completions", bad, "m")
    assert info.value.status == 400 and info.value.param == "temperature"
    extras = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                         "guided_choice": ["a", "b"], "top_k": 5, "repetition_penalty": 1.1}).encode()
    check_for_engine("vllm", "/v1/chat/completions", extras, "m")  # vLLM's own parameters pass
    with pytest.raises(OpenAIError, match="Edits"):
        check_for_engine("vllm", "/v1/edits", b'{"model": "m", "instruction": "x"}', "m")
