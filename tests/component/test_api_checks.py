"""Findings of the reliability review, each through the worker's app in-process on the demo
model: input checks that answer 400 naming the parameter, completions and Responses logprobs
in OpenAI's shape, /tokenize's chat options, and quiet client disconnects."""

import asyncio
import logging

import pytest

from modelfleet.http import ClientGone
from modelfleet.worker.api_common import until_disconnect

CHAT = "tiny-chat"
MSG = [{"role": "user", "content": "Hello"}]


def chat(**kw) -> dict:
    return {"model": CHAT, "messages": MSG, **kw}


def completion(**kw) -> dict:
    return {"model": CHAT, "prompt": "Once upon a time", **kw}


# -- stream_options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [("/v1/chat/completions", chat()), ("/v1/completions", completion())])
def test_stream_options_without_stream_is_a_400(api, path, body):
    for stream in (None, False):
        extra = {} if stream is None else {"stream": stream}
        api.error(path, {**body, **extra, "stream_options": {"include_usage": True}}, "stream_options")
    api.events(path, {**body, "max_tokens": 2, "stream_options": {"include_usage": True}})


# -- content type -----------------------------------------------------------------------------------

BODIES = {"/v1/chat/completions": chat(max_tokens=1), "/v1/completions": completion(max_tokens=1),
          "/v1/embeddings": {"model": CHAT, "input": "hi"}, "/tokenize": {"model": CHAT, "prompt": "hi"}}


@pytest.mark.parametrize("path", list(BODIES))
def test_a_body_that_is_not_declared_json_is_a_400(api, path):
    import json

    raw = json.dumps(BODIES[path]).encode()
    for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        r = api.post(path, content=raw, headers={"content-type": ctype, "x-request-id": "ct-1"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "ct-1", r.text
        err = r.json()["error"]
        assert ctype.split(";")[0] in err["message"] and err["type"] == "invalid_request_error"
    for headers in ({}, {"content-type": "application/json"}, {"content-type": "Application/JSON; charset=utf-8"}):
        assert api.post(path, content=raw, headers=headers).status_code == 200, headers


# -- completions logprobs ---------------------------------------------------------------------------

def test_completions_logprobs_zero_lists_the_sampled_token(api):
    lp = api.ok("/v1/completions", completion(logprobs=0, max_tokens=6))["choices"][0]["logprobs"]
    assert [list(top) for top in lp["top_logprobs"]] == [[tok] for tok in lp["tokens"]]
    assert [top[tok] for top, tok in zip(lp["top_logprobs"], lp["tokens"], strict=True)] == lp["token_logprobs"]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_top_logprobs_always_hold_the_sampled_token(api, stream):
    """At a high temperature the sampled token is mostly not the most likely one: OpenAI then
    lists it beside the top k, so a dict has up to k + 1 entries."""
    body = completion(logprobs=1, max_tokens=16, temperature=2.0, seed=11, ignore_eos=True)
    if stream:
        events = api.events("/v1/completions", body)
        parts = [e["choices"][0]["logprobs"] for e in events if e["choices"] and e["choices"][0]["logprobs"]]
        tokens = [t for p in parts for t in p["tokens"]]
        tops = [t for p in parts for t in p["top_logprobs"]]
    else:
        lp = api.ok("/v1/completions", body)["choices"][0]["logprobs"]
        tokens, tops = lp["tokens"], lp["top_logprobs"]
    assert len(tokens) == 16
    assert all(tok in top and 1 <= len(top) <= 2 for tok, top in zip(tokens, tops, strict=True))
    assert any(len(top) == 2 for top in tops)  # some sampled tokens were outside the top 1


def test_echoed_prompt_logprobs_hold_the_prompt_token(api):
    body = api.ok("/v1/completions", completion(echo=True, logprobs=1, max_tokens=0))
    lp = body["choices"][0]["logprobs"]
    assert lp["top_logprobs"][0] is None and lp["token_logprobs"][0] is None
    assert all(tok in top and len(top) <= 2 for tok, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:],
                                                               strict=True))


# -- /tokenize --------------------------------------------------------------------------------------

def test_tokenize_renders_messages_with_the_chat_options(api, worker):
    tok = worker[1].tokenizer
    opened = api.ok("/tokenize", {"model": CHAT, "messages": MSG})
    closed = api.ok("/tokenize", {"model": CHAT, "messages": MSG, "add_generation_prompt": False})
    assert tok.decode(opened["tokens"]).endswith("<|im_start|>assistant\n")
    assert opened["tokens"][: closed["count"]] == closed["tokens"] and closed["count"] < opened["count"]
    partial = MSG + [{"role": "assistant", "content": "Hi the"}]
    cont = api.ok("/tokenize", {"model": CHAT, "messages": partial, "continue_final_message": True})
    assert tok.decode(cont["tokens"]).endswith("<|im_start|>assistant\nHi the")
    api.error("/tokenize", {"model": CHAT, "messages": partial, "continue_final_message": True,
                            "add_generation_prompt": True}, "continue_final_message")
    with_tools = api.ok("/tokenize", {"model": CHAT, "messages": MSG, "tools": [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]})
    assert "lookup" in tok.decode(with_tools["tokens"])


def test_tokenize_returns_token_strings_when_asked(api, worker):
    r = api.ok("/tokenize", {"model": CHAT, "prompt": "Hello wörld", "return_token_strs": True})
    assert r["token_strs"] == worker[1].tokenizer.convert_ids_to_tokens(r["tokens"])
    assert "token_strs" not in api.ok("/tokenize", {"model": CHAT, "prompt": "Hello"})


# -- Responses logprobs -----------------------------------------------------------------------------

RESPONSES = {"model": CHAT, "input": "Hello", "max_output_tokens": 6, "include": ["message.output_text.logprobs"],
             "top_logprobs": 2, "temperature": 0}


def test_responses_include_logprobs_fills_them(api):
    body = api.ok("/v1/responses", RESPONSES)
    part = body["output"][0]["content"][0]
    assert len(part["logprobs"]) == body["usage"]["output_tokens"] == 6
    assert "".join(lp["token"] for lp in part["logprobs"]) == part["text"]
    assert all(len(lp["top_logprobs"]) == 2 and lp["logprob"] <= 0 for lp in part["logprobs"])
    plain = api.ok("/v1/responses", {**RESPONSES, "include": None})
    assert plain["output"][0]["content"][0]["logprobs"] == []


def test_streamed_responses_carry_logprobs_with_each_delta(api):
    events = api.events("/v1/responses", RESPONSES)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert sum(len(d["logprobs"]) for d in deltas) == len(done["logprobs"]) == events[-1]["response"]["usage"][
        "output_tokens"] == 6
    assert "".join(d["delta"] for d in deltas) == done["text"]
    final = events[-1]["response"]["output"][0]["content"][0]
    assert final["logprobs"] == done["logprobs"]


# -- ranges that need the model ---------------------------------------------------------------------

VOCAB = 4096  # the demo model's


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", chat(stop_token_ids=[VOCAB]), "stop_token_ids"),
    ("/v1/chat/completions", chat(allowed_token_ids=[5, VOCAB]), "allowed_token_ids"),
    ("/v1/chat/completions", chat(logit_bias={str(VOCAB): 1}), "logit_bias"),
    ("/v1/completions", completion(prompt=[1, 2, VOCAB]), "prompt"),
    ("/v1/completions", completion(prompt=[[1], [10**12]]), "prompt"),
    ("/v1/completions", completion(prompt=""), "prompt"),
    ("/v1/completions", completion(prompt=[-3]), "prompt"),
    ("/v1/completions", completion(max_tokens=10**12), "max_tokens"),
    ("/v1/chat/completions", chat(max_completion_tokens=10**12), "max_completion_tokens"),
    ("/v1/chat/completions", chat(max_tokens=10**12), "max_tokens"),
    ("/v1/responses", {"model": CHAT, "input": "x", "max_output_tokens": 10**12}, "max_output_tokens"),
    ("/v1/chat/completions", chat(n=9), "n"),  # the fixture's worker runs 8 sequences at once
    ("/v1/completions", completion(n=2, best_of=9), "best_of"),
    ("/v1/completions", completion(min_tokens=10**9), "min_tokens"),
    ("/detokenize", {"model": CHAT, "tokens": [1, VOCAB]}, "tokens"),
    ("/detokenize", {"model": CHAT, "tokens": [-1]}, "tokens"),
])
def test_out_of_range_values_are_a_400_naming_the_parameter(api, path, body, param):
    api.error(path, body, param)


def test_in_range_edges_are_served(api):
    api.ok("/v1/chat/completions", chat(stop_token_ids=[VOCAB - 1], allowed_token_ids=[VOCAB - 1], max_tokens=2,
                                        logit_bias={"0": 5}, n=8))
    api.ok("/v1/completions", completion(prompt=[0, VOCAB - 1], max_tokens=2, best_of=8, n=1))


# -- client disconnects -----------------------------------------------------------------------------

class GoneClient:
    """A request whose client hangs up once its body has been read."""

    async def receive(self):
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}


def test_a_client_that_leaves_cancels_its_request_with_one_quiet_log_line(caplog):
    cancelled = []

    async def main():
        await until_disconnect(GoneClient(), asyncio.sleep(30), lambda: cancelled.append(True))

    with caplog.at_level(logging.DEBUG, logger="modelfleet.worker"), pytest.raises(ClientGone):
        asyncio.run(main())
    assert cancelled == [True]
    records = [r for r in caplog.records if r.name.startswith("modelfleet.worker")]
    assert len(records) == 1 and records[0].levelno == logging.INFO and records[0].exc_info is None
    assert "disconnected" in records[0].getMessage()


def test_work_that_finishes_first_is_returned(caplog):
    class Stays:
        async def receive(self):
            await asyncio.sleep(30)

    async def main():
        async def work():
            return 42

        return await until_disconnect(Stays(), work(), lambda: pytest.fail("cancelled a finished request"))

    assert asyncio.run(main()) == 42
