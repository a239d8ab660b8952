"""Token usage of a relayed response, read from its bytes without parsing every event.

The worker reports usage in a non-streamed body and in a stream's final usage chunk (when the
client asked for one); otherwise the stream's events are counted (one token per event, which is
how the worker streams) and the prompt is estimated at four bytes a token.
"""

from __future__ import annotations

import re

TOTAL = re.compile(rb'"total_tokens":\s*(\d+)')
TAIL = 64  # enough to hold a usage field split across two chunks


class UsageScanner:
    def __init__(self, request_bytes: int) -> None:
        self.request_bytes = request_bytes
        self.tail = b""
        self.events = 0
        self.total: int | None = None

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(b"data: {")
        window = self.tail + chunk
        found = TOTAL.findall(window)
        if found:
            self.total = int(found[-1])
        self.tail = window[-TAIL:]

    def tokens(self) -> int:
        if self.total is not None:
            return self.total
        return self.events + self.request_bytes // 4
