"""One model's replicas as the proxy uses them: its route settings, its hash ring, and `acquire`.

The settings are `spec.routing`, typed (balancer.RouteSettings) once when discovery reads the
spec (discovery.model_entry), not per request. The ring is rebuilt when the model's endpoint set
changes (Registry.set_endpoints), as KubeAI does, so a request only walks it. `acquire` picks a
replica and counts the request on it; the lease it returns takes the count off again, once,
however often it is released: the one place an endpoint's in-flight count changes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING

from .balancer import DEFAULT_ROUTE, STRATEGIES, RequestView, Ring, RouteSettings, Strategy

if TYPE_CHECKING:
    from .registry import Endpoint
    from .routing import RoutingFields

class Lease:
    """One request counted on one endpoint until `release`, which is idempotent."""

    __slots__ = ("endpoint", "released")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.released = False
        endpoint.inflight += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.endpoint.inflight -= 1


class Pool:
    def __init__(self, model: str) -> None:
        self.model = model
        self.endpoints: list[Endpoint] = []
        self.ring = Ring(())
        self.route = DEFAULT_ROUTE
        self.strategy: Strategy = STRATEGIES[DEFAULT_ROUTE.strategy]

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """The model's endpoints changed (Registry.set_endpoints): a new ring if the set did."""
        urls = [e.url for e in self.endpoints]
        self.endpoints = list(endpoints)
        if sorted(urls) != sorted(e.url for e in self.endpoints):
            self.ring = Ring(self.endpoints)

    def set_route(self, route: RouteSettings) -> None:
        self.route = route
        self.strategy = STRATEGIES[route.strategy]

    def prefix(self, fields: RoutingFields) -> str:
        """The start of the prompt, as long as spec.routing.prefixLength, when the strategy uses
        it; nothing otherwise, so other requests are not scanned for it."""
        return fields.prefix(self.route.prefix_length) if self.route.strategy == "prefix-affinity" else ""

    def available(self, exclude: Container[str] = (), adapter: str | None = None) -> list[Endpoint]:
        """The replicas that can take a request now; for a LoRA adapter, only those holding it."""
        now = time.monotonic()
        return [e for e in self.endpoints if e.available(now) and e.url not in exclude
                and (adapter is None or adapter in e.adapters)]

    def acquire(self, prefix: str, rng: random.Random, exclude: Container[str] = (),
                adapter: str | None = None) -> Lease | None:
        """A lease on the endpoint the strategy picks among the available ones not in `exclude`
        (already tried) and holding `adapter` (if given), or None when there is none."""
        candidates = self.available(exclude, adapter)
        if not candidates:
            return None
        return Lease(self.strategy(candidates, RequestView(prefix, self.route, self.ring), rng))
