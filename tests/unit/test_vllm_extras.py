"""vLLM's extra parameters, without a model: the one table, its docs page, and the pure pieces
that implement the parameters (constraint choice, bad words, truncation, template options,
stop strings, logprob shapes)."""

import json
import math
from pathlib import Path

import pytest

from modelfleet.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    TokenizeRequest,
    parse_request,
)
from modelfleet.worker.content_type import is_json
from modelfleet.worker.extras import VLLM_EXTRAS, markdown_table, refuse_unsupported
from modelfleet.worker.formatting import Shown, completion_logprobs, prompt_logprobs
from modelfleet.worker.prompts import TemplateOptions, echo_prefix
from modelfleet.worker.requests import Limits, bad_words_ids, truncate_prompt
from modelfleet.worker.sampling import banned_by_bad_words
from modelfleet.worker.sequence import TokenLogprob
from modelfleet.worker.stops import TextState
from modelfleet.worker.structured import close_objects, requested_constraint

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"chat": ChatCompletionRequest, "completions": CompletionRequest}


def chat(**kw) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "x"}], **kw}).encode())


def completion(**kw) -> CompletionRequest:
    return parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "x", **kw}).encode())


# -- the table ------------------------------------------------------------------------------------

@pytest.mark.skipif(not (ROOT / "docs").is_dir(), reason="needs the source tree")
def test_the_docs_page_shows_the_table_as_it_is():
    page = (ROOT / "docs" / "vllm-parameters.md").read_text()
    assert markdown_table() in page, "regenerate the table in docs/vllm-parameters.md from markdown_table()"


def test_every_accepted_extra_is_a_typed_field_of_its_endpoints():
    """An implemented or ignored parameter is declared, so a wrong type is a 400 naming it; a
    refused one is answered by refuse_unsupported on each of its endpoints."""
    for name, extra in VLLM_EXTRAS.items():
        for endpoint in extra.endpoints:
            fields = MODELS[endpoint].model_fields
            if extra.handling == "refused":
                assert name not in fields, name
            elif "." in name:
                outer, inner = name.split(".")
                assert inner in fields[outer].annotation.__args__[0].model_fields, name
            else:
                assert name in fields, (name, endpoint)


@pytest.mark.parametrize("name", [n for n, e in VLLM_EXTRAS.items() if e.handling == "refused"])
def test_each_refused_extra_is_a_400_naming_it_when_it_asks_for_something(name):
    extra = VLLM_EXTRAS[name]
    make = chat if "chat" in extra.endpoints else completion
    refuse_unsupported(make(), extra.endpoints[0])
    refuse_unsupported(make(**{name: extra.inert[-1]}), extra.endpoints[0])
    with pytest.raises(OpenAIError) as info:
        refuse_unsupported(make(**{name: "something"}), extra.endpoints[0])
    assert info.value.param == name and info.value.status == 400


def test_a_refused_extra_of_one_endpoint_is_not_refused_on_the_other():
    refuse_unsupported(completion(best_of=3, n=1), "completions")  # OpenAI's on completions


# -- constraints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, kind, param", [
    ({"guided_regex": "a+"}, "regex", "guided_regex"),
    ({"guided_choice": ["a"]}, "choice", "guided_choice"),
    ({"guided_json": '{"type": "object"}'}, "json", "guided_json"),
    ({"guided_grammar": "start: /a/"}, "grammar", "guided_grammar"),
    ({"structural_tag": "{}"}, "structural_tag", "structural_tag"),
    ({"structured_outputs": {"json_object": True}}, "json_object", "structured_outputs.json_object"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": " "}}, "json",
     "structured_outputs.json"),
    ({"response_format": {"type": "json_object"}}, "json", "response_format"),
    ({"response_format": {"type": "text"}, "structured_outputs": {"regex": "b"}}, "regex", "structured_outputs.regex"),
])
def test_every_spelling_becomes_one_constraint(kw, kind, param):
    for make in (chat, completion):
        c = requested_constraint(make(**kw))
        assert (c.kind, c.param) == (kind, param)


def test_guided_whitespace_pattern_goes_with_guided_json():
    assert requested_constraint(chat(guided_json={}, guided_whitespace_pattern="\t")).whitespace_pattern == "\t"
    so = {"json": {}, "disable_additional_properties": True}
    assert requested_constraint(chat(structured_outputs=so)).closed_objects


def test_no_constraint_and_json_object_false_ask_for_nothing():
    assert requested_constraint(chat()) is None
    with pytest.raises(OpenAIError):  # vLLM refuses a structured_outputs without a kind too
        requested_constraint(chat(structured_outputs={"json_object": False}))


def test_close_objects_adds_additional_properties_false_where_unsaid():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}},
              "anyOf": [{"properties": {}, "additionalProperties": True}]}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is True and "additionalProperties" not in schema


# -- sampling and prompts -------------------------------------------------------------------------

def test_bad_words_ban_a_words_last_token_after_its_first_ones():
    words = ((7,), (1, 2, 3))
    assert banned_by_bad_words([], words) == [7]
    assert banned_by_bad_words([5, 1], words) == [7]
    assert banned_by_bad_words([5, 1, 2], words) == [7, 3]
    assert banned_by_bad_words([1, 2, 9], words) == [7]


class WordTokenizer:
    """A word is one token, and a leading space makes it another."""

    vocab = {"hello": 1, " hello": 2, "big": 3, "apple": 4, " big": 5, " apple": 6}

    def encode(self, text, add_special_tokens=False):
        parts = text.replace(" ", "\0 ").split("\0")
        return [self.vocab[p] for p in parts if p]


def test_bad_words_are_tokenized_with_and_without_a_leading_space():
    limits = Limits(max_model_len=100, vocab_size=10, max_num_seqs=4)
    assert bad_words_ids(["hello", " big apple"], WordTokenizer(), limits) == ((1,), (2,), (3, 6), (5, 6))


def test_truncation_keeps_the_end_by_default_and_checks_the_context():
    limits = Limits(max_model_len=5, vocab_size=100, max_num_seqs=4)
    ids = list(range(10))
    assert truncate_prompt(ids, completion(truncate_prompt_tokens=3), limits) == [7, 8, 9]
    assert truncate_prompt(ids, completion(truncate_prompt_tokens=3, truncation_side="right"), limits) == [0, 1, 2]
    assert truncate_prompt(ids, completion(truncate_prompt_tokens=-1), limits) == [5, 6, 7, 8, 9]
    assert truncate_prompt(ids, completion(), limits) == ids
    with pytest.raises(OpenAIError) as info:
        truncate_prompt(ids, completion(truncate_prompt_tokens=6), limits)
    assert info.value.param == "truncate_prompt_tokens"


@pytest.mark.parametrize("kw, add, cont", [
    ({}, True, False),
    ({"continue_final_message": True}, False, True),
    ({"add_generation_prompt": False}, False, False),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, False, False),
    ({"chat_template_kwargs": {"continue_final_message": True}}, False, True),
])
def test_template_options_follow_vllms_defaults(kw, add, cont):
    for model in (ChatCompletionRequest, TokenizeRequest):
        req = model.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **kw})
        opts = TemplateOptions.of(req)
        assert (opts.add_generation_prompt, opts.continue_final_message) == (add, cont)


def test_template_variables_pass_and_transformers_arguments_do_not():
    opts = TemplateOptions.of(chat(chat_template_kwargs={"enable_thinking": False, "documents": [{"a": "b"}]}))
    assert opts.variables == {"enable_thinking": False} and opts.documents == [{"a": "b"}]
    for key in ("tokenize", "chat_template", "tools", "return_dict", "conversation"):
        with pytest.raises(OpenAIError) as info:
            TemplateOptions.of(chat(chat_template_kwargs={key: 1}))
        assert info.value.param == "chat_template_kwargs"
    with pytest.raises(OpenAIError):
        TemplateOptions.of(chat(continue_final_message=True, add_generation_prompt=True))


def test_chat_echo_repeats_only_a_final_assistant_message():
    req = chat(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "Hel"}])
    assert echo_prefix(req.messages) == "Hel"
    assert echo_prefix(chat().messages) == ""


# -- output ---------------------------------------------------------------------------------------

class CharDecoder:
    alphabet = "abcdefgh<>"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids if not (skip_special_tokens and self.alphabet[i] in "<>"))


def feed(state: TextState, text: str) -> str:
    for ch in text:
        before = len(state.text)
        state.add_token(CharDecoder(), CharDecoder.alphabet.index(ch))
        if state.check_stop(len(state.text) - before):
            break
    return state.text


def test_a_stop_string_is_cut_or_kept_with_include_stop_str_in_output():
    assert feed(TextState(stops=["cd"]), "abcdef") == "ab"
    assert feed(TextState(stops=["cd"], include_stop=True), "abcdef") == "abcd"
    assert feed(TextState(stops=["fg", "de"], include_stop=True), "abcdefgh") == "abcde"


def test_special_tokens_show_only_when_not_skipped():
    assert feed(TextState(stops=[]), "a<b>") == "ab"
    assert feed(TextState(stops=[], skip_special=False), "a<b>") == "a<b>"


def name(token_id: int) -> str:
    return "abcdefgh"[token_id]


def test_completion_top_logprobs_list_the_top_n_and_the_chosen_token():
    entries = [TokenLogprob(0, -3.0, [(1, -0.5), (2, -1.0)]), TokenLogprob(1, -0.5, [(1, -0.5), (2, -1.0)]),
               TokenLogprob(3, -2.0, [])]
    lp = completion_logprobs(entries, name, 0, 1)
    assert lp["top_logprobs"] == [{"b": -0.5, "a": -3.0}, {"b": -0.5}, {"d": -2.0}]
    assert completion_logprobs([TokenLogprob(0, math.nan, [])], name, 0, 0)["top_logprobs"] == [None]


def test_prompt_logprobs_have_vllms_shape():
    entries = [None, TokenLogprob(0, -3.0, [(1, -0.5), (2, -1.0)]), TokenLogprob(2, -1.0, [(1, -0.5), (2, -1.0)])]
    out = prompt_logprobs(entries, 1, name)
    assert out[0] is None
    assert out[1] == {"0": {"logprob": -3.0, "rank": None, "decoded_token": "a"},
                      "1": {"logprob": -0.5, "rank": 1, "decoded_token": "b"}}
    assert out[2] == {"2": {"logprob": -1.0, "rank": 2, "decoded_token": "c"},
                      "1": {"logprob": -0.5, "rank": 1, "decoded_token": "b"}}


def test_shown_reads_the_output_options():
    shown = Shown.of(chat(return_tokens_as_token_ids=True, return_token_ids=True, stream=True,
                          stream_options={"include_usage": True, "continuous_usage_stats": True}), name)
    assert shown.token_name(7) == "token_id:7" and shown.token_ids and shown.continuous_usage
    assert not Shown.of(chat(stream=True, stream_options={"continuous_usage_stats": True}), name).continuous_usage


@pytest.mark.parametrize("value, ok", [("application/json", True), ("application/json; charset=utf-8", True),
                                       (" Application/JSON ", True), ("application/x-www-form-urlencoded", False),
                                       ("text/plain", False), ("application/jsonl", False), ("", False)])
def test_json_content_types(value, ok):
    assert is_json(value) is ok
