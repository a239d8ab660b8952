"""Per-key requests-per-minute and tokens-per-minute limits with OpenAI's x-ratelimit headers.

Sliding one-minute windows, in memory. Requests count when admitted; tokens (prompt +
completion) count when the response reports its usage, so a request that would cross the token
limit is still served and the next one waits (as OpenAI's own limiter behaves for streamed
output it cannot know in advance).

Several gateway replicas: each replica enforces `limit / replicas` (rounded up), where replicas
is the number of ready gateway endpoints it sees. With the even spread a Service gives, the
total stays within one request (and one response's tokens) per replica of the configured limit;
no shared store is needed on the request path.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from modelfleet.protocol import OpenAIError

from .auth import ApiKey

WINDOW = 60.0


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1s', '6m0s'."""
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    whole = int(math.ceil(seconds))
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Window:
    """Amounts used in the last minute."""

    events: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW:
            self.total -= self.events.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        if amount:
            self.events.append((now, amount))
            self.total += amount

    def replenished_in(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's x-ratelimit-reset-*): when the
        newest amount expires. O(1), as it runs on every admitted request."""
        return max(0.0, self.events[-1][0] + WINDOW - now) if self.events else 0.0

    def reset_in(self, now: float, limit: int) -> float:
        """Seconds until usage drops below `limit` again (walks only the amounts that must
        expire first, so it is short when a request is refused)."""
        if self.total < limit:
            return 0.0
        excess = self.total - limit + 1
        for stamp, amount in self.events:
            excess -= amount
            if excess <= 0:
                return max(0.0, stamp + WINDOW - now)
        return WINDOW


@dataclass
class Admission:
    """The outcome for one admitted request: headers to add and how to charge tokens later."""

    headers: dict[str, str]
    charge: Callable[[int], None]


class RateLimiter:
    def __init__(self, replicas: Callable[[], int] = lambda: 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.replicas = replicas
        self.clock = clock
        self.requests: dict[str, Window] = {}
        self.tokens: dict[str, Window] = {}

    def share(self, limit: int) -> int:
        return max(1, math.ceil(limit / max(1, self.replicas())))

    def admit(self, key: ApiKey | None) -> Admission:
        """Counts one request for `key` or raises a 429 with Retry-After."""
        if key is None or (key.rpm is None and key.tpm is None):
            return Admission({}, lambda tokens: None)
        now = self.clock()
        req = self.requests.setdefault(key.name, Window())
        tok = self.tokens.setdefault(key.name, Window())
        req.expire(now)
        tok.expire(now)
        headers: dict[str, str] = {}
        if key.rpm is not None:
            limit = self.share(key.rpm)
            if req.total >= limit:
                wait = req.reset_in(now, limit)
                raise self._limited("requests", "RPM", key.rpm, wait, headers | self._headers(
                    "requests", key.rpm, 0, wait))
        if key.tpm is not None:
            limit = self.share(key.tpm)
            if tok.total >= limit:
                wait = tok.reset_in(now, limit)
                raise self._limited("tokens", "TPM", key.tpm, wait, self._headers("tokens", key.tpm, 0, wait))
        req.add(now, 1)
        if key.rpm is not None:
            limit = self.share(key.rpm)
            headers |= self._headers("requests", key.rpm, max(0, limit - req.total), req.replenished_in(now))
        if key.tpm is not None:
            limit = self.share(key.tpm)
            headers |= self._headers("tokens", key.tpm, max(0, limit - tok.total), tok.replenished_in(now))

        def charge(tokens: int) -> None:
            tok.add(self.clock(), max(0, tokens))

        return Admission(headers, charge)

    @staticmethod
    def _headers(kind: str, limit: int, remaining: int, reset: float) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{kind}": str(limit),
            f"x-ratelimit-remaining-{kind}": str(remaining),
            f"x-ratelimit-reset-{kind}": format_reset(reset),
        }

    @staticmethod
    def _limited(kind: str, unit: str, limit: int, wait: float, headers: dict[str, str]) -> OpenAIError:
        retry = max(1, int(math.ceil(wait)))
        return OpenAIError(
            f"Rate limit reached for {kind} per min ({unit}): Limit {limit}. Please try again in "
            f"{format_reset(wait)}.",
            status=429, type=kind, code="rate_limit_exceeded",
            headers={**headers, "retry-after": str(retry)},
        )
