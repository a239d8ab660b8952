"""Structured outputs and tool calls through a real `modelfleet serve`, driven by the openai SDK
(and LangChain when it is installed), on the random demo model."""

import json
from typing import Literal

import httpx
import jsonschema
import pytest
from openai import BadRequestError
from pydantic import BaseModel, Field

from .conftest import CHAT

MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a"], "additionalProperties": False}}}
SCHEMA_OF = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}


def test_json_schema_output_validates(openai_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = openai_client.chat.completions.create(model=CHAT, messages=MSG, response_format=fmt, n=3, seed=5,
                                              max_tokens=200)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_output_is_an_object_prefix_or_whole(openai_client):
    r = openai_client.chat.completions.create(model=CHAT, messages=MSG, response_format={"type": "json_object"},
                                              max_tokens=40, seed=1)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":  # a random model rarely closes a free object
        assert isinstance(json.loads(text), dict)


def test_unsupported_schema_feature_is_a_400_naming_it(openai_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(BadRequestError) as info:
        openai_client.chat.completions.create(model=CHAT, messages=MSG, response_format=fmt)
    assert "uniqueItems" in info.value.body["message"]
    assert info.value.body["param"] == "response_format.json_schema.schema"


class Forecast(BaseModel):
    city: str = Field(max_length=8)
    unit: Literal["c", "f"]
    days: int = Field(ge=1, le=7)


def test_sdk_parse_with_a_pydantic_model(openai_client):
    r = openai_client.chat.completions.parse(model=CHAT, messages=MSG, response_format=Forecast, seed=3,
                                             max_tokens=200)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Forecast) and 1 <= parsed.days <= 7


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_required_and_named_tool_choice_yield_valid_calls(openai_client, choice):
    r = openai_client.chat.completions.create(model=CHAT, messages=MSG, tools=[WEATHER, ADD], tool_choice=choice,
                                              parallel_tool_calls=False, n=3, seed=9, max_tokens=200)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_result(openai_client):
    kw = dict(model=CHAT, messages=MSG, tools=[WEATHER, ADD], tool_choice="required", seed=11, max_tokens=300,
              temperature=1.0)
    whole = openai_client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in openai_client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                if tc.index not in calls:  # the first delta of a call: id, type, name, no arguments
                    assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == ""
                    calls[tc.index] = {"name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and tc.function.name is None
                    calls[tc.index]["arguments"] += tc.function.arguments
    assert finish == whole.finish_reason
    assert [calls[i] for i in sorted(calls)] == [
        {"name": t.function.name, "arguments": t.function.arguments} for t in whole.message.tool_calls]


def test_streamed_json_schema_reassembles_to_the_non_streamed_text(openai_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    kw = dict(model=CHAT, messages=MSG, response_format=fmt, seed=4, max_tokens=200)
    whole = openai_client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
        stream=True, **kw) if c.choices)
    assert streamed == whole


def test_tool_history_renders_through_the_template(openai_client):
    messages = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
    ]
    r = openai_client.chat.completions.create(model=CHAT, messages=messages, tools=[WEATHER], tool_choice="none",
                                              max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    plain = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=1)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # tools and the call are in the prompt


def test_tool_choice_none_without_tools_and_auto_is_accepted(openai_client):
    r = openai_client.chat.completions.create(model=CHAT, messages=MSG, tool_choice="none", max_tokens=3)
    assert r.choices[0].message.tool_calls is None
    r = openai_client.chat.completions.create(model=CHAT, messages=MSG, tools=[WEATHER], max_tokens=20, seed=2)
    c = r.choices[0]
    assert (c.finish_reason == "tool_calls") == bool(c.message.tool_calls)


def test_responses_api_text_format_and_function_tools(server):
    body = {"model": CHAT, "input": "Name someone.", "max_output_tokens": 200, "seed": 2,
            "text": {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}}
    r = httpx.post(f"{server}/v1/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["output"][0]["content"][0]["text"]), PERSON)
    body = {"model": CHAT, "input": "Add.", "max_output_tokens": 200, "tool_choice": "required",
            "tools": [{"type": "function", "name": "add", "parameters": ADD["function"]["parameters"]}]}
    out = httpx.post(f"{server}/v1/responses", json=body, timeout=60).json()["output"]
    assert out[0]["type"] == "function_call" and out[0]["name"] == "add"
    jsonschema.validate(json.loads(out[0]["arguments"]), SCHEMA_OF["add"])


def test_streamed_responses_function_calls_match_the_non_streamed_output(openai_client):
    tools = [{"type": "function", "name": "add", "parameters": ADD["function"]["parameters"]}]
    kw = dict(model=CHAT, input="Add.", max_output_tokens=200, tool_choice="required", tools=tools,
              temperature=1.0, extra_body={"seed": 3})
    whole = openai_client.responses.create(**kw)
    events = list(openai_client.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    calls = [o for o in whole.output if o.type == "function_call"]
    assert calls and all(c.name == "add" for c in calls)
    added = [e.item for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert [a.name for a in added] == [c.name for c in calls]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == "".join(c.arguments for c in calls)
    done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert done == [c.arguments for c in calls]
    final = events[-1].response.output
    assert [(o.type, getattr(o, "arguments", None)) for o in final] == [
        (o.type, getattr(o, "arguments", None)) for o in whole.output]


def test_langchain_with_structured_output(server):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(model=CHAT, base_url=server + "/v1", api_key="EMPTY", max_retries=0, max_tokens=200,
                        seed=1)
    result = llm.with_structured_output(Forecast).invoke("Forecast for Paris?")
    assert isinstance(result, Forecast)
