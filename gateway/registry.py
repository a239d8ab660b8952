"""Which endpoints serve which model, whether each can take traffic, and how busy it is.

Discovery (static or Kubernetes) writes it; the proxy and balancer read it. All access happens on
the gateway's event loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelfleet.openai_types import ModelCard
from modelfleet.protocol import unavailable

from .balancer import RouteSettings
from .pool import Pool


@dataclass
class Endpoint:
    url: str
    model: str
    ready: bool = False
    inflight: int = 0
    reported_waiting: int = 0  # the worker's own queue, from its /metrics
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    cards: list[dict[str, Any]] = field(default_factory=list)
    # The ModelDeployment ("namespace/name") this replica belongs to, and its spec.routing.weight
    # when several serve one name (balancer.by_weight); empty and None under static discovery.
    deployment: str = ""
    weight: int | None = None
    # The LoRA adapters this replica holds (its /v1/models, read by load.LoadScraper): an
    # adapter's requests go only to replicas that hold it.
    adapters: frozenset[str] = frozenset()
    # When the replica last sent bytes of an answer (Relay._read; time.monotonic()): a replica
    # streaming to us is alive whatever its health check's timeout says (static.py).
    last_read: float = 0.0
    # Resolved when discovery finds the replica failing (see Proxy._post); made on demand.
    _lost: asyncio.Future | None = field(default=None, repr=False, compare=False)

    def available(self, now: float | None = None) -> bool:
        return self.ready and (now or time.monotonic()) >= self.ejected_until

    def lost_signal(self) -> asyncio.Future:
        """A future that discovery resolves if this replica is found failing, not draining: its
        health check times out or errors, or Kubernetes marks it unready while not terminating."""
        if self._lost is None or self._lost.done():
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost

    def mark_lost(self) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def load(self) -> int:
        return self.inflight + self.reported_waiting


@dataclass
class OutlierPolicy:
    """Passive ejection: after `failures` consecutive errors, skip the endpoint for a while."""

    failures: int = 3
    eject_seconds: float = 10.0


class Registry:
    def __init__(self, outliers: OutlierPolicy | None = None) -> None:
        self.endpoints: dict[str, Endpoint] = {}  # by url
        self.aliases: dict[str, str] = {}  # served name or alias -> model
        self.meta: dict[str, dict[str, Any]] = {}  # model -> what discovery knows (routing, context, engine)
        self.pools: dict[str, Pool] = {}  # model -> its endpoints, route settings and hash ring (pool.py)
        self.outliers = outliers or OutlierPolicy()
        self.waiting: dict[str, int] = {}  # model -> requests held for a ready replica
        self.adapters: dict[str, str] = {}  # adapter name (spec.adapters) -> the model it runs on
        self._changed: asyncio.Event | None = None

    # -- holding a request until its model has a ready replica ---------------------------------

    def notify(self) -> None:
        """Discovery calls this when an endpoint may have become ready: held requests look again."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def hold(self, model: str, timeout: float, max_queue: int,
                   on_wait: Callable[[], Awaitable[None]] | None = None, tick: float = 5.0,
                   adapter: str | None = None) -> None:
        """Waits until `model` has an available endpoint (holding `adapter`, if given): at most
        `timeout` seconds and `max_queue` requests at once, then 503 with Retry-After. `on_wait`
        runs at least every `tick` seconds while waiting (the scale-from-zero demand signal)."""
        if self.available(model, adapter):
            return
        if self.waiting.get(model, 0) >= max_queue:
            raise unavailable(f"Too many requests are waiting for model `{model}` to start.", retry_after=10)
        self.waiting[model] = self.waiting.get(model, 0) + 1
        deadline = time.monotonic() + timeout
        try:
            while not self.available(model, adapter):
                if on_wait is not None:
                    await on_wait()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    what = f"Model `{model}` has no ready replica" if adapter is None else (
                        f"No ready replica of model `{model}` holds adapter `{adapter}`")
                    raise unavailable(f"{what} after waiting {timeout:.0f}s.", retry_after=10)
                if self._changed is None:
                    self._changed = asyncio.Event()
                try:
                    async with asyncio.timeout(min(remaining, tick)):
                        await self._changed.wait()
                except TimeoutError:
                    pass
        finally:
            self.waiting[model] -= 1

    def engine(self, model: str) -> str:
        """Which engine serves `model`: modelfleet's worker unless discovery found vLLM."""
        return self.meta.get(model, {}).get("engine", "modelfleet")

    def set_endpoints(self, model: str, urls: list[str], names: list[str] | None = None,
                      ready: bool | None = None, groups: Mapping[str, tuple[str, int | None]] | None = None) -> None:
        """Replaces the endpoint set and names of `model`, keeping counters of endpoints that
        stay. `ready` marks them as Kubernetes reports; None leaves it to probing. `groups` maps
        a URL to its ModelDeployment and weight, for a name that several of them serve."""
        keep = set(urls)
        for url in [u for u, e in self.endpoints.items() if e.model == model and u not in keep]:
            del self.endpoints[url]
        for url in urls:
            endpoint = self.endpoints.setdefault(url, Endpoint(url=url, model=model))
            if ready is not None:
                endpoint.ready = ready
            if groups is not None and url in groups:
                endpoint.deployment, endpoint.weight = groups[url]
        self.pools.setdefault(model, Pool(model)).update([self.endpoints[u] for u in dict.fromkeys(urls)])
        for alias in [a for a, m in self.aliases.items() if m == model]:
            del self.aliases[alias]
        for name in names or [model]:
            self.aliases[name] = model
        self.aliases.setdefault(model, model)

    def set_adapters(self, model: str, names: list[str]) -> None:
        """The LoRA adapters spec.adapters gives `model`: each a model name of its own, routed to
        `model`'s replicas that hold it. Call after set_endpoints, which resets the names."""
        for name in [a for a, m in self.adapters.items() if m == model and a not in names]:
            del self.adapters[name]
            if self.aliases.get(name) == model:
                del self.aliases[name]
        for name in names:
            self.adapters[name] = model
            self.aliases[name] = model

    def adapter(self, name: str) -> str | None:
        """`name` itself when clients ask for a LoRA adapter by it, else None."""
        return name if name in self.adapters else None

    def remove_model(self, model: str) -> None:
        for url in [u for u, e in self.endpoints.items() if e.model == model]:
            del self.endpoints[url]
        if (pool := self.pools.pop(model, None)) is not None:
            pool.update([])  # a request still holding it finds no replica
        for alias in [a for a, m in self.aliases.items() if m == model]:
            del self.aliases[alias]
        for name in [a for a, m in self.adapters.items() if m == model]:
            del self.adapters[name]
        self.meta.pop(model, None)

    def resolve(self, name: str) -> str | None:
        return self.aliases.get(name)

    def set_route(self, model: str, route: RouteSettings) -> None:
        """`model`'s spec.routing, as discovery read it; a model never given one (static
        discovery) routes with the spec's defaults."""
        self.pools.setdefault(model, Pool(model)).set_route(route)

    def pool(self, model: str) -> Pool:
        return self.pools.get(model) or Pool(model)  # removed meanwhile: an empty one

    def for_model(self, model: str) -> list[Endpoint]:
        pool = self.pools.get(model)
        return list(pool.endpoints) if pool is not None else []

    def available(self, model: str, adapter: str | None = None) -> list[Endpoint]:
        pool = self.pools.get(model)
        return pool.available(adapter=adapter) if pool is not None else []

    def models(self) -> list[str]:
        return sorted({e.model for e in self.endpoints.values()} | set(self.aliases.values()))

    def cards(self) -> list[dict[str, Any]]:
        """Model objects for /v1/models, taken from the workers when they have answered."""
        seen: dict[str, dict[str, Any]] = {}
        for e in self.endpoints.values():
            for card in e.cards:
                seen.setdefault(card["id"], card)
        for name, model in self.aliases.items():
            meta = self.meta.get(model, {})
            known = {"max_model_len": meta["max_model_len"]} if meta.get("max_model_len") else {}
            # An adapter is listed with its base as parent, ready once a replica holds it.
            card = ModelCard.of(name, model, created=meta.get("created", 0),
                                ready=bool(self.available(model, self.adapter(name))), **known)
            seen.setdefault(name, card.dump())
        return [seen[k] for k in sorted(seen)]

    def record_success(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0

    def record_failure(self, endpoint: Endpoint) -> bool:
        """Counts a failure; returns True when the endpoint was just ejected. The last available
        replica of a model is never ejected (as Envoy caps ejections with max_ejection_percent):
        when every replica fails, the cause is often the load itself, and ejecting the last one
        turns a slow model into a refused one; health checks still take a dead replica out. The
        same holds per LoRA adapter: a replica is the last one for an adapter only it holds."""
        endpoint.consecutive_failures += 1
        others = any(e is not endpoint and e.adapters >= endpoint.adapters for e in self.available(endpoint.model))
        if endpoint.consecutive_failures >= self.outliers.failures and others:
            endpoint.ejected_until = time.monotonic() + self.outliers.eject_seconds
            endpoint.consecutive_failures = 0
            return True
        return False


def model_card(card: dict[str, Any], model: str) -> dict[str, Any]:
    """Pure: a backend's model object as the gateway lists it, whichever engine sent it."""
    return ModelCard.from_backend(card, model).dump()
