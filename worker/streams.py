"""Server-sent event streams for chat, completions and the Responses API.

Each generator cancels its engine request in `finally`, so a client that goes away frees its
batch rows at the next step. An error after the stream began is sent as a final error event.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from modelfleet.openai_types import FunctionCallItem, OutputMessage, OutputText, Response, ResponseUsage
from modelfleet.protocol import SSE_DONE, error_body, new_id, now, sse, sse_event, usage

from .engine import RequestStream
from .formatting import (
    Shown,
    TokenText,
    chat_delta,
    chat_logprobs,
    completion_logprobs,
    finish_with_calls,
    logprob_items,
)
from .service import ModelService
from .tool_calls import ParseEvent, ToolCall, ToolCallFormat, ToolCallParser

log = logging.getLogger(__name__)


class Chunks:
    """Frames one choice per chunk. With include_usage every chunk carries `usage: null`
    (OpenAI's shape), or with vLLM's continuous_usage_stats the usage so far. Chunks are dicts
    framed by `sse`, not typed models: this runs once per token, and a typed chunk costs twice
    as much to build and dump (openai_types' docstring); `ChatCompletionChunk` and
    `CompletionChunk` are their schema, checked against this framing in the unit tests."""

    def __init__(self, base: dict[str, Any], shown: Shown) -> None:
        self.base = base
        self.shown = shown

    def __call__(self, choice: dict[str, Any], so_far: tuple[int, int] = (0, 0), **top: Any) -> bytes:
        body = {**self.base, "choices": [choice], **top}
        if self.shown.include_usage:
            body["usage"] = usage(*so_far) if self.shown.continuous_usage else None
        return sse(body)

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})


def _error_event(message: str) -> bytes:
    return sse(error_body(message, type="server_error", code="internal_error"))


def _left(done: bool) -> None:
    if not done:
        log.info("client disconnected mid-stream; request cancelled")


async def chat_stream(service: ModelService, stream: RequestStream, model: str, n: int, shown: Shown,
                      tool_format: ToolCallFormat | None = None, echo: str = "") -> AsyncIterator[bytes]:
    """Chat chunks; with tools, each choice's text goes through a tool-call parser, so calls
    stream as OpenAI streams them and the rest as content. vLLM's `echo` text comes first, and
    its `prompt_token_ids` go on the role chunks (beside `choices`, as vLLM sends them)."""
    base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": model,
            "system_fingerprint": service.fingerprint}
    chunk = Chunks(base, shown)
    prompt_ids = stream.state.request.prompt_ids
    prompt_tokens = len(prompt_ids)
    counts = dict.fromkeys(range(n), 0)
    done = False
    try:
        for i in range(n):
            role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
            yield chunk(role, (prompt_tokens, 0), **({"prompt_token_ids": prompt_ids} if shown.token_ids else {}))
        for i in range(n if echo else 0):
            yield chunk({"index": i, "delta": {"content": echo}, "logprobs": None, "finish_reason": None},
                        (prompt_tokens, 0))
        completion_tokens = 0
        parsers: dict[int, ToolCallParser] = {}
        async for event in stream:
            if event.error:
                yield _error_event(event.error)
                break
            completion_tokens = event.completion_tokens
            for d in event.deltas:
                counts[d.index] += len(d.token_ids)
                so_far = (prompt_tokens, counts[d.index])
                lp = chat_logprobs(d.logprobs, shown.token_name) if d.logprobs else None
                ids = {"token_ids": d.token_ids} if shown.token_ids else {}
                if tool_format is None:
                    if d.text or d.logprobs or ids and d.token_ids:
                        yield chunk({"index": d.index, "delta": {"content": d.text}, "logprobs": lp,
                                     "finish_reason": None, **ids}, so_far)
                    if d.finish_reason:
                        yield chunk({"index": d.index, "delta": {}, "logprobs": None,
                                     "finish_reason": d.finish_reason}, so_far)
                    continue
                parser = parsers.setdefault(d.index, tool_format.parser())
                events = parser.feed(d.text) + (parser.finish() if d.finish_reason else [])
                deltas = [chat_delta(e) for e in events] or ([{}] if lp or ids and d.token_ids else [])
                for j, delta in enumerate(deltas):
                    first = {"logprobs": lp, **ids} if j == 0 else {"logprobs": None}
                    yield chunk({"index": d.index, "delta": delta, **first, "finish_reason": None}, so_far)
                if d.finish_reason:
                    finish = finish_with_calls(d.finish_reason, bool(parser.calls))
                    yield chunk({"index": d.index, "delta": {}, "logprobs": None, "finish_reason": finish}, so_far)
        if shown.include_usage:
            yield chunk.usage(prompt_tokens, completion_tokens, stream.state.cached_tokens)
        yield SSE_DONE
        done = True
    finally:
        stream.cancel()
        _left(done)


async def completion_stream(service: ModelService, streams: list[RequestStream], model: str, n: int,
                            echo_texts: list[str] | None, shown: Shown, logprobs: int | None
                            ) -> AsyncIterator[bytes]:
    base = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model,
            "system_fingerprint": service.fingerprint}
    chunk = Chunks(base, shown)
    text_of: TokenText = service.text_of
    prompts = [s.state.request.prompt_ids for s in streams]
    offsets: dict[int, int] = {}
    counts: dict[int, int] = {}
    first_of: set[int] = set()  # choices whose first chunk (with vLLM's prompt_token_ids) has gone
    done = False

    def prompt_ids_once(p: int, index: int) -> dict[str, Any]:
        if not shown.token_ids or index in first_of:
            return {}
        first_of.add(index)
        return {"prompt_token_ids": prompts[p]}

    try:
        if echo_texts is not None:
            for p, text in enumerate(echo_texts):
                for i in range(n):
                    offsets[p * n + i] = len(text)
                    yield chunk({"index": p * n + i, "text": text, "logprobs": None, "finish_reason": None,
                                 **prompt_ids_once(p, p * n + i)}, (len(prompts[p]), 0))
        totals: dict[int, tuple[int, int]] = {}
        async for p, event in ModelService.merge(streams):
            if event.error:
                yield _error_event(event.error)
                break
            totals[p] = (event.prompt_tokens, event.completion_tokens)
            for d in event.deltas:
                index = p * n + d.index
                counts[index] = counts.get(index, 0) + len(d.token_ids)
                lp = None
                if d.logprobs:
                    lp = completion_logprobs(d.logprobs, shown.token_name, offsets.get(index, 0), logprobs)
                    offsets[index] = offsets.get(index, 0) + sum(len(text_of(e.token_id)) for e in d.logprobs)
                ids = {"token_ids": d.token_ids} if shown.token_ids else {}
                if d.text or lp or d.finish_reason or ids and d.token_ids:
                    yield chunk({"index": index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason,
                                 **prompt_ids_once(p, index), **ids}, (len(prompts[p]), counts[index]))
        if shown.include_usage:
            yield chunk.usage(sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values()),
                              sum(s.state.cached_tokens for s in streams))
        yield SSE_DONE
        done = True
    finally:
        for s in streams:
            s.cancel()
        _left(done)


def response_object(rid: str, model: str, created: int, text: str | None, status: str, prompt_tokens: int,
                    completion_tokens: int, message_id: str, incomplete: bool = False,
                    calls: list[ToolCall] | None = None, logprobs: list[dict[str, Any]] | None = None,
                    cached_tokens: int = 0) -> dict[str, Any]:
    """The Responses API's response object; an `in_progress` one has no output and no usage yet."""
    done = status != "in_progress"
    content = [OutputText(text=text or "", logprobs=logprobs or [])]
    output: list[OutputMessage | FunctionCallItem] = [OutputMessage(id=message_id, content=content)] if done else []
    if calls and done:
        output = output if text else []
        output += [function_call(c) for c in calls]
    return Response(id=rid, created_at=created, status=status, model=model, output=output,
                    incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
                    usage=ResponseUsage.of(prompt_tokens, completion_tokens, cached_tokens) if done else None,
                    ).dump()


def function_call(call: ToolCall, status: str = "completed") -> FunctionCallItem:
    return FunctionCallItem(id="fc_" + call.id.removeprefix("call_"), call_id=call.id, name=call.name,
                            arguments=call.arguments, status=status)


def function_call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return function_call(call, status).dump()


def responses_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Responses API's `text.format` (flat) as chat's `response_format` (nested)."""
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.get("type")}


def responses_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools are flat (`{"type","name","parameters"}`); chat nests them."""
    if not tools:
        return None
    out = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function" and "function" not in tool:
            fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            out.append({"type": "function", "function": fn})
        else:
            out.append(tool)
    return out


class ResponseEvents:
    """Frames the Responses API's typed events, numbering them in the order they are sent."""

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        self.sent += 1
        return sse_event(kind, {"type": kind, "sequence_number": self.sent - 1, **fields})


class PlainText:
    """The parser for a Responses stream without tools: all text is message content."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content = ""

    def feed(self, text: str) -> list[ParseEvent]:
        self.content += text
        return [ParseEvent("content", text=text)] if text else []

    def finish(self) -> list[ParseEvent]:
        return []


async def responses_stream(stream: RequestStream, model: str, tool_format: ToolCallFormat | None = None,
                           text_of: TokenText | None = None) -> AsyncIterator[bytes]:
    """The Responses API's typed events, in the order OpenAI sends them. Without tools the
    message item opens at once; with tools it opens at the first content, and each call is a
    function_call item with argument deltas. With `text_of` (the request included
    "message.output_text.logprobs") each text delta carries the logprobs of its tokens."""
    rid, mid, created = new_id("resp"), new_id("msg"), now()
    event = ResponseEvents()
    pending: list[dict[str, Any]] = []  # logprobs of tokens whose text has not been sent yet
    sent_logprobs: list[dict[str, Any]] = []
    done = False

    parser: ToolCallParser = tool_format.parser() if tool_format is not None else PlainText()
    item_base = {"type": "message", "id": mid, "role": "assistant"}
    message_index: int | None = None
    items = 0
    open_call: tuple[int, ToolCall] | None = None

    def open_message() -> list[bytes]:
        nonlocal message_index, items
        message_index, items = items, items + 1
        return [event("response.output_item.added", output_index=message_index,
                      item={**item_base, "status": "in_progress", "content": []}),
                event("response.content_part.added", item_id=mid, output_index=message_index, content_index=0,
                      part={"type": "output_text", "text": "", "annotations": []})]

    def close_call() -> list[bytes]:
        if open_call is None:
            return []
        index, call = open_call
        item = function_call_item(call)
        return [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                      arguments=call.arguments),
                event("response.output_item.done", output_index=index, item=item)]

    try:
        yield event("response.created", response=response_object(rid, model, created, "", "in_progress", 0, 0, mid))
        yield event("response.in_progress",
                    response=response_object(rid, model, created, "", "in_progress", 0, 0, mid))
        if tool_format is None:
            for b in open_message():
                yield b
        prompt_tokens, completion_tokens, finish = 0, 0, None
        async for ev in stream:
            if ev.error:
                yield event("error", code="server_error", message=ev.error, param=None)
                done = True
                return
            prompt_tokens, completion_tokens = ev.prompt_tokens, ev.completion_tokens
            for d in ev.deltas:
                finish = d.finish_reason or finish
                if text_of is not None and d.logprobs:
                    pending += logprob_items(d.logprobs, text_of)
                for pe in parser.feed(d.text) + (parser.finish() if d.finish_reason else []):
                    if pe.kind == "content":
                        if message_index is None:
                            for b in open_message():
                                yield b
                        sent_logprobs += pending
                        yield event("response.output_text.delta", item_id=mid, output_index=message_index,
                                    content_index=0, delta=pe.text, logprobs=pending)
                        pending = []
                    elif pe.kind == "call" and pe.call is not None:
                        for b in close_call():
                            yield b
                        open_call, items = (items, parser.calls[pe.index]), items + 1
                        yield event("response.output_item.added", output_index=open_call[0],
                                    item={**function_call_item(pe.call, "in_progress"), "arguments": ""})
                    elif open_call is not None:
                        yield event("response.function_call_arguments.delta",
                                    item_id=function_call_item(open_call[1])["id"], output_index=open_call[0],
                                    delta=pe.text)
        for b in close_call():
            yield b
        sent_logprobs += pending  # tokens whose text never showed (an unfinished character at the end)
        if message_index is not None:
            text = parser.content
            done_part = {"type": "output_text", "text": text, "annotations": []}
            yield event("response.output_text.done", item_id=mid, output_index=message_index, content_index=0,
                        text=text, logprobs=sent_logprobs)
            yield event("response.content_part.done", item_id=mid, output_index=message_index, content_index=0,
                        part=done_part)
            yield event("response.output_item.done", output_index=message_index,
                        item={**item_base, "status": "completed", "content": [done_part]})
        incomplete = finish == "length"
        final = response_object(rid, model, created, parser.content or None,
                                "incomplete" if incomplete else "completed", prompt_tokens, completion_tokens, mid,
                                incomplete, parser.calls, sent_logprobs, stream.state.cached_tokens)
        yield event("response.incomplete" if incomplete else "response.completed", response=final)
        done = True
    finally:
        stream.cancel()
        _left(done)
