"""Raw HTTP against `modelfleet serve`: the FastChat API doc's curl examples, error shapes,
headers, tokenizer endpoints, metrics, and cancellation when a client goes away."""

import json
import re

import httpx
import pytest

from modelfleet.devcluster import wait_for

from .conftest import running, send_request, worker_metric

pytestmark = pytest.mark.integration
CHAT, EMBED = "tiny-chat", "all-MiniLM-L6-v2"


def assert_error(r: httpx.Response, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


# -- the FastChat doc's curl examples, with our model names ----------------------------------

def test_fastchat_curl_list_models(server):
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 200 and r.json()["object"] == "list"


def test_fastchat_curl_chat(server):
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Content-Type": "application/json"},
                   content=json.dumps({"model": CHAT, "messages": [{"role": "user",
                                                                     "content": "Hello! What is your name?"}]}),
                   timeout=120)
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] >= 1


def test_fastchat_curl_completions(server):
    # Seeded: unseeded, the random model's end of sequence came within 41 tokens about one run in 110.
    r = httpx.post(f"{server}/v1/completions", json={"model": CHAT, "prompt": "Once upon a time", "max_tokens": 41,
                                                     "temperature": 0.5, "seed": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 41


def test_fastchat_curl_embeddings(server):
    r = httpx.post(f"{server}/v1/embeddings", json={"model": EMBED, "input": "Hello world!"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384


def test_legacy_openai_028_calls(server):
    """What `openai==0.28` sends with api_base=.../v1 and api_key="EMPTY", and reads back."""
    headers = {"Authorization": "Bearer EMPTY", "Content-Type": "application/json"}
    comp = httpx.post(f"{server}/v1/completions", headers=headers,
                      json={"model": CHAT, "prompt": "Once upon a time", "max_tokens": 64}).json()
    assert isinstance(comp["choices"][0]["text"], str)
    chat = httpx.post(f"{server}/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": CHAT, "messages": [{"role": "user", "content": "Hello!"}],
                            "max_tokens": 8}).json()
    assert isinstance(chat["choices"][0]["message"]["content"], str)


# -- errors and headers --------------------------------------------------------------------

def test_malformed_json_is_a_400(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_schema_errors_are_400_never_422(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": CHAT, "messages": "hi"})
    assert_error(r, 400, param="messages")
    r = httpx.post(f"{server}/v1/completions", json={"model": CHAT, "prompt": "x", "max_tokens": "many"})
    assert_error(r, 400, param="max_tokens")
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": CHAT,
                                                          "messages": [{"role": "user", "content": "x"}],
                                                          "logit_bias": {"999999": 1}})
    assert_error(r, 400, param="logit_bias")


def test_unknown_model_path_and_method(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "ghost", "messages": [{"role": "user",
                                                                                          "content": "x"}]})
    assert_error(r, 404, param="model", code="model_not_found")
    assert_error(httpx.get(f"{server}/v1/nothing-here"), 404)
    assert httpx.get(f"{server}/v1/chat/completions").status_code in (404, 405)


def test_embedding_errors_keep_the_api_format_and_request_id(server):
    """Embeddings are served on the workers' raw ASGI path; its errors must read like the rest."""
    rid = {"x-request-id": "emb-err-1"}
    r = httpx.post(f"{server}/v1/embeddings", json={"model": EMBED, "input": "x", "dimensions": "wide"}, headers=rid)
    assert_error(r, 400, param="dimensions")
    assert r.headers["x-request-id"] == "emb-err-1"
    r = httpx.post(f"{server}/v1/embeddings", json={"model": EMBED, "input": ""}, headers=rid)
    assert_error(r, 400, param="input")
    r = httpx.post(f"{server}/v1/embeddings", content=b"[1, 2", headers={"content-type": "application/json"})
    assert_error(r, 400)
    r = httpx.post(f"{server}/v1/embeddings", json={"model": EMBED, "input": ["a", "b"], "encoding_format": "float"},
                   headers=rid)
    assert r.status_code == 200 and r.headers["x-request-id"] == "emb-err-1"
    assert [d["index"] for d in r.json()["data"]] == [0, 1] and r.json()["usage"]["prompt_tokens"] > 0


def test_request_id_is_echoed_or_made(server):
    r = httpx.get(f"{server}/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(f"{server}/v1/models").headers["x-request-id"]) >= 16


def test_a_tool_schema_that_cannot_be_enforced_is_refused_naming_the_feature(server):
    body = {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {"type": "object"}}}}]}
    r = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert_error(r, 400, param="tools[0].function.parameters")
    assert "not" in r.json()["error"]["message"]


def test_a_bad_request_does_not_disturb_its_neighbours(server):
    with httpx.Client(timeout=60) as c:
        good = {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
        for _ in range(3):
            assert c.post(f"{server}/v1/chat/completions", json={"model": CHAT, "messages": 5}).status_code == 400
            assert c.post(f"{server}/v1/chat/completions", json=good).status_code == 200


# -- other endpoints -----------------------------------------------------------------------

def test_tokenize_and_detokenize_round_trip(server):
    r = httpx.post(f"{server}/tokenize", json={"model": CHAT, "prompt": "Hello wörld"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    back = httpx.post(f"{server}/detokenize", json={"model": CHAT, "tokens": r["tokens"]}).json()
    assert back["prompt"] == "Hello wörld"


def test_edits_api_through_the_chat_path(server):
    r = httpx.post(f"{server}/v1/edits", json={"model": CHAT, "input": "helo", "instruction": "Fix spelling"},
                   timeout=120).json()
    assert r["object"] == "edit" and isinstance(r["choices"][0]["text"], str)


def test_gateway_and_worker_metrics(server):
    text = httpx.get(f"{server}/metrics").text
    assert "modelfleet_gateway_requests_total" in text
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": CHAT, "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "x"}]})
    worker = r.headers["x-modelfleet-backend"]
    wtext = httpx.get(f"{worker}/metrics").text
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:generation_tokens_total",
                 "vllm:num_preemptions_total"):
        # Labelled with the model (where the label sits among others varies by client version).
        assert re.search(rf'^{re.escape(name)}{{[^}}]*model_name="{CHAT}"', wtext, re.M), name


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "non-streamed"])
def test_client_disconnect_cancels_generation(server, stream):
    """A client that leaves frees its batch row on the worker behind the gateway, also when it
    was waiting for a non-streamed answer (which arrives only once complete)."""
    url = f"{server}/v1/chat/completions"
    messages = [{"role": "user", "content": "x"}]
    with httpx.stream("POST", url, json={"model": CHAT, "messages": messages, "max_tokens": 1, "stream": True}) as r:
        worker = r.headers["x-modelfleet-backend"]
    body = {"model": CHAT, "messages": messages, "max_tokens": 1900, "stream": stream, "ignore_eos": True}
    generated = worker_metric(worker, "vllm:generation_tokens_total")
    if stream:
        with httpx.Client(timeout=60) as c, c.stream("POST", url, json=body) as r:
            lines = r.iter_lines()
            for _ in range(20):  # the role chunk leaves before the engine admits: read a few tokens
                next(lines)
            assert running(worker) == 1
    else:
        # Hangs up once the request runs: leaving after a fixed time either came before it ran
        # (a loaded machine) or after all 1900 tokens (an idle one generates them in seconds).
        connection = send_request(url, body)
        try:
            wait_for(lambda: running(worker), 30, "the request to be running", interval=0.05)
            assert running(worker) == 1
        finally:
            connection.close()
    wait_for(lambda: running(worker) == 0, 30, "the batch to be empty after the client left", interval=0.1)
    assert worker_metric(worker, "vllm:generation_tokens_total") - generated < 1900
    assert worker_metric(server, "modelfleet_gateway_backend_inflight", worker) == 0  # the gateway's books too


def test_client_sdk_dict_and_attribute_access(server):
    from modelfleet.client import openai_api_client as client

    client.set_baseurl(server)
    # Seeded, so that the random model never ends early (unseeded, about one run in 400 did).
    r = client.ChatCompletion.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, seed=1)
    assert r.choices[0].message.content == r["choices"][0]["message"]["content"]
    assert json.loads(json.dumps(r))["usage"]["completion_tokens"] == 4
    chunks = list(client.ChatCompletion.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, stream=True, seed=1))
    assert chunks[-1].choices[0].finish_reason == "length"
    emb = client.Embedding.create(model=EMBED, input=["a", "b"])
    assert len(emb.data) == 2
    assert client.Completion.create(model=CHAT, prompt="x", max_tokens=2, seed=1).usage.completion_tokens == 2
    assert CHAT in {m.id for m in client.Model.list().data}
    with pytest.raises(client.NotFoundError) as info:
        client.ChatCompletion.create(model="ghost", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.code == "model_not_found"


# -- vLLM clients and the review's input checks, through the gateway ------------------------------

def test_vllm_entrypoint_style_structured_outputs(openai_client, server):
    """What vLLM's own entrypoint tests send: the output is constrained, and an invalid regex is
    a 400 naming the parameter (it used to be a 200 with free text)."""
    messages = [{"role": "user", "content": "Pick one"}]
    r = openai_client.chat.completions.create(model=CHAT, messages=messages, n=3, temperature=1.5,
                                              extra_body={"guided_choice": ["red", "green", "blue"]})
    assert {c.message.content for c in r.choices} <= {"red", "green", "blue"}
    r = openai_client.completions.create(model=CHAT, prompt="Phone:", max_tokens=20, seed=1,
                                         extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    for body, param in [({"guided_regex": "[.*"}, "guided_regex"),
                        ({"structured_outputs": {"regex": "[.*"}}, "structured_outputs.regex"),
                        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
                        ({"use_beam_search": True}, "use_beam_search")]:
        r = httpx.post(f"{server}/v1/chat/completions", json={"model": CHAT, "messages": messages, **body})
        assert_error(r, 400, param=param)


def test_a_form_encoded_body_is_a_400(server):
    body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    r = httpx.post(f"{server}/v1/chat/completions", content=body,
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(r, 400)
    assert "application/json" in r.json()["error"]["message"]
    ok = httpx.post(f"{server}/v1/chat/completions", content=body,
                    headers={"content-type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200


def test_stream_options_without_stream_is_a_400(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "x"}],
                                                          "stream_options": {"include_usage": True}})
    assert_error(r, 400, param="stream_options")


def test_completion_logprobs_hold_the_sampled_token(openai_client):
    r = openai_client.completions.create(model=CHAT, prompt="Once", max_tokens=5, logprobs=0)
    lp = r.choices[0].logprobs
    assert [list(top) for top in lp.top_logprobs] == [[tok] for tok in lp.tokens]


def test_tokenize_chat_options_and_token_strings(server):
    messages = [{"role": "user", "content": "Hi"}]
    opened = httpx.post(f"{server}/tokenize", json={"model": CHAT, "messages": messages,
                                                    "return_token_strs": True}).json()
    closed = httpx.post(f"{server}/tokenize", json={"model": CHAT, "messages": messages,
                                                    "add_generation_prompt": False}).json()
    assert closed["count"] < opened["count"] and len(opened["token_strs"]) == opened["count"]
