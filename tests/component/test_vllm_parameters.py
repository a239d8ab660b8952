"""vLLM's extra request parameters, through the worker's app in-process on the random demo model:
each one a vLLM client sends either changes the output as it does on vLLM, or is a 400 naming
it. Whatever the weights say, constrained output is valid by construction."""

import json
import re

import jsonschema
import pytest

CHAT = "tiny-chat"
MSG = [{"role": "user", "content": "Is the sky blue?"}]


def chat(**kw) -> dict:
    return {"model": CHAT, "messages": MSG, **kw}


def completion(**kw) -> dict:
    return {"model": CHAT, "prompt": "The answer is", **kw}


def texts(body: dict) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"] for c in body["choices"]]


# -- structured outputs -------------------------------------------------------------------------

CHOICES = ["yes", "no", "maybe not"]


@pytest.mark.parametrize("spelling", [{"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}],
                         ids=["guided_choice", "structured_outputs.choice"])
@pytest.mark.parametrize("make, path", [(chat, "/v1/chat/completions"), (completion, "/v1/completions")],
                         ids=["chat", "completions"])
def test_choice_output_is_exactly_one_of_the_choices(api, spelling, make, path):
    body = api.ok(path, make(n=4, temperature=1.5, seed=3, max_tokens=20, **spelling))
    for c, text in zip(body["choices"], texts(body), strict=True):
        assert text in CHOICES and c["finish_reason"] == "stop", text


@pytest.mark.parametrize("spelling, param", [("guided_regex", None), ("structured_outputs", "regex")])
@pytest.mark.parametrize("make, path", [(chat, "/v1/chat/completions"), (completion, "/v1/completions")],
                         ids=["chat", "completions"])
def test_regex_output_fully_matches(api, spelling, param, make, path):
    pattern = r"[A-Z][a-z]{2,5}-\d{3}"
    value = {param: pattern} if param else pattern
    body = api.ok(path, make(n=3, temperature=1.2, seed=7, max_tokens=30, **{spelling: value}))
    for text in texts(body):
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("field, value, param", [
    ("guided_regex", "[.*", "guided_regex"),
    ("structured_outputs", {"regex": "[.*"}, "structured_outputs.regex"),
    ("guided_grammar", "root ::= missing_rule", "guided_grammar"),
    ("structured_outputs", {"grammar": "start: ("}, "structured_outputs.grammar"),
    ("guided_json", "{not json", "guided_json"),
    ("guided_json", {"type": "array", "uniqueItems": True}, "guided_json"),
])
def test_an_invalid_regex_grammar_or_schema_is_a_400_naming_it(api, field, value, param):
    for path, make in [("/v1/chat/completions", chat), ("/v1/completions", completion)]:
        api.error(path, make(**{field: value}), param)


@pytest.mark.parametrize("grammar", ['root ::= "yes" | "no" | "ok" [0-9]', 'start: "yes" | "no" | "ok" /[0-9]/'],
                         ids=["gbnf", "lark"])
def test_grammar_output_is_a_sentence_of_the_grammar(api, grammar):
    body = api.ok("/v1/chat/completions", chat(guided_grammar=grammar, n=4, temperature=1.5, seed=1, max_tokens=10))
    for text in texts(body):
        assert re.fullmatch(r"yes|no|ok[0-9]", text), text


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("spelling", [{"guided_json": PERSON}, {"guided_json": json.dumps(PERSON)},
                                      {"structured_outputs": {"json": PERSON}}],
                         ids=["object", "string", "structured_outputs"])
def test_json_output_validates_against_the_schema(api, spelling):
    for path, make in [("/v1/chat/completions", chat), ("/v1/completions", completion)]:
        body = api.ok(path, make(n=2, seed=5, max_tokens=60, **spelling))
        for text in texts(body):
            jsonschema.validate(json.loads(text), PERSON)


def test_disable_additional_properties_closes_objects(api):
    so = {"json": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                   "required": ["a"]}, "disable_additional_properties": True}
    body = api.ok("/v1/chat/completions", chat(structured_outputs=so, n=3, temperature=1.5, seed=2, max_tokens=40))
    for text in texts(body):
        assert set(json.loads(text)) == {"a"}, text


def test_whitespace_pattern_sets_the_whitespace_json_may_hold(api):
    outside_strings = []
    for spelling in ({"structured_outputs": {"json": PERSON, "whitespace_pattern": "\t{0,2}"}},
                     {"guided_json": PERSON, "guided_whitespace_pattern": "\t{0,2}"}):
        body = api.ok("/v1/chat/completions", chat(n=4, seed=4, temperature=1.3, max_tokens=80, **spelling))
        for text in texts(body):
            jsonschema.validate(json.loads(text), PERSON)
            outside_strings += re.findall(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", text))
    assert set(outside_strings) == {"\t"}  # the pattern's whitespace, and none other


def test_json_object_is_an_object(api):
    body = api.ok("/v1/completions", completion(structured_outputs={"json_object": True}, max_tokens=30, seed=1))
    assert texts(body)[0].startswith("{")


def test_structural_tag_constrains_what_follows_a_trigger(api):
    tag = {"structures": [{"begin": "<v>", "schema": {"enum": [1, 2]}, "end": "</v>"}], "triggers": ["<v>"]}
    body = api.ok("/v1/completions", completion(structural_tag=json.dumps(tag), max_tokens=40, seed=3, n=3))
    for text in texts(body):
        for inner in re.findall(r"<v>(.*?)</v>", text, re.S):
            assert json.loads(inner) in (1, 2)
    api.error("/v1/completions", completion(structured_outputs={"structural_tag": {"format": {}}}),
              "structured_outputs.structural_tag")
    api.error("/v1/completions", completion(structural_tag={"structures": []}), "structural_tag")


@pytest.mark.parametrize("body, param", [
    (chat(guided_regex="a+", guided_choice=["a"]), "guided_choice"),
    (chat(guided_json=PERSON, response_format={"type": "json_object"}), "response_format"),
    (chat(structured_outputs={"regex": "a+"}, guided_regex="b+"), "guided_regex"),
    (chat(structured_outputs={"regex": "a+", "choice": ["a"]}), "structured_outputs"),
    (chat(structured_outputs={"whitespace_pattern": " "}), "structured_outputs"),
    (completion(guided_choice=["a"], response_format={"type": "json_object"}), "response_format"),
])
def test_more_than_one_constraint_is_a_400_naming_the_second(api, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = api.error(path, body, param)
    assert "one" in err["message"]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def test_a_vllm_constraint_with_tools_is_a_400_unless_tool_choice_is_none(api):
    api.error("/v1/chat/completions", chat(guided_choice=["a"], tools=[TOOL]), "guided_choice")
    api.error("/v1/chat/completions", chat(guided_regex="a", tools=[TOOL], tool_choice="required"), "guided_regex")
    body = api.ok("/v1/chat/completions", chat(guided_choice=["a", "b"], tools=[TOOL], tool_choice="none"))
    assert texts(body)[0] in ("a", "b")


def test_response_format_on_completions_constrains_them(api):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    body = api.ok("/v1/completions", completion(response_format=fmt, max_tokens=60, seed=8))
    jsonschema.validate(json.loads(texts(body)[0]), PERSON)


def test_the_backend_name_is_accepted_and_ignored(api):
    body = api.ok("/v1/chat/completions", chat(guided_choice=["x"], guided_decoding_backend="xgrammar"))
    assert texts(body) == ["x"]


# -- refused and ignored extras -------------------------------------------------------------------

@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "use_beam_search", True),
    ("/v1/completions", "use_beam_search", True),
    ("/v1/chat/completions", "logits_processors", ["my.module.Proc"]),
    ("/v1/chat/completions", "kv_transfer_params", {"do_remote_decode": True}),
    ("/v1/completions", "vllm_xargs", {"a": 1}),
    ("/v1/chat/completions", "chat_template", "{{ messages }}"),
    ("/v1/completions", "prompt_embeds", "AAAA"),
    ("/v1/chat/completions", "best_of", 3),
    ("/v1/chat/completions", "thinking_token_budget", 100),
])
def test_parameters_this_engine_cannot_honour_are_a_400_naming_them(api, path, field, value):
    make = chat if path == "/v1/chat/completions" else completion
    err = api.error(path, make(**{field: value}), field)
    assert "not supported by this engine" in err["message"] and err["code"] == "unsupported_parameter"


def test_refused_parameters_that_ask_for_nothing_are_fine(api):
    api.ok("/v1/chat/completions", chat(use_beam_search=False, logits_processors=None, kv_transfer_params=None,
                                        vllm_xargs={}, best_of=1, max_tokens=2))
    api.ok("/v1/completions", completion(use_beam_search=False, prompt_embeds=None, max_tokens=2))


def test_harmless_extras_are_accepted(api):
    api.ok("/v1/chat/completions", chat(priority=-5, request_id="mine-1", cache_salt="s3cret", length_penalty=0.5,
                                        spaces_between_special_tokens=False, include_reasoning=False,
                                        mm_processor_kwargs={"x": 1}, stream_interval=4, max_tokens=2))


@pytest.mark.parametrize("field, value", [
    ("priority", "high"), ("priority", 2**63), ("return_token_ids", "maybe"), ("truncate_prompt_tokens", -2),
    ("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("bad_words", "word"), ("prompt_logprobs", 21), ("prompt_logprobs", -1),
    ("cache_salt", ""), ("guided_choice", []), ("truncation_side", "middle"), ("stream_interval", 0),
])
def test_a_wrong_type_or_range_of_an_extra_is_a_400_naming_it(api, field, value):
    api.error("/v1/chat/completions", chat(**{field: value}), field)


# -- sampling ---------------------------------------------------------------------------------------

def vocab_id(worker, text: str) -> int:
    return worker[1].tokenizer.convert_tokens_to_ids(text)


def test_allowed_token_ids_are_the_only_ones_sampled(api):
    allowed = [100, 200, 300, 400]
    body = api.ok("/v1/completions", completion(allowed_token_ids=allowed, return_token_ids=True, n=3,
                                                temperature=1.5, max_tokens=12, ignore_eos=True))
    for c in body["choices"]:
        assert c["token_ids"] and set(c["token_ids"]) <= set(allowed)


def test_skip_special_tokens_false_keeps_them_in_the_text(api, worker):
    start = vocab_id(worker, "<|im_start|>")  # special, and not an end-of-sequence token
    base = completion(allowed_token_ids=[start], max_tokens=3)
    assert texts(api.ok("/v1/completions", base)) == [""]
    assert texts(api.ok("/v1/completions", {**base, "skip_special_tokens": False})) == ["<|im_start|>" * 3]


def test_bad_words_are_never_generated(api, worker):
    tok = worker[1].tokenizer
    greedy = api.ok("/v1/completions", completion(temperature=0, max_tokens=24, ignore_eos=True,
                                                  return_token_ids=True))["choices"][0]["token_ids"]
    # a generated token that is a word by itself, so the ban is of exactly that token
    banned = next(t for t in greedy if [t] in (tok.encode(tok.decode([t]).lstrip(), add_special_tokens=False),
                                             tok.encode(" " + tok.decode([t]).lstrip(), add_special_tokens=False)))
    again = api.ok("/v1/completions", completion(temperature=0, max_tokens=24, ignore_eos=True, return_token_ids=True,
                                                 bad_words=[tok.decode([banned])]))["choices"][0]["token_ids"]
    assert banned not in again and again != greedy


def test_min_tokens_beyond_the_output_limit_is_a_400(api):
    api.error("/v1/completions", completion(min_tokens=10, max_tokens=5), "min_tokens")


# -- prompt -----------------------------------------------------------------------------------------

LONG = " ".join(f"word{i}" for i in range(60))


def test_truncate_prompt_tokens_keeps_the_end_or_the_start(api, worker):
    ids = worker[1].tokenizer(LONG)["input_ids"]
    body = api.ok("/v1/completions", {"model": CHAT, "prompt": LONG, "max_tokens": 1, "truncate_prompt_tokens": 10,
                                      "return_token_ids": True})
    assert body["usage"]["prompt_tokens"] == 10 and body["choices"][0]["prompt_token_ids"] == ids[-10:]
    body = api.ok("/v1/completions", {"model": CHAT, "prompt": ids, "max_tokens": 1, "truncate_prompt_tokens": 10,
                                      "truncation_side": "right", "return_token_ids": True})
    assert body["choices"][0]["prompt_token_ids"] == ids[:10]
    chat_body = api.ok("/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": LONG}],
                                                "max_tokens": 1, "truncate_prompt_tokens": 5})
    assert chat_body["usage"]["prompt_tokens"] == 5
    api.error("/v1/completions", completion(truncate_prompt_tokens=10**6), "truncate_prompt_tokens")


def test_truncate_to_the_context_lets_an_overlong_prompt_through(api, worker):
    ids = [100] * 3000  # the demo model's context is 2048
    api.error("/v1/completions", {"model": CHAT, "prompt": ids, "max_tokens": 1}, "prompt")
    body = api.ok("/v1/completions", {"model": CHAT, "prompt": ids, "max_tokens": None, "truncate_prompt_tokens": 2000})
    assert body["usage"]["prompt_tokens"] == 2000


PARTIAL = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello, my frie"}]


def test_continue_final_message_and_echo_continue_the_assistant_text(api, worker):
    body = api.ok("/v1/chat/completions", {"model": CHAT, "messages": PARTIAL, "continue_final_message": True,
                                           "echo": True, "max_tokens": 5, "return_token_ids": True})
    assert body["choices"][0]["message"]["content"].startswith("Hello, my frie")
    rendered = worker[1].tokenizer.decode(body["prompt_token_ids"])
    assert rendered.endswith("Hello, my frie")  # open: no end-of-turn, no new assistant turn
    events = api.events("/v1/chat/completions", {"model": CHAT, "messages": PARTIAL, "continue_final_message": True,
                                                 "echo": True, "max_tokens": 3})
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events).startswith("Hello, my frie")
    api.error("/v1/chat/completions", {"model": CHAT, "messages": PARTIAL, "continue_final_message": True,
                                       "add_generation_prompt": True}, "continue_final_message")


def test_chat_echo_without_a_final_assistant_message_adds_nothing(api):
    body = api.ok("/v1/chat/completions", chat(echo=True, guided_choice=["x"]))
    assert texts(body) == ["x"]


def test_chat_template_kwargs_reach_the_template_and_cannot_replace_its_arguments(api, worker):
    plain = api.ok("/tokenize", {"model": CHAT, "messages": MSG})["tokens"]
    closed = api.ok("/tokenize", {"model": CHAT, "messages": MSG,
                                  "chat_template_kwargs": {"add_generation_prompt": False}})["tokens"]
    assert len(closed) < len(plain) and plain[: len(closed)] == closed
    api.ok("/v1/chat/completions", chat(chat_template_kwargs={"enable_thinking": False}, documents=[{"title": "a",
                                        "text": "b"}], max_tokens=2))
    for key in ("tokenize", "chat_template", "tools", "return_dict"):
        api.error("/v1/chat/completions", chat(chat_template_kwargs={key: True}), "chat_template_kwargs")


# -- output -----------------------------------------------------------------------------------------

def test_include_stop_str_in_output_keeps_the_stop_string(api):
    base = completion(temperature=0, max_tokens=30, ignore_eos=True)
    full = texts(api.ok("/v1/completions", base))[0]
    stop = full[8:11]
    cut = full[: full.index(stop)]
    assert texts(api.ok("/v1/completions", {**base, "stop": [stop]})) == [cut]
    assert texts(api.ok("/v1/completions", {**base, "stop": [stop], "include_stop_str_in_output": True})) == [cut + stop]
    streamed = api.events("/v1/completions", {**base, "stop": [stop], "include_stop_str_in_output": True})
    assert "".join(e["choices"][0]["text"] for e in streamed) == cut + stop


def test_include_stop_str_in_output_keeps_a_stop_tokens_text(api):
    base = completion(temperature=0, max_tokens=20, ignore_eos=True, return_token_ids=True)
    ids = api.ok("/v1/completions", base)["choices"][0]["token_ids"]
    stop_id = ids[3]
    body = api.ok("/v1/completions", {**base, "ignore_eos": False, "stop_token_ids": [stop_id],
                                      "include_stop_str_in_output": True})
    without = api.ok("/v1/completions", {**base, "ignore_eos": False, "stop_token_ids": [stop_id]})
    assert body["choices"][0]["token_ids"][-1] == stop_id
    assert texts(body)[0].startswith(texts(without)[0]) and len(texts(body)[0]) > len(texts(without)[0])


def test_return_token_ids_on_chat_matches_the_prompt_and_the_text(api, worker):
    tok = worker[1].tokenizer
    body = api.ok("/v1/chat/completions", chat(return_token_ids=True, temperature=0, max_tokens=12, ignore_eos=True))
    choice = body["choices"][0]
    assert body["prompt_token_ids"] == api.ok("/tokenize", {"model": CHAT, "messages": MSG})["tokens"]
    assert len(choice["token_ids"]) == body["usage"]["completion_tokens"] == 12
    assert tok.decode(choice["token_ids"], skip_special_tokens=True) == choice["message"]["content"]
    events = api.events("/v1/chat/completions", chat(return_token_ids=True, temperature=0, max_tokens=12,
                                                     ignore_eos=True))
    assert events[0]["prompt_token_ids"] == body["prompt_token_ids"]
    assert [t for e in events for c in e["choices"] for t in c.get("token_ids", [])] == choice["token_ids"]


def test_return_token_ids_on_completions_per_choice_and_stream(api, worker):
    ids = worker[1].tokenizer("The answer is")["input_ids"]
    body = api.ok("/v1/completions", completion(return_token_ids=True, n=2, max_tokens=4, ignore_eos=True))
    for c in body["choices"]:
        assert c["prompt_token_ids"] == ids and len(c["token_ids"]) == 4
    events = api.events("/v1/completions", completion(return_token_ids=True, max_tokens=4, ignore_eos=True))
    assert events[0]["choices"][0]["prompt_token_ids"] == ids
    assert sum(len(e["choices"][0]["token_ids"]) for e in events) == 4


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(api):
    body = api.ok("/v1/chat/completions", chat(logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True,
                                               max_tokens=3, return_token_ids=True))
    items = body["choices"][0]["logprobs"]["content"]
    assert [i["token"] for i in items] == [f"token_id:{t}" for t in body["choices"][0]["token_ids"]]
    assert all(t["token"].startswith("token_id:") for i in items for t in i["top_logprobs"])
    comp = api.ok("/v1/completions", completion(logprobs=1, return_tokens_as_token_ids=True, max_tokens=3))
    assert all(t.startswith("token_id:") for t in comp["choices"][0]["logprobs"]["tokens"])


@pytest.mark.parametrize("path, make", [("/v1/completions", completion), ("/v1/chat/completions", chat)])
def test_prompt_logprobs_score_every_prompt_token(api, path, make):
    body = api.ok(path, make(prompt_logprobs=2, max_tokens=1, return_token_ids=True))
    holder = body["choices"][0] if path == "/v1/completions" else body
    ids, lps = holder["prompt_token_ids"], holder["prompt_logprobs"]
    assert len(lps) == len(ids) and lps[0] is None
    for token, entry in zip(ids[1:], lps[1:], strict=True):
        assert str(token) in entry and 2 <= len(entry) <= 3
        ranked = sorted((v["rank"], v["logprob"]) for v in entry.values() if v["rank"] is not None)
        assert [r for r, _ in ranked][:2] == [1, 2] and ranked[0][1] >= ranked[1][1]
    api.error(path, make(prompt_logprobs=1, stream=True), "prompt_logprobs")


def test_prompt_logprobs_agree_with_echoed_logprobs(api):
    body = api.ok("/v1/completions", completion(prompt_logprobs=0, echo=True, logprobs=0, max_tokens=1,
                                                return_token_ids=True))
    choice = body["choices"][0]
    echoed = choice["logprobs"]["token_logprobs"][: len(choice["prompt_token_ids"])]
    own = [None] + [e[str(t)]["logprob"] for t, e in zip(choice["prompt_token_ids"][1:], choice["prompt_logprobs"][1:],
                                                         strict=True)]
    assert echoed == pytest.approx(own)


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(api):
    body = chat(max_tokens=6, ignore_eos=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    events = api.events("/v1/chat/completions", body)
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert all(e["usage"] is not None for e in events)
    assert counts == sorted(counts) and counts[-1] == 6 and events[-1]["choices"] == []
    plain = api.events("/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert all(e["usage"] is None for e in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 6
    comp = api.events("/v1/completions", completion(max_tokens=4, ignore_eos=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    counts = [e["usage"]["completion_tokens"] for e in comp]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-2:] == [4, 4]
    assert all(e["usage"]["prompt_tokens"] == comp[-1]["usage"]["prompt_tokens"] for e in comp)


def test_stop_token_ids_stop_even_with_ignore_eos_and_wait_for_min_tokens(api):
    base = completion(temperature=0, max_tokens=20, ignore_eos=True, return_token_ids=True)
    ids = api.ok("/v1/completions", base)["choices"][0]["token_ids"]
    stop_id = ids[2]
    stopped = api.ok("/v1/completions", {**base, "stop_token_ids": [stop_id]})["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["token_ids"] == ids[: ids.index(stop_id) + 1]
    held = api.ok("/v1/completions", {**base, "stop_token_ids": [stop_id], "min_tokens": 8})["choices"][0]
    assert len(held["token_ids"]) >= 8 and stop_id not in held["token_ids"][:8]
