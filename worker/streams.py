"""Server-sent event streams for chat, completions and the Responses API.

Each generator cancels its engine request in `finally`, so a client that goes away frees its
batch rows at the next step. An error after the stream began is sent as a final error event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from modelfleet.protocol import SSE_DONE, error_body, new_id, now, sse, sse_event, usage

from .engine import RequestStream
from .formatting import TokenText, chat_logprobs, completion_logprobs
from .service import ModelService


def _error_event(message: str) -> bytes:
    return sse(error_body(message, type="server_error", code="internal_error"))


async def chat_stream(service: ModelService, stream: RequestStream, model: str, n: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": model,
            "system_fingerprint": service.fingerprint}

    def chunk(choice: dict[str, Any]) -> bytes:
        body = {**base, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    try:
        for i in range(n):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        prompt_tokens = completion_tokens = 0
        async for event in stream:
            if event.error:
                yield _error_event(event.error)
                break
            prompt_tokens, completion_tokens = event.prompt_tokens, event.completion_tokens
            for d in event.deltas:
                if d.text or d.logprobs:
                    lp = chat_logprobs(d.logprobs, service.text_of) if d.logprobs else None
                    yield chunk({"index": d.index, "delta": {"content": d.text}, "logprobs": lp,
                                 "finish_reason": None})
                if d.finish_reason:
                    yield chunk({"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason})
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
        body = {**base, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return sse(body)

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


def response_object(rid: str, model: str, created: int, text: str, status: str, prompt_tokens: int,
                    completion_tokens: int, message_id: str, incomplete: bool = False) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    output = [] if status == "in_progress" else [
        {"type": "message", "id": message_id, "status": "completed", "role": "assistant", "content": content}
    ]
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


async def responses_stream(stream: RequestStream, model: str) -> AsyncIterator[bytes]:
    """The Responses API's typed events, in the order OpenAI sends them."""
    rid, mid, created = new_id("resp"), new_id("msg"), now()
    seq = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        seq += 1
        return sse_event(kind, {"type": kind, "sequence_number": seq - 1, **fields})

    item_base = {"type": "message", "id": mid, "role": "assistant"}
    try:
        yield event("response.created", response=response_object(rid, model, created, "", "in_progress", 0, 0, mid))
        yield event("response.in_progress",
                    response=response_object(rid, model, created, "", "in_progress", 0, 0, mid))
        yield event("response.output_item.added", output_index=0,
                    item={**item_base, "status": "in_progress", "content": []})
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part)
        text, prompt_tokens, completion_tokens, finish = "", 0, 0, None
        async for ev in stream:
            if ev.error:
                yield event("error", code="server_error", message=ev.error, param=None)
                return
            prompt_tokens, completion_tokens = ev.prompt_tokens, ev.completion_tokens
            for d in ev.deltas:
                finish = d.finish_reason or finish
                if d.text:
                    text += d.text
                    yield event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                                delta=d.text, logprobs=[])
        yield event("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text,
                    logprobs=[])
        done_part = {"type": "output_text", "text": text, "annotations": []}
        yield event("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=done_part)
        yield event("response.output_item.done", output_index=0,
                    item={**item_base, "status": "completed", "content": [done_part]})
        incomplete = finish == "length"
        final = response_object(rid, model, created, text, "incomplete" if incomplete else "completed",
                                prompt_tokens, completion_tokens, mid, incomplete)
        yield event("response.incomplete" if incomplete else "response.completed", response=final)
    finally:
        stream.cancel()
