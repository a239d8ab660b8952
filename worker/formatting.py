"""Pure: engine output as the pieces of OpenAI bodies: choices, logprobs in each API's shape,
tool-call stream deltas. The bodies themselves are typed in modelfleet.openai_types."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelfleet.openai_types import ChatChoice, CompletionChoice
from modelfleet.protocol import SamplingFields

from .sequence import TokenLogprob
from .tool_calls import ParseEvent, ToolCallFormat, parse_all

TokenName = Callable[[int], str]


class TokenText:
    """Token id -> the text OpenAI shows for it (decoded, not the BPE symbol), cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self.cache[token_id] = text
        return text


def token_id_name(token_id: int) -> str:
    """vLLM's return_tokens_as_token_ids: a token written so that any token id survives JSON."""
    return f"token_id:{token_id}"


@dataclass(frozen=True)
class Shown:
    """What a request asked to see besides its text: vLLM's token ids, prompt logprobs and token
    naming, and OpenAI's (or vLLM's continuous) usage in streams."""

    token_name: TokenName
    token_ids: bool = False
    prompt_logprobs: int | None = None
    include_usage: bool = False
    continuous_usage: bool = False

    @classmethod
    def of(cls, req: SamplingFields, text_of: TokenName) -> Shown:
        final, continuous = req.wants_usage()
        return cls(token_id_name if req.return_tokens_as_token_ids else text_of, bool(req.return_token_ids),
                   req.prompt_logprobs, final, continuous)

    def prompt_fields(self, prompt_ids: list[int], entries: list[TokenLogprob | None] | None) -> dict[str, Any]:
        """vLLM's `prompt_token_ids` and `prompt_logprobs`, when asked for."""
        out: dict[str, Any] = {}
        if self.token_ids:
            out["prompt_token_ids"] = prompt_ids
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs(entries or [], self.prompt_logprobs, self.token_name)
        return out


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenName) -> dict[str, Any]:
    return {"content": logprob_items(entries, text_of), "refusal": None}


def logprob_items(entries: list[TokenLogprob], text_of: TokenName) -> list[dict[str, Any]]:
    """Chat's (and the Responses API's) per-token logprobs: top_logprobs are the top N alone."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        tok = text_of(token_id)
        return {"token": tok, "logprob": max(logprob, -9999.0), "bytes": list(tok.encode("utf-8"))}

    items = []
    for e in entries:
        item = one(e.token_id, e.logprob)
        item["top_logprobs"] = [one(t, lp) for t, lp in e.top]
        items.append(item)
    return items


def completion_logprobs(entries: list[TokenLogprob | None], text_of: TokenName, offset: int,
                        top_n: int | None = None) -> dict[str, Any]:
    """The legacy completions shape; `offset` is where the first token's text starts. Each
    `top_logprobs` entry holds the top `top_n` and, as OpenAI's does, the chosen (or echoed)
    token itself, so it has up to top_n + 1 entries."""
    tokens, token_lps, tops, offsets = [], [], [], []
    at = offset
    for e in entries:
        if e is None:
            continue
        tok = text_of(e.token_id)
        tokens.append(tok)
        unscored = math.isnan(e.logprob)  # the first prompt token: OpenAI sends null
        token_lps.append(None if unscored else max(e.logprob, -9999.0))
        if unscored:
            tops.append(None)
        else:
            top = {text_of(t): max(lp, -9999.0) for t, lp in e.top[:top_n]}
            top.setdefault(tok, max(e.logprob, -9999.0))
            tops.append(top)
        offsets.append(at)
        at += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(entries: list[TokenLogprob | None], top_n: int, text_of: TokenName
                    ) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt position (the first has none) the prompt token's own
    entry and the top `top_n`, as {token id: {logprob, rank, decoded_token}}. A prompt token's
    rank is known when it is among the top the engine computed, else null."""
    out: list[dict[str, Any] | None] = []
    for e in entries:
        if e is None or math.isnan(e.logprob):
            out.append(None)
            continue
        ranks = {t: (rank, lp) for rank, (t, lp) in enumerate(e.top, 1)}
        own_rank = ranks.get(e.token_id, (None, 0.0))[0]
        item = {str(e.token_id): {"logprob": max(e.logprob, -9999.0), "rank": own_rank,
                                  "decoded_token": text_of(e.token_id)}}
        for t, lp in e.top[:top_n]:
            item.setdefault(str(t), {"logprob": max(lp, -9999.0), "rank": ranks[t][0], "decoded_token": text_of(t)})
        out.append(item)
    return out


def prompt_entries(prompt_ids: list[int], entries: list[TokenLogprob | None] | None) -> list[TokenLogprob | None]:
    """Echoed prompt tokens for completions logprobs: the first token shows with logprob None."""
    if entries is None:
        return []
    out: list[TokenLogprob | None] = []
    for i, e in enumerate(entries):
        out.append(e if e is not None else TokenLogprob(prompt_ids[i], float("nan"), []))
    return out


@dataclass
class ChoiceState:
    """A choice accumulated from deltas, for non-streamed responses."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs)


def chat_message(text: str, finish_reason: str | None, tool_format: ToolCallFormat | None
                 ) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a non-streamed choice, with tool calls parsed out of the text
    when the request had tools; a finished message with calls ends with "tool_calls"."""
    if tool_format is None:
        return {"role": "assistant", "content": text, "refusal": None}, finish_reason
    content, calls = parse_all(tool_format, text)
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    return message, finish_with_calls(finish_reason, bool(calls))


def chat_choice(state: ChoiceState, tool_format: ToolCallFormat | None, shown: Shown, *, logprobs: bool,
                echo: str = "") -> ChatChoice:
    """One choice of a non-streamed chat response; `echo` (vLLM's) starts the content."""
    message, finish = chat_message(state.text, state.finish_reason, tool_format)
    if echo:
        message["content"] = echo + (message["content"] or "")
    ids = {"token_ids": state.token_ids} if shown.token_ids else {}
    return ChatChoice(index=state.index, message=message, finish_reason=finish,
                      logprobs=chat_logprobs(state.logprobs, shown.token_name) if logprobs else None, **ids)


def completion_choice(index: int, state: ChoiceState, shown: Shown, *, prompt_ids: list[int],
                      prompt_lps: list[TokenLogprob | None] | None, echo_text: str | None, logprobs: int | None,
                      scoring_only: bool) -> CompletionChoice:
    """One choice of a non-streamed completion: with `echo_text` the prompt (and its logprobs)
    come first; `scoring_only` (max_tokens=0) shows the prompt alone."""
    text = "" if scoring_only else state.text
    entries: list[TokenLogprob | None] = [] if scoring_only else list(state.logprobs)
    if echo_text is not None:
        entries = prompt_entries(prompt_ids, prompt_lps) + entries
        text = echo_text + text
    ids = {"token_ids": [] if scoring_only else state.token_ids} if shown.token_ids else {}
    return CompletionChoice(
        index=index, text=text,
        logprobs=completion_logprobs(entries, shown.token_name, 0, logprobs) if logprobs is not None else None,
        finish_reason="length" if scoring_only else state.finish_reason,
        **shown.prompt_fields(prompt_ids, prompt_lps), **ids)


def finish_with_calls(finish_reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and finish_reason == "stop" else finish_reason


def chat_delta(event: ParseEvent) -> dict[str, Any]:
    """A stream delta for one parser event, in the shape OpenAI streams tool calls: the first
    delta of a call has id, type and name with empty arguments, later ones argument text."""
    if event.kind == "content":
        return {"content": event.text}
    if event.kind == "call":
        assert event.call is not None
        return {"tool_calls": [{"index": event.index, "id": event.call.id, "type": "function",
                                "function": {"name": event.call.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
