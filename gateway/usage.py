"""Token usage of a relayed response, read from its bytes without parsing every event.

The worker reports usage in a non-streamed body and in a stream's final usage chunk (when the
client asked for one); otherwise the stream's events are counted (one token per event, which is
how the worker streams) and the prompt is estimated at four bytes a token.
"""

from __future__ import annotations

import re

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
