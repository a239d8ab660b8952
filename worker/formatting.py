"""Pure builders of OpenAI response bodies and stream chunks from engine output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .sequence import TokenLogprob
from .tool_calls import ParseEvent, ToolCallFormat, parse_all


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


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenText) -> dict[str, Any]:
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        tok = text_of(token_id)
        return {"token": tok, "logprob": max(logprob, -9999.0), "bytes": list(tok.encode("utf-8"))}

    content = []
    for e in entries:
        item = one(e.token_id, e.logprob)
        item["top_logprobs"] = [one(t, lp) for t, lp in e.top]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob | None], text_of: TokenText, offset: int) -> dict[str, Any]:
    """The legacy completions shape; `offset` is where the first token's text starts."""
    tokens, token_lps, tops, offsets = [], [], [], []
    at = offset
    for e in entries:
        if e is None:
            continue
        tok = text_of(e.token_id)
        tokens.append(tok)
        unscored = math.isnan(e.logprob)  # the first prompt token: OpenAI sends null
        token_lps.append(None if unscored else max(e.logprob, -9999.0))
        tops.append(None if unscored else {text_of(t): max(lp, -9999.0) for t, lp in e.top} or None)
        offsets.append(at)
        at += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


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
