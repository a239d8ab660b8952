"""Tool-call parsing, tool validation and response_format translation: pure functions."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfleet.protocol import OpenAIError
from modelfleet.worker.formatting import chat_delta, chat_message
from modelfleet.worker.streams import responses_format, responses_tools
from modelfleet.worker.structured import response_schema
from modelfleet.worker.tool_calls import (
    Function,
    HermesFormat,
    ToolChoice,
    functions_from_tools,
    parse_all,
    resolve_choice,
)

HERMES = HermesFormat()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "add"}}]


def call_text(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n</tool_call>'


def test_text_without_calls_is_all_content():
    content, calls = parse_all(HERMES, "just words, < and <tool but no call")
    assert content == "just words, < and <tool but no call" and calls == []


def test_calls_are_parsed_with_raw_argument_text_and_content_before_them():
    text = "Let me check.\n" + call_text("get_weather", '{"city": "Paris"}') + "\n" + call_text("add", "{}")
    content, calls = parse_all(HERMES, text)
    assert content == "Let me check.\n"
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}'), ("add", "{}")]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_only_calls_means_no_content_and_finish_tool_calls():
    message, finish = chat_message(call_text("add", '{"a":1}'), "stop", HERMES)
    assert message["content"] is None and finish == "tool_calls"
    assert message["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a":1}'}
    assert message["tool_calls"][0]["type"] == "function"
    # a truncated answer keeps "length"; without a tool format the text is the content
    assert chat_message("x", "length", HERMES)[1] == "length"
    assert chat_message(call_text("add", "{}"), "stop", None) == (
        {"role": "assistant", "content": call_text("add", "{}"), "refusal": None}, "stop")


def test_arguments_in_another_key_order_still_parse_whole():
    text = '<tool_call>\n{"arguments": {"x": [1, 2]}, "name": "f"}\n</tool_call>'
    _, calls = parse_all(HERMES, text)
    assert calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": [1, 2]}


def test_a_malformed_call_stays_content():
    content, calls = parse_all(HERMES, "<tool_call>\nnot json\n</tool_call>")
    assert calls == [] and "not json" in content


ARGS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet="ab}{<>/\"\\\n _", max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet="ab}<", max_size=3), inner,
                                                                 max_size=3),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(content=st.text(alphabet="ab <>_/\n", max_size=12),
       calls=st.lists(st.tuples(st.sampled_from(["f", "get_weather"]), st.dictionaries(st.text(max_size=4), ARGS,
                                                                                         max_size=3)),
                      min_size=0, max_size=3),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_streamed_events_reassemble_to_the_whole_parse(content, calls, cuts):
    """However the text is split into deltas, the stream's events add up to the non-streamed
    message: the same content, names and argument text, and each call's first event has its name."""
    text = content + "\n".join(call_text(n, json.dumps(a)) for n, a in calls)
    whole_content, whole_calls = parse_all(HERMES, text)
    parser = HERMES.parser()
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    events = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        events += parser.feed(text[a:b])
    events += parser.finish()
    streamed_content = "".join(e.text for e in events if e.kind == "content")
    names = [e.call.name for e in events if e.kind == "call"]
    args: dict[int, str] = {}
    for e in events:
        if e.kind == "arguments":
            args[e.index] = args.get(e.index, "") + e.text
    assert (streamed_content or None) == (whole_content or None)
    assert names == [c.name for c in whole_calls]
    assert [args.get(i, "") for i in range(len(names))] == [c.arguments for c in whole_calls]
    if calls:
        assert [json.loads(c.arguments) for c in whole_calls] == [a for _, a in calls]


def test_chat_deltas_have_the_openai_shape():
    parser = HERMES.parser()
    events = parser.feed(call_text("add", '{"a": 1}')) + parser.finish()
    deltas = [chat_delta(e) for e in events]
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"] == {"name": "add", "arguments": ""}
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[1:])
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]) == '{"a": 1}'


def test_tools_are_validated_naming_the_parameter():
    fns = functions_from_tools(TOOLS)
    assert [f.name for f in fns] == ["get_weather", "add"]
    assert fns[1].parameters["additionalProperties"] is False  # no parameters: an empty object
    for tools, param in [
        ([{"type": "code_interpreter"}], "tools[0].type"),
        ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
        ([TOOLS[0], TOOLS[0]], "tools"),
    ]:
        with pytest.raises(OpenAIError) as info:
            functions_from_tools(tools)
        assert info.value.param == param and info.value.status == 400


def test_tool_choice_modes():
    fns = functions_from_tools(TOOLS)
    assert resolve_choice(None, fns) == ToolChoice("auto")
    assert resolve_choice(None, []) == ToolChoice("none")
    assert resolve_choice("none", []) == ToolChoice("none")  # accepted without tools
    assert resolve_choice("required", fns) == ToolChoice("required")
    assert resolve_choice({"type": "function", "function": {"name": "add"}}, fns) == ToolChoice("required", "add")
    for bad in ["sometimes", {"type": "function", "function": {"name": "nope"}}, {"type": "x"}]:
        with pytest.raises(OpenAIError) as info:
            resolve_choice(bad, fns)
        assert info.value.param == "tool_choice"
    with pytest.raises(OpenAIError):
        resolve_choice("required", [])


def test_grammar_names_only_the_chosen_function():
    fns = [Function("a", {"type": "object"}), Function("b", {"type": "object"})]
    named = HERMES.grammar(fns, ToolChoice("required", "b"), parallel=True)
    assert '\\"b\\"' in named and '\\"a\\"' not in named and "*" not in named.split("start:")[1]
    auto = HERMES.grammar(fns, ToolChoice("auto"), parallel=False)
    assert "[lazy]" in auto


def test_response_format_translation():
    assert response_schema(None) is None and response_schema({"type": "text"}) is None
    assert response_schema({"type": "json_object"}) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert response_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == schema
    for bad, param in [({"type": "yaml"}, "response_format.type"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"schema": 3}}, "response_format.json_schema.schema")]:
        with pytest.raises(OpenAIError) as info:
            response_schema(bad)
        assert info.value.param == param


def test_responses_api_shapes_become_chat_shapes():
    fmt = {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}}
    assert responses_format(fmt) == {"type": "json_schema",
                                     "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": True}}
    assert responses_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    assert responses_format(None) is None
    flat = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    assert responses_tools(flat) == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
