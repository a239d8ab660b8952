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


class _Client:
    """One aiohttp session over a bounded pool of connections to the replicas, made on first use
    (a session belongs to the event loop it is made in) and closed once: the data path's
    (`Upstream`) and the control calls' (`Probes`) differ only in what they pass here.

    Idle connections are dropped well before workers close them (75 s), so a request never
    lands on a connection the worker has just closed; the one limit is the whole pool's."""

    def __init__(self, max_connections: int, timeout: aiohttp.ClientTimeout, decompress: bool,
                 dns_ttl: int) -> None:
        self.max_connections = max_connections
        self.timeout = timeout
        self.decompress = decompress
        self.dns_ttl = dns_ttl
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                             ttl_dns_cache=self.dns_ttl, keepalive_timeout=30)
            self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                                 auto_decompress=self.decompress)
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class Upstream(_Client):
    """The data path's client: the request bytes out, the answer's bytes back as they are
    (compressed ones too), a connect and a per-read timeout, never a total one (streams)."""

    def __init__(self, connect_timeout: float, read_timeout: float, max_connections: int) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        super().__init__(max_connections, timeout, decompress=False, dns_ttl=300)  # a lookup per request costs

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        raw = await self._session().post(url, data=body, headers=headers)
        return UpstreamResponse(raw.status, {k.lower(): v for k, v in raw.headers.items()}, raw)


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


class Probes(_Client):
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
        # Each get bounds itself (its timeout replaces the session's); aiohttp's default DNS cache.
        super().__init__(max_connections, aiohttp.ClientTimeout(total=None), decompress=True, dns_ttl=10)

    async def get(self, url: str, timeout: float) -> ProbeAnswer:
        timeouts = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        async with self._session().get(url, timeout=timeouts) as r:
            return ProbeAnswer(r.status, await r.read())
