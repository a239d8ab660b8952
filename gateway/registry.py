"""Which endpoints serve which model, whether each can take traffic, and how busy it is.

Discovery (static or Kubernetes) writes it; the proxy and balancer read it. All access happens on
the gateway's event loop, so no locks are needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


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

    def available(self, now: float | None = None) -> bool:
        return self.ready and (now or time.monotonic()) >= self.ejected_until

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
        self.outliers = outliers or OutlierPolicy()

    def set_endpoints(self, model: str, urls: list[str], names: list[str] | None = None) -> None:
        """Replaces the endpoint set of `model`, keeping counters of endpoints that stay."""
        keep = {u for u in urls}
        for url in [u for u, e in self.endpoints.items() if e.model == model and u not in keep]:
            del self.endpoints[url]
        for url in urls:
            self.endpoints.setdefault(url, Endpoint(url=url, model=model))
        for name in names or [model]:
            self.aliases[name] = model
        self.aliases.setdefault(model, model)

    def resolve(self, name: str) -> str | None:
        return self.aliases.get(name)

    def for_model(self, model: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.model == model]

    def available(self, model: str) -> list[Endpoint]:
        now = time.monotonic()
        return [e for e in self.for_model(model) if e.available(now)]

    def models(self) -> list[str]:
        return sorted({e.model for e in self.endpoints.values()} | set(self.aliases.values()))

    def cards(self) -> list[dict[str, Any]]:
        """Model objects for /v1/models, taken from the workers when they have answered."""
        seen: dict[str, dict[str, Any]] = {}
        for e in self.endpoints.values():
            for card in e.cards:
                seen.setdefault(card["id"], card)
        for name, model in self.aliases.items():
            seen.setdefault(name, {"id": name, "object": "model", "created": 0, "owned_by": "modelfleet",
                                   "root": model, "parent": None})
        return [seen[k] for k in sorted(seen)]

    def record_success(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0

    def record_failure(self, endpoint: Endpoint) -> bool:
        """Counts a failure; returns True when the endpoint was just ejected."""
        endpoint.consecutive_failures += 1
        if endpoint.consecutive_failures >= self.outliers.failures:
            endpoint.ejected_until = time.monotonic() + self.outliers.eject_seconds
            endpoint.consecutive_failures = 0
            return True
        return False
