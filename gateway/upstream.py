"""The data-path HTTP client: aiohttp, chosen by measurement (bench/gateway_overhead.py).

httpx's per-chunk streaming read cost the gateway most of its throughput on streamed responses;
aiohttp's `iter_any()` hands over whatever has arrived, coalescing events that arrive together
into fewer writes. httpx stays for the gateway's control calls (probes, metrics scraping).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

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
