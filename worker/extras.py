"""vLLM's extra request parameters: what this engine does with each, in one table.

Clients written for vLLM send parameters OpenAI does not have (`guided_choice`, `bad_words`,
`use_beam_search`...). Accepting one and doing nothing gives a 200 with output the client did
not ask for, so each is here with one of three answers: `implemented` (the engine honours it),
`ignored` (accepted because ignoring it cannot change what a client relies on, and the note says
why), or `refused` (a 400 naming it whenever it asks for something). The implemented and ignored
ones are typed fields of the request models in modelfleet/protocol.py, so a wrong type is a 400
there; docs/vllm-parameters.md is this table for readers, and a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from modelfleet.protocol import OpenAIError

Handling = Literal["implemented", "ignored", "refused"]
Endpoint = Literal["chat", "completions"]
BOTH: tuple[Endpoint, ...] = ("chat", "completions")


@dataclass(frozen=True)
class Extra:
    handling: Handling
    note: str
    endpoints: tuple[Endpoint, ...] = BOTH
    inert: tuple[Any, ...] = (None, False, [], {})  # values of a refused parameter that ask for nothing


VLLM_EXTRAS: dict[str, Extra] = {
    # -- structured outputs (worker/structured.py turns each into one llguidance grammar) --------
    "structured_outputs": Extra("implemented", "One of `json` (schema object or string), `regex` (the "
                                "whole output matches), `choice` (the output is exactly one of them), "
                                "`grammar` (Lark, or GBNF/EBNF, as llguidance reads them), `json_object`, "
                                "`structural_tag` (the `structures`/`triggers` form); `whitespace_pattern` and "
                                "`disable_additional_properties` are honoured, and JSON is compact unless "
                                "`whitespace_pattern` allows more (`disable_any_whitespace` always holds). "
                                "An invalid regex or grammar is a 400 naming it."),
    "guided_json": Extra("implemented", "As `structured_outputs.json`."),
    "guided_regex": Extra("implemented", "As `structured_outputs.regex`."),
    "guided_choice": Extra("implemented", "As `structured_outputs.choice`."),
    "guided_grammar": Extra("implemented", "As `structured_outputs.grammar`."),
    "structural_tag": Extra("implemented", "As `structured_outputs.structural_tag`."),
    "guided_whitespace_pattern": Extra("implemented", "As `structured_outputs.whitespace_pattern`: the "
                                       "whitespace a JSON constraint allows between tokens."),
    "guided_decoding_backend": Extra("ignored", "There is one backend, llguidance."),
    "response_format": Extra("implemented", "On completions as on chat: `json_object`, `json_schema`, and "
                             "vLLM's `structural_tag`.", ("completions",)),
    # -- sampling -----------------------------------------------------------------------------------
    "top_k": Extra("implemented", "0 or -1 turns it off."),
    "min_p": Extra("implemented", "Relative to the most likely token."),
    "repetition_penalty": Extra("implemented", "Over prompt and output tokens, as transformers does."),
    "min_tokens": Extra("implemented", "End-of-sequence and `stop_token_ids` wait until this many tokens; "
                        "more than the output limit is a 400."),
    "ignore_eos": Extra("implemented", "Generation continues past end-of-sequence tokens; `stop_token_ids` "
                        "still stop it."),
    "stop_token_ids": Extra("implemented", "Each id must be in the vocabulary."),
    "allowed_token_ids": Extra("implemented", "Only these ids are sampled; each must be in the vocabulary."),
    "bad_words": Extra("implemented", "A word's last token is blocked where the tokens before it were just "
                       "generated, for the word with and without a leading space, as vLLM does."),
    "length_penalty": Extra("ignored", "Only beam search reads it, and beam search is refused."),
    "early_stopping": Extra("ignored", "Only beam search reads it, and beam search is refused."),
    "use_beam_search": Extra("refused", "There is no beam search, only sampling."),
    "best_of": Extra("refused", "Only completions take it (OpenAI's, implemented there).", ("chat",),
                     (None, 1)),
    "logits_processors": Extra("refused", "Processors named by a request would load code into the server."),
    "logprob_token_ids": Extra("refused", "Use `top_logprobs`."),
    "thinking_token_budget": Extra("refused", "There is no reasoning parser to count thinking tokens.", BOTH,
                                   (None, -1)),
    "repetition_detection": Extra("refused", "Generation ends at a stop, end-of-sequence or the length limit "
                                  "only."),
    # -- prompt --------------------------------------------------------------------------------------
    "truncate_prompt_tokens": Extra("implemented", "Keeps the last N prompt tokens (-1: the context "
                                    "length); more than the context length is a 400."),
    "truncation_side": Extra("implemented", "`left` (the default) keeps the end of the prompt, `right` "
                             "its start."),
    "add_special_tokens": Extra("implemented", "Default false on chat (the template adds them), true on "
                                "completions."),
    "add_generation_prompt": Extra("implemented", "Default true, or false with `continue_final_message`; "
                                   "both true is a 400.", ("chat",)),
    "continue_final_message": Extra("implemented", "The final (assistant) message is continued, not "
                                    "closed.", ("chat",)),
    "echo": Extra("implemented", "On chat: the reply starts with the final message's content when that "
                  "message is the assistant's (completions' `echo` is OpenAI's).", ("chat",)),
    "chat_template_kwargs": Extra("implemented", "Passed to the chat template (e.g. `enable_thinking`). "
                                  "`add_generation_prompt`, `continue_final_message` and `documents` may be "
                                  "set here too; transformers' own arguments are a 400.", ("chat",)),
    "documents": Extra("implemented", "Passed to the chat template; templates without RAG ignore them.",
                       ("chat",)),
    "chat_template": Extra("refused", "A request's own template would run on the server (vLLM refuses it "
                           "too, without --trust-request-chat-template).", ("chat",)),
    "mm_processor_kwargs": Extra("ignored", "Models here are text-only; image and audio parts are refused "
                                 "on their own.", ("chat",)),
    "media_io_kwargs": Extra("ignored", "Models here are text-only; image and audio parts are refused on "
                             "their own.", ("chat",)),
    "prompt_embeds": Extra("refused", "Prompts are text or token ids.", ("completions",)),
    # -- output --------------------------------------------------------------------------------------
    "include_stop_str_in_output": Extra("implemented", "The stop string (or a stop token's text) stays at "
                                        "the end of the text."),
    "skip_special_tokens": Extra("implemented", "False keeps special tokens in the text."),
    "spaces_between_special_tokens": Extra("ignored", "Fast tokenizers never put spaces between special "
                                           "tokens, so both values give vLLM's output with such a tokenizer."),
    "return_token_ids": Extra("implemented", "`token_ids` on each choice (and on each streamed chunk), "
                              "`prompt_token_ids` on the response (chat) or each choice (completions), on "
                              "the first chunk when streaming."),
    "return_tokens_as_token_ids": Extra("implemented", "Logprob tokens read `token_id:<id>`."),
    "prompt_logprobs": Extra("implemented", "`prompt_logprobs`: per prompt token (the first is null) its "
                             "own and the top N entries as `{id: {logprob, rank, decoded_token}}`; 0..20 (-1 is a 400); "
                             "`rank` is null for a prompt token outside the top N; not with `stream`."),
    "stream_options.continuous_usage_stats": Extra("implemented", "With `include_usage`, every chunk carries "
                                                   "the usage so far."),
    "include_reasoning": Extra("ignored", "There is no reasoning parser: reasoning stays in `content`, as in "
                               "vLLM without --reasoning-parser.", ("chat",)),
    "stream_interval": Extra("ignored", "Each decode step is streamed as it happens."),
    # -- serving -------------------------------------------------------------------------------------
    "priority": Extra("ignored", "One queue, served in arrival order."),
    "request_id": Extra("ignored", "The `x-request-id` header names a request."),
    "cache_salt": Extra("ignored", "No cache is shared between requests, so there is nothing to salt."),
    "kv_transfer_params": Extra("refused", "There is no disaggregated prefill."),
    "vllm_xargs": Extra("refused", "There are no engine extensions to read them."),
}


def refuse_unsupported(req: Any, endpoint: Endpoint) -> None:
    """A 400 naming the first refused parameter that asks for something on this endpoint."""
    for name, extra in VLLM_EXTRAS.items():
        if extra.handling != "refused" or endpoint not in extra.endpoints:
            continue
        value = getattr(req, name, None)
        if not any(value is inert or (value == inert and type(value) is type(inert)) for inert in extra.inert):
            raise OpenAIError(f"`{name}` is not supported by this engine: {extra.note}", param=name,
                              code="unsupported_parameter")


def markdown_table() -> str:
    """The table as docs/vllm-parameters.md shows it (a test keeps the page equal to this):
    `python -c "from modelfleet.worker.extras import markdown_table; print(markdown_table())"`."""
    rows = ["| parameter | endpoints | handling | what this engine does |", "|---|---|---|---|"]
    for name, extra in VLLM_EXTRAS.items():
        rows.append(f"| `{name}` | {', '.join(extra.endpoints)} | {extra.handling} | {extra.note} |")
    return "\n".join(rows)
