"""Static discovery: a fixed list of NAME=URL backends, probed for readiness and model cards.

This is what `modelfleet serve` uses; in a cluster the EndpointSlice watch replaces it.
"""

from __future__ import annotations

import asyncio
import logging

from .registry import Registry, model_card
from .upstream import Probes, UpstreamError

log = logging.getLogger(__name__)


def parse_backends(specs: list[str]) -> dict[str, list[str]]:
    """`NAME=URL` (repeatable, also `NAME=URL1,URL2`) -> {name: [urls]}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, urls = spec.partition("=")
        if not sep or not name or not urls:
            raise ValueError(f"--backend takes NAME=URL, got {spec!r}")
        for url in urls.split(","):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--backend URL must start with http:// or https://, got {url!r}")
            out.setdefault(name, []).append(url.rstrip("/"))
    return out


class StaticDiscovery:
    """Probes each backend: modelfleet workers on `/ready` (503 while loading or draining);
    a backend without `/ready` is vLLM's OpenAI server, ready when its `/health` answers."""

    def __init__(self, registry: Registry, backends: dict[str, list[str]], client: Probes,
                 interval: float = 1.0, hold_timeout: float = 60.0, max_queue: int = 100) -> None:
        self.registry = registry
        self.client = client
        self.interval = interval
        self.hold_timeout = hold_timeout
        self.max_queue = max_queue
        for name, urls in backends.items():
            registry.set_endpoints(name, urls)
        self.task: asyncio.Task | None = None

    async def probe_once(self) -> None:
        await asyncio.gather(*(self._probe(e) for e in list(self.registry.endpoints.values())))

    async def _probe(self, endpoint) -> None:
        vllm = self.registry.engine(endpoint.model) == "vllm"
        try:
            r = await self.client.get(endpoint.url + ("/health" if vllm else "/ready"), timeout=2.0)
            if r.status == 404 and not vllm:
                self.registry.meta.setdefault(endpoint.model, {})["engine"] = "vllm"
                log.info("backend %s for %s is vLLM's server", endpoint.url, endpoint.model)
                r = await self.client.get(endpoint.url + "/health", timeout=2.0)
            ready = r.status == 200
            if ready and not endpoint.cards:
                cards = await self.client.get(endpoint.url + "/v1/models", timeout=2.0)
                endpoint.cards = [model_card(c, endpoint.model) for c in cards.json().get("data", [])]
                for card in endpoint.cards:
                    self.registry.aliases.setdefault(card["id"], endpoint.model)
        except (*UpstreamError, ValueError):
            ready = False
            endpoint.mark_lost()  # no answer at all: wedged or gone, unlike a draining 503
        if ready != endpoint.ready:
            log.info("backend %s for %s is %s", endpoint.url, endpoint.model, "ready" if ready else "not ready")
            endpoint.ready = ready
            self.registry.notify()

    async def run(self) -> None:
        while True:
            await self.probe_once()
            # Look often while requests are held for a backend, so they go as soon as it is ready
            # (a backend that is simply down is not probed faster for nobody).
            holding = any(self.registry.waiting.values())
            await asyncio.sleep(min(self.interval, 0.25) if holding else self.interval)

    async def start(self) -> None:
        await self.probe_once()
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    def ready(self) -> bool:
        return any(e.available() for e in self.registry.endpoints.values())

    async def wait_for(self, model: str) -> None:
        """Holds a request while its model's backends start (right after `modelfleet serve`
        answers, the workers are still loading), bounded; then 503 with Retry-After."""
        await self.registry.hold(model, self.hold_timeout, self.max_queue)
