"""Embedding inputs are checked as a whole request before any is computed (worker/embedder.py,
CausalEmbedder on the demo chat model): a bad input far down a long list is reported by its
index in the request, and a request sharing the batch with it is answered all the same."""

import asyncio

import httpx

MODEL = "tiny-chat"
FORWARD_ITEMS = 32  # CausalEmbedder's forward pass; the lists below span several


def too_long(service) -> list[int]:
    return [5] * (service.info.max_model_len + 1)


def test_an_input_too_long_late_in_a_long_list_is_named_by_its_index_in_the_request(api, worker):
    service = worker[1]
    late = 3 * FORWARD_ITEMS + 5
    inputs = [[5, 6, 7]] * late + [too_long(service)] + [[8, 9]] * 3
    err = api.error("/v1/embeddings", {"model": MODEL, "input": inputs}, param="input")
    assert err["code"] == "context_length_exceeded"
    assert err["message"].startswith(f"Input {late} has {service.info.max_model_len + 1} tokens"), err
    text = "word " * (service.info.max_model_len + 10)
    err = api.error("/v1/embeddings", {"model": MODEL, "input": ["fine", text]}, param="input")
    assert err["code"] == "context_length_exceeded" and err["message"].startswith("Input 1 has "), err


def test_a_bad_request_does_not_fail_the_requests_batched_with_it(worker):
    app, service = worker
    good = {"model": MODEL, "input": ["a cat sat on the mat"] * 3}
    bad = {"model": MODEL, "input": [[5, 6], too_long(service)]}

    async def together() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json=body) for body in (good, bad, good)))

    first, failed, second = asyncio.run(together())
    assert failed.status_code == 400 and failed.json()["error"]["message"].startswith("Input 1 has "), failed.text
    for answer in (first, second):
        assert answer.status_code == 200, answer.text
        assert [item["index"] for item in answer.json()["data"]] == [0, 1, 2]
