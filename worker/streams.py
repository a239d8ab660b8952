"""Server-sent event streams for chat, completions and the Responses API.

Each generator cancels its engine request in `finally`, so a client that goes away frees its
batch rows at the next step. An error after the stream began is sent as a final error event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from modelfleet.protocol import SSE_DONE, error_body, new_id, now, sse, sse_event, usage

from .engine import RequestStream
from .formatting import TokenText, chat_delta, chat_logprobs, completion_logprobs, finish_with_calls
from .service import ModelService
from .tool_calls import ParseEvent, ToolCall, ToolCallFormat, ToolCallParser


def choice_chunk(base: dict[str, Any], choice: dict[str, Any], include_usage: bool) -> bytes:
    """One choice's chunk; with include_usage every chunk carries `usage: null` (OpenAI's shape)."""
    body = {**base, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return sse(body)


def _error_event(message: str) -> bytes:
    return sse(error_body(message, type="server_error", code="internal_error"))


async def chat_stream(service: ModelService, stream: RequestStream, model: str, n: int,
                      include_usage: bool, tool_format: ToolCallFormat | None = None) -> AsyncIterator[bytes]:
    """Chat chunks; with tools, each choice's text goes through a tool-call parser, so calls
    stream as OpenAI streams them and the rest as content."""
    base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": model,
            "system_fingerprint": service.fingerprint}

    def chunk(choice: dict[str, Any]) -> bytes:
        return choice_chunk(base, choice, include_usage)

    try:
        for i in range(n):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        prompt_tokens = completion_tokens = 0
        parsers: dict[int, ToolCallParser] = {}
        async for event in stream:
            if event.error:
                yield _error_event(event.error)
                break
            prompt_tokens, completion_tokens = event.prompt_tokens, event.completion_tokens
            for d in event.deltas:
                lp = chat_logprobs(d.logprobs, service.text_of) if d.logprobs else None
                if tool_format is None:
                    if d.text or d.logprobs:
                        yield chunk({"index": d.index, "delta": {"content": d.text}, "logprobs": lp,
                                     "finish_reason": None})
                    if d.finish_reason:
                        yield chunk({"index": d.index, "delta": {}, "logprobs": None,
                                     "finish_reason": d.finish_reason})
                    continue
                parser = parsers.setdefault(d.index, tool_format.parser())
                events = parser.feed(d.text) + (parser.finish() if d.finish_reason else [])
                deltas = [chat_delta(e) for e in events] or ([{}] if lp else [])
                for j, delta in enumerate(deltas):
                    yield chunk({"index": d.index, "delta": delta, "logprobs": lp if j == 0 else None,
                                 "finish_reason": None})
                if d.finish_reason:
                    finish = finish_with_calls(d.finish_reason, bool(parser.calls))
                    yield chunk({"index": d.index, "delta": {}, "logprobs": None, "finish_reason": finish})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield SSE_DONE
    finally:
        stream.cancel()


async def completion_stream(service: ModelService, streams: list[RequestStream], model: str, n: int,
                            echo_texts: list[str] | None, include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model,
            "system_fingerprint": service.fingerprint}
    text_of: TokenText = service.text_of
    offsets: dict[int, int] = {}

    def chunk(choice: dict[str, Any]) -> bytes:
        return choice_chunk(base, choice, include_usage)

    try:
        if echo_texts is not None:
            for p, text in enumerate(echo_texts):
                for i in range(n):
                    offsets[p * n + i] = len(text)
                    yield chunk({"index": p * n + i, "text": text, "logprobs": None, "finish_reason": None})
        totals: dict[int, tuple[int, int]] = {}
        async for p, event in ModelService.merge(streams):
            if event.error:
                yield _error_event(event.error)
                break
            totals[p] = (event.prompt_tokens, event.completion_tokens)
            for d in event.deltas:
                index = p * n + d.index
                lp = None
                if d.logprobs:
                    lp = completion_logprobs(d.logprobs, text_of, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(text_of(e.token_id)) for e in d.logprobs)
                if d.text or lp or d.finish_reason:
                    yield chunk({"index": index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason})
        if include_usage:
            prompt = sum(t[0] for t in totals.values())
            completion = sum(t[1] for t in totals.values())
            yield sse({**base, "choices": [], "usage": usage(prompt, completion)})
        yield SSE_DONE
    finally:
        for s in streams:
            s.cancel()


def response_object(rid: str, model: str, created: int, text: str | None, status: str, prompt_tokens: int,
                    completion_tokens: int, message_id: str, incomplete: bool = False,
                    calls: list[ToolCall] | None = None) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text or "", "annotations": [], "logprobs": []}]
    output = [] if status == "in_progress" else [
        {"type": "message", "id": message_id, "status": "completed", "role": "assistant", "content": content}
    ]
    if calls and status != "in_progress":
        output = output if text else []
        output += [function_call_item(c) for c in calls]
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": output,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "usage": None if status == "in_progress" else {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def function_call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": status}


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


async def responses_stream(stream: RequestStream, model: str,
                           tool_format: ToolCallFormat | None = None) -> AsyncIterator[bytes]:
    """The Responses API's typed events, in the order OpenAI sends them. Without tools the
    message item opens at once; with tools it opens at the first content, and each call is a
    function_call item with argument deltas."""
    rid, mid, created = new_id("resp"), new_id("msg"), now()
    event = ResponseEvents()

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
                return
            prompt_tokens, completion_tokens = ev.prompt_tokens, ev.completion_tokens
            for d in ev.deltas:
                finish = d.finish_reason or finish
                for pe in parser.feed(d.text) + (parser.finish() if d.finish_reason else []):
                    if pe.kind == "content":
                        if message_index is None:
                            for b in open_message():
                                yield b
                        yield event("response.output_text.delta", item_id=mid, output_index=message_index,
                                    content_index=0, delta=pe.text, logprobs=[])
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
        if message_index is not None:
            text = parser.content
            done_part = {"type": "output_text", "text": text, "annotations": []}
            yield event("response.output_text.done", item_id=mid, output_index=message_index, content_index=0,
                        text=text, logprobs=[])
            yield event("response.content_part.done", item_id=mid, output_index=message_index, content_index=0,
                        part=done_part)
            yield event("response.output_item.done", output_index=message_index,
                        item={**item_base, "status": "completed", "content": [done_part]})
        incomplete = finish == "length"
        final = response_object(rid, model, created, parser.content or None,
                                "incomplete" if incomplete else "completed", prompt_tokens, completion_tokens, mid,
                                incomplete, parser.calls)
        yield event("response.incomplete" if incomplete else "response.completed", response=final)
    finally:
        stream.cancel()
