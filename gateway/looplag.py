"""How late the gateway's own event loop runs: the delay every timer and socket callback waits
behind the work already queued (the measure Node's monitorEventLoopDelay and uvloop users take).

A readiness probe that times out while the loop lagged says nothing about the replica: its answer
may have sat unread in the socket while thousands of relayed streams had the loop. Static
discovery asks `worst_since` before it takes a timeout as the replica's failure (static.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class LoopLag:
    """Sleeps `interval` in a loop and keeps how much later than asked each sleep ended."""

    def __init__(self, interval: float = 0.1, keep: int = 600) -> None:
        self.interval = interval
        self.samples: deque[tuple[float, float]] = deque(maxlen=keep)  # (woke at, lag), time.monotonic()
        self.due = 0.0  # when the sleep in progress should end; 0 when not running
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        while True:
            self.due = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.samples.append((now, max(0.0, now - self.due)))

    def worst_since(self, start: float) -> float:
        """The longest the loop kept a callback waiting since `start` (time.monotonic()),
        counting the sleep still in progress: the callback that reads this may itself be the
        first to run after a stall that no sample has recorded yet."""
        ongoing = max(0.0, time.monotonic() - self.due) if self.due else 0.0
        return max([ongoing, *(lag for woke, lag in self.samples if woke >= start)])

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    def stop(self) -> None:
        if self.task:
            self.task.cancel()
