"""The gateway's one HTTP client library: aiohttp, chosen by measurement (bench/gateway_overhead.py).

httpx's per-chunk streaming read cost the gateway most of its throughput on streamed responses;
aiohttp's `readany()` hands over whatever has arrived, coalescing events that arrive together
into fewer writes. The control calls (readiness probes, model cards, /metrics scrapes) use it
too, on a session of their own (`Probes`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp


class ReplicaLost(ConnectionError):
    """Discovery found the replica failing while a request waited for its answer."""


UpstreamError = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    raw: aiohttp.ClientResponse

    async def read(self) -> bytes:
        """Whatever has arrived (events that arrive together leave in one write); b"" at the end."""
        return await self.raw.content.readany()

    def close(self, completed: bool) -> None:
        """Completed: the connection goes back to the pool. Otherwise it is dropped, which is
        how the worker learns that the client went away and frees the request's batch rows."""
        if completed:
            self.raw.release()
        else:
            self.raw.close()


class Upstream:
    def __init__(self, connect_timeout: float, read_timeout: float, max_connections: int) -> None:
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            # Idle connections are dropped well before workers close them (75 s), so a request never
            # lands on a connection the worker has just closed.
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, ttl_dns_cache=300,
                                             keepalive_timeout=30)
            self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, auto_decompress=False)
        return self.session

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        raw = await self._session().post(url, data=body, headers=headers)
        return UpstreamResponse(raw.status, {k.lower(): v for k, v in raw.headers.items()}, raw)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


@dataclass(frozen=True)
class ProbeAnswer:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ValueError if it is not."""
        return json.loads(self.body)


class Probes:
    """The control calls' client: readiness probes and model cards (static.py) and /metrics
    scrapes (load.py), each a small GET read whole within its own timeout.

    A session of its own rather than the data path's (`Upstream`): that session's connection
    limit is shared by every relayed stream, so under a saturated data path a probe would queue
    for a free connection, time out, and mark a healthy replica lost (and scrapes would read
    stale load just when it matters most); and probes on that session would take slots from
    requests. Here a few connections (`max_connections`, reused between rounds) serve every
    replica's probes, independent of how busy the data path is. Errors are `UpstreamError`s.

    `timeout` bounds each phase, as httpx's did before: the wait for a connection plus the
    connect, then each read; not the whole exchange.
    """

    def __init__(self, max_connections: int = 64) -> None:
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    async def get(self, url: str, timeout: float) -> ProbeAnswer:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, keepalive_timeout=30)
            self.session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        timeouts = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        async with self.session.get(url, timeout=timeouts) as r:
            return ProbeAnswer(r.status, await r.read())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
