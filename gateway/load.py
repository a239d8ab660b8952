"""Reads each worker's own queue from its /metrics, so that several gateway replicas balance on
what the workers actually hold, not only on their own in-flight counts."""

from __future__ import annotations

import asyncio
import logging

from modelfleet.engines import inflight_from_metrics

from .registry import Endpoint, Registry
from .upstream import Probes, UpstreamError

log = logging.getLogger(__name__)


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
