"""Stored Responses as an OpenAI SDK user meets them on `modelfleet serve` (one gateway, its
memory store): create, continue with previous_response_id (the real worker answers the whole
conversation), retrieve, list input items, delete; a worker hit directly refuses the id."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import CHAT


def test_store_continue_retrieve_and_delete_with_the_openai_sdk(openai_client):
    first = openai_client.responses.create(model=CHAT, input="My name is Ada.", max_output_tokens=8)
    assert first.store is True and first.previous_response_id is None

    second = openai_client.responses.create(model=CHAT, input="What is my name?", previous_response_id=first.id,
                                            instructions="Answer briefly.", max_output_tokens=8)
    assert second.previous_response_id == first.id
    # The worker was sent the first turn too: more prompt tokens than the new input alone.
    alone = openai_client.responses.create(model=CHAT, input="What is my name?", instructions="Answer briefly.",
                                           max_output_tokens=8, store=False)
    assert second.usage.input_tokens > alone.usage.input_tokens

    assert openai_client.responses.retrieve(second.id).output_text == second.output_text
    items = list(openai_client.responses.input_items.list(second.id, order="asc"))
    assert [i.role for i in items] == ["user", "assistant", "user"]

    openai_client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(alone.id)  # store=False kept nothing


def test_a_streamed_response_is_kept_and_continued(openai_client):
    events = list(openai_client.responses.create(model=CHAT, input="Count to three.", max_output_tokens=8,
                                                 stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")  # 8 tokens may cut it short
    final = events[-1].response
    assert final.store is True
    assert openai_client.responses.retrieve(final.id).output_text == final.output_text
    more = openai_client.responses.create(model=CHAT, input="Go on.", previous_response_id=final.id,
                                          max_output_tokens=4)
    assert more.previous_response_id == final.id


def test_a_worker_hit_directly_refuses_previous_response_id(server):
    worker = next(b for b in httpx.get(server + "/metrics").text.splitlines()
                  if b.startswith("modelfleet_gateway_backend_available{") and f'model="{CHAT}"' in b)
    url = worker.split('backend="', 1)[1].split('"', 1)[0]
    r = httpx.post(url + "/v1/responses", timeout=60, json={"model": CHAT, "input": "hi",
                                                            "previous_response_id": "resp-1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    ok = httpx.post(url + "/v1/responses", timeout=60, json={"model": CHAT, "input": "hi", "store": True,
                                                             "max_output_tokens": 2})
    assert ok.status_code == 200  # accepted and ignored: a worker keeps nothing
