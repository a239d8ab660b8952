"""Request validation: any JSON body gives a parsed request or a 400 naming the parameter."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfleet.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
    parse_request,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
CHAT_FIELDS = ["model", "messages", "temperature", "top_p", "n", "stop", "max_tokens", "logprobs", "top_logprobs",
               "logit_bias", "presence_penalty", "seed", "stream", "stream_options", "tools", "user"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(CHAT_FIELDS), json_values, max_size=8))
def test_any_chat_body_parses_or_is_a_400_naming_a_known_param(body):
    try:
        parse_request(ChatCompletionRequest, json.dumps(body).encode())
    except OpenAIError as exc:
        assert exc.status == 400
        assert exc.param is None or exc.param.split(".")[0] in CHAT_FIELDS


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_bytes_are_a_400(raw):
    try:
        parse_request(CompletionRequest, raw)
    except OpenAIError as exc:
        assert exc.status == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": True},
         "top_logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.role"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 2**63}, "seed"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": -(2**63) - 1}, "seed"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
         "stream_options"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": False,
          "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop_token_ids": [3, -1]}, "stop_token_ids"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "allowed_token_ids": [-5]},
         "allowed_token_ids"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1, "stream": True},
         "prompt_logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": 5}},
         "structured_outputs.regex"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "guided_choice": "yes"}, "guided_choice"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "priority": 2**63}, "priority"),
    ],
)
def test_wrong_values_name_their_parameter(body, param):
    with pytest.raises(OpenAIError) as info:
        parse_request(ChatCompletionRequest, json.dumps(body).encode())
    assert info.value.status == 400
    assert info.value.param == param


def test_known_unsupported_and_unknown_fields_are_accepted():
    body = {"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}],
            "store": True, "metadata": {"a": "b"}, "service_tier": "auto", "parallel_tool_calls": False,
            "logit_bias": {}, "tool_choice": "none", "brand_new_field": 1}
    req = parse_request(ChatCompletionRequest, json.dumps(body).encode())
    assert req.messages[0].text() == "hi"


def test_embedding_inputs_of_every_shape():
    for value in ["a", ["a", "b"], [1, 2, 3], [[1, 2], [3]]]:
        parse_request(EmbeddingRequest, json.dumps({"model": "m", "input": value}).encode())
    with pytest.raises(OpenAIError):
        parse_request(EmbeddingRequest, json.dumps({"model": "m", "input": []}).encode())


def test_stream_options_go_with_stream_on_completions_too():
    body = {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}
    with pytest.raises(OpenAIError) as info:
        parse_request(CompletionRequest, json.dumps(body).encode())
    assert info.value.param == "stream_options"
    parse_request(CompletionRequest, json.dumps({**body, "stream": True}).encode())


def test_detokenize_token_ids_are_not_negative():
    from modelfleet.protocol import DetokenizeRequest

    with pytest.raises(OpenAIError) as info:
        parse_request(DetokenizeRequest, json.dumps({"tokens": [1, -2]}).encode())
    assert info.value.param == "tokens"
