"""Token usage of a relayed response, read from its bytes without parsing every event.

The worker reports usage in a non-streamed body and in a stream's final usage chunk (when the
client asked for one); otherwise the stream's events are counted (one token per event, which is
how the worker streams) and the prompt is estimated at four bytes a token.
"""

from __future__ import annotations

import json
import re

from modelfleet.protocol import SseEvents

TOTAL = re.compile(rb'"total_tokens":\s*(\d+)')
KEY = b'"total_tokens"'
EDGE = 64  # enough to hold a usage field split across two chunks


class UsageScanner:
    """Reads usage from relayed chunks. Called for every chunk of every stream, so the common
    chunk (no usage in it, following a whole event) costs one substring search and no copy."""

    def __init__(self, request_bytes: int) -> None:
        self.request_bytes = request_bytes
        self.previous = b""
        self.events = 0
        self.total: int | None = None

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(b"data: {")
        previous = self.previous
        # After a whole event ("\n\n") nothing can straddle the boundary.
        straddles = previous and not previous.endswith(b"\n\n")
        if KEY in chunk or (straddles and KEY in previous[-EDGE:] + chunk[:EDGE]):
            # The field may straddle the boundary, number included: the last match wins, so a
            # number cut short here is completed by the next chunk's look across the edge.
            found = TOTAL.findall(previous[-EDGE:] + chunk)
            if found:
                self.total = int(found[-1])
        # Small chunks accumulate, so that the edge always holds the last EDGE bytes.
        self.previous = chunk if len(chunk) >= EDGE else (previous + chunk)[-EDGE:]

    def tokens(self) -> int:
        if self.total is not None:
            return self.total
        return self.events + self.request_bytes // 4


def ask_for_usage(body: bytes) -> bytes:
    """The request with `stream_options.include_usage` on: to charge a key's token limit
    exactly, the gateway needs a stream's usage even when the client did not ask for it."""
    data = json.loads(body)
    options = data.get("stream_options") if isinstance(data.get("stream_options"), dict) else {}
    # continuous_usage_stats would put the usage in every chunk: the client did not ask for it.
    data["stream_options"] = {**options, "include_usage": True, "continuous_usage_stats": False}
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


class UsageStripper:
    """Takes out of a stream what `ask_for_usage` added and the client did not ask for: the
    final chunk that holds only the usage, and the `"usage":null` OpenAI's shape puts in every
    other chunk. Works on whole events, so it holds back an event cut across two chunks."""

    def __init__(self) -> None:
        self.events = SseEvents()

    def feed(self, chunk: bytes) -> bytes:
        """The relayable part of what has arrived; b"" (end of stream) flushes the rest."""
        if not chunk:
            return self.events.flush()
        return b"".join(_strip_event(e) for e in self.events.feed(chunk))


def _strip_event(event: bytes) -> bytes:
    if b'"usage"' not in event:
        return event + b"\n\n"
    if b'"usage":null' not in event and event.startswith(b"data: {"):
        try:
            payload = json.loads(event[len(b"data: "):])
        except ValueError:
            return event + b"\n\n"
        if payload.get("choices") == [] and payload.get("usage"):
            return b""  # the usage-only chunk
    return event.replace(b',"usage":null', b"") + b"\n\n"
