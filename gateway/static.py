"""Static discovery: a fixed list of NAME=URL backends, probed for readiness and model cards.

This is what `modelfleet serve` uses; in a cluster the EndpointSlice watch replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .looplag import LoopLag
from .registry import Endpoint, Registry, model_card
from .upstream import Probes, UpstreamError

log = logging.getLogger(__name__)
# A probe takes a few turns of the loop (connect, send, headers, body), each queued behind
# whatever else is ready: a lag of a quarter of its timeout can use the whole of it.
LAG_SHARE = 0.25


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


def timeout_excuse(last_read: float, started: float, lag: float, timeout: float) -> str | None:
    """Pure: why a probe that timed out says nothing against its replica, or None when it does.
    The replica sent us answer bytes since the probe started (it is serving, only busy), or the
    gateway's own loop lagged so long that the probe's answer may have waited unread. Only a
    timeout is excused: a refused connection, a dropped one or an error status is the replica's."""
    if last_read >= started:
        return "it is streaming answers"
    if lag >= timeout * LAG_SHARE:
        return f"the gateway's event loop lagged {lag:.2f}s"
    return None


class StaticDiscovery:
    """Probes each backend: modelfleet workers on `/ready` (503 while loading or draining);
    a backend without `/ready` is vLLM's OpenAI server, ready when its `/health` answers.

    Active health checks are kept apart from load, as Envoy keeps them apart from outlier
    detection: a refused or dropped connection, an error status or a broken answer marks the
    backend not ready at once, and a non-streamed request waiting on it moves elsewhere; a
    timeout does only when it is the backend's (`timeout_excuse`). Under a few thousand held
    streams the gateway's own loop can be too busy to read a probe's answer in time, and taking
    that for a failure would drop a healthy replica, the last one of its model included."""

    def __init__(self, registry: Registry, backends: dict[str, list[str]], client: Probes,
                 interval: float = 1.0, hold_timeout: float = 60.0, max_queue: int = 100,
                 probe_timeout: float = 2.0) -> None:
        self.registry = registry
        self.client = client
        self.interval = interval
        self.probe_timeout = probe_timeout
        self.lag = LoopLag()
        self.hold_timeout = hold_timeout
        self.max_queue = max_queue
        for name, urls in backends.items():
            registry.set_endpoints(name, urls)
        self.task: asyncio.Task | None = None

    async def probe_once(self) -> None:
        await asyncio.gather(*(self._probe(e) for e in list(self.registry.endpoints.values())))

    async def _probe(self, endpoint: Endpoint) -> None:
        vllm = self.registry.engine(endpoint.model) == "vllm"
        timeout = self.probe_timeout
        started = time.monotonic()
        try:
            r = await self.client.get(endpoint.url + ("/health" if vllm else "/ready"), timeout=timeout)
            if r.status == 404 and not vllm:
                self.registry.meta.setdefault(endpoint.model, {})["engine"] = "vllm"
                log.info("backend %s for %s is vLLM's server", endpoint.url, endpoint.model)
                r = await self.client.get(endpoint.url + "/health", timeout=timeout)
            ready = r.status == 200
            if ready and not endpoint.cards:
                cards = await self.client.get(endpoint.url + "/v1/models", timeout=timeout)
                endpoint.cards = [model_card(c, endpoint.model) for c in cards.json().get("data", [])]
                for card in endpoint.cards:
                    self.registry.aliases.setdefault(card["id"], endpoint.model)
        except (*UpstreamError, ValueError) as exc:
            if isinstance(exc, TimeoutError) and (
                    excuse := timeout_excuse(endpoint.last_read, started, self.lag.worst_since(started), timeout)):
                log.info("health check of %s timed out, not counted: %s", endpoint.url, excuse)
                return  # no verdict: it stays as the last probe found it
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
        self.lag.start()
        await self.probe_once()
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        self.lag.stop()
        if self.task:
            self.task.cancel()

    def ready(self) -> bool:
        return any(e.available() for e in self.registry.endpoints.values())

    async def wait_for(self, model: str, adapter: str | None = None) -> None:
        """Holds a request while its model's backends start (right after `modelfleet serve`
        answers, the workers are still loading), bounded; then 503 with Retry-After."""
        await self.registry.hold(model, self.hold_timeout, self.max_queue, adapter=adapter)
