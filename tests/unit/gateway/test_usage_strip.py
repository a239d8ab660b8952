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
    body = json.dumps({"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": False},
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
