"""The proxy's books: a request is counted on one replica from the pick until its relay closes,
through retries, failures and a client that leaves. A fake upstream stands in for the replicas
(each URL answers, drops the connection, or never answers)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.proxy import Proxy
from modelfleet.gateway.registry import Registry
from modelfleet.gateway.upstream import UpstreamResponse

GOOD, DROPS, STALLS = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"
SSE = {"content-type": "text/event-stream"}


class Body:
    """What UpstreamResponse reads from: aiohttp's response, as far as the relay uses it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.content = self
        self.chunks = chunks
        self.closed = self.released = False

    async def readany(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


class FakeUpstream:
    def __init__(self) -> None:
        self.posted: list[str] = []

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        self.posted.append(url)
        if url.startswith(DROPS):
            raise aiohttp.ServerDisconnectedError()
        if url.startswith(STALLS):
            await asyncio.sleep(3600)
        return UpstreamResponse(200, dict(SSE), Body([b'data: {"usage": {"total_tokens": 3}}\n\n', b"data: [DONE]\n\n"]))


def proxy(*urls: str, first_byte_timeout: float = 15.0) -> tuple[Proxy, Registry, FakeUpstream]:
    registry = Registry()
    registry.set_endpoints("m", list(urls), ready=True)
    upstream = FakeUpstream()
    return Proxy(registry, upstream, GatewayMetrics(registry), first_byte_timeout=first_byte_timeout), registry, upstream


def inflight(registry: Registry) -> dict[str, int]:
    return {e.url: e.inflight for e in registry.for_model("m")}


async def relay_all(relay) -> bytes:
    out = b""
    while chunk := await relay.read():
        out += chunk
    return out


def test_a_request_is_counted_on_its_replica_until_its_relay_closes() -> None:
    async def run() -> None:
        p, registry, _ = proxy(GOOD)
        relay = await p.forward("/v1/completions", b"{}", {}, "m", stream=True)
        assert inflight(registry) == {GOOD: 1}
        assert (await relay_all(relay)).endswith(b"[DONE]\n\n")
        relay.close()
        relay.close()
        assert inflight(registry) == {GOOD: 0} and relay.upstream.raw.released

    asyncio.run(run())


def test_retries_past_failing_and_stalled_replicas_leave_no_count_behind() -> None:
    async def run() -> None:
        p, registry, upstream = proxy(DROPS, STALLS, GOOD, first_byte_timeout=0.05)
        p.rng.seed(0)
        for _ in range(50):  # until the balancer has picked both bad ones (each pick is random)
            relay = await p.forward("/v1/completions", b"{}", {}, "m", stream=True)
            assert relay.endpoint.url == GOOD and inflight(registry)[GOOD] == 1
            assert inflight(registry)[DROPS] == inflight(registry)[STALLS] == 0
            relay.close()
            if {url.removesuffix("/v1/completions") for url in upstream.posted} == {DROPS, STALLS, GOOD}:
                break
        else:
            pytest.fail(f"the bad replicas were never tried: {upstream.posted}")
        assert inflight(registry) == {DROPS: 0, STALLS: 0, GOOD: 0}

    asyncio.run(run())


def test_a_client_that_leaves_while_waiting_releases_its_replica() -> None:
    async def run() -> None:
        p, registry, upstream = proxy(STALLS)
        forwarding = asyncio.create_task(p.forward("/v1/completions", b"{}", {}, "m", stream=False))
        while not upstream.posted:
            await asyncio.sleep(0)
        assert inflight(registry) == {STALLS: 1}
        forwarding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forwarding
        assert inflight(registry) == {STALLS: 0}

    asyncio.run(run())


def test_a_replica_failing_mid_stream_ends_it_with_an_openai_error_event() -> None:
    async def run() -> None:
        p, registry, _ = proxy(GOOD)
        relay = await p.forward("/v1/completions", b"{}", {}, "m", stream=True)

        async def broken() -> bytes:
            raise aiohttp.ClientPayloadError("cut")

        relay.upstream.raw.readany = broken
        event = await relay.read()
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        assert json.loads(event[6:])["error"]["code"] == "upstream_error"
        relay.close()
        assert inflight(registry) == {GOOD: 0} and relay.upstream.raw.closed

    asyncio.run(run())
