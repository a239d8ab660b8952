"""Reads each worker's own queue from its /metrics, so that several gateway replicas balance on
what the workers actually hold, not only on their own in-flight counts; and, for a model with
LoRA adapters, which of them each worker holds, from its /v1/models."""

from __future__ import annotations

import asyncio
import logging

from modelfleet.engines import inflight_from_metrics

from .registry import Endpoint, Registry
from .upstream import Probes, UpstreamError

log = logging.getLogger(__name__)


def held_adapters(cards: list, wanted: set[str]) -> frozenset[str]:
    """Pure: the names of `wanted` that a /v1/models answer lists as adapters (with a parent)."""
    return frozenset(c["id"] for c in cards if isinstance(c, dict) and c.get("parent") and c.get("id") in wanted)


class LoadScraper:
    def __init__(self, registry: Registry, client: Probes, interval: float = 1.0) -> None:
        self.registry = registry
        self.client = client
        self.interval = interval
        self.task: asyncio.Task | None = None

    async def scrape(self, endpoint: Endpoint) -> None:
        mine = endpoint.inflight
        try:
            r = await self.client.get(endpoint.url + "/metrics", timeout=1.0)
            queue = inflight_from_metrics(r.text) if r.status == 200 else None
        except UpstreamError:
            queue = None
        # What the worker holds beyond this gateway's own requests: other gateway replicas' load.
        endpoint.reported_waiting = max(0, queue - mine) if queue is not None else 0
        wanted = {a for a, m in self.registry.adapters.items() if m == endpoint.model}
        if wanted or endpoint.adapters:
            await self.scrape_adapters(endpoint, wanted)

    async def scrape_adapters(self, endpoint: Endpoint, wanted: set[str]) -> None:
        """Which of its model's LoRA adapters a replica holds, from its /v1/models (both engines
        list a loaded adapter with the base as parent): the operator loads them, and an adapter's
        requests must only reach replicas that hold one. Unchanged when the replica does not answer."""
        try:
            r = await self.client.get(endpoint.url + "/v1/models", timeout=1.0)
            cards = r.json().get("data") if r.status == 200 else None
        except (*UpstreamError, ValueError, AttributeError):
            return
        if not isinstance(cards, list):
            return
        held = held_adapters(cards, wanted)
        if held != endpoint.adapters:
            endpoint.adapters = held
            self.registry.notify()  # requests held for an adapter look again

    async def run(self) -> None:
        while True:
            endpoints = [e for e in self.registry.endpoints.values() if e.ready]
            await asyncio.gather(*(self.scrape(e) for e in endpoints), return_exceptions=True)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    def stop(self) -> None:
        if self.task:
            self.task.cancel()
