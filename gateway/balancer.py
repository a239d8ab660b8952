"""Pure endpoint choice. Every strategy has one signature: (candidates, request view, rng) ->
endpoint, so the proxy never needs to know which one it is calling."""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from modelfleet.api import Routing

if TYPE_CHECKING:
    from .registry import Endpoint


@dataclass(frozen=True)
class RouteSettings:
    """A model's `spec.routing`, as the balancer uses it. Built once when discovery reports the
    spec (pool.py), not per request; its defaults are the spec's own (`modelfleet.api.Routing`),
    so a model without a ModelDeployment (static discovery) routes as one that sets nothing."""

    strategy: str
    prefix_length: int  # characters of the prompt that prefix affinity hashes (up to the CRD's 65536)
    load_factor: float  # bounded load: at most this times the average load per replica

    @classmethod
    def of(cls, routing: Routing) -> RouteSettings:
        return cls(routing.strategy, routing.prefix_length, routing.load_factor)


DEFAULT_ROUTE = RouteSettings.of(Routing())


@dataclass(frozen=True)
class RequestView:
    """What a strategy may know about the request."""

    prefix: str = ""  # the start of the conversation or prompt, for prefix affinity
    route: RouteSettings = DEFAULT_ROUTE
    ring: Ring | None = None  # the model's hash ring (pool.py keeps it); None: built from the candidates


class Strategy(Protocol):
    def __call__(self, candidates: Sequence[Endpoint], view: RequestView, rng: random.Random) -> Endpoint: ...


def least_load(candidates: Sequence[Endpoint], view: RequestView, rng: random.Random) -> Endpoint:
    """Power of two choices over outstanding requests: near-best balance without every gateway
    replica herding onto the same least-loaded endpoint."""
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(list(candidates), 2)
    if a.load() != b.load():
        return a if a.load() < b.load() else b
    return a if rng.random() < 0.5 else b


VNODES = 64


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    """A consistent-hash ring: VNODES points per endpoint, sorted once. The pool rebuilds it when
    its endpoint set changes (as KubeAI does), so a request only bisects and walks it."""

    __slots__ = ("keys", "points")

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        ring = sorted((_hash(f"{e.url}#{i}"), e.url, e) for e in endpoints for i in range(VNODES))
        self.keys = [k for k, _, _ in ring]
        self.points = [e for _, _, e in ring]

    def walk(self, key: int) -> Iterator[Endpoint]:
        """Each endpoint once, clockwise from `key`."""
        start, n = bisect.bisect(self.keys, key), len(self.points)
        seen: set[str] = set()
        for i in range(n):
            endpoint = self.points[(start + i) % n]
            if endpoint.url not in seen:
                seen.add(endpoint.url)
                yield endpoint


def prefix_affinity(candidates: Sequence[Endpoint], view: RequestView, rng: random.Random) -> Endpoint:
    """Consistent hashing with bounded loads (Mirrokni et al., as in KubeAI's CHWBL): requests
    sharing a prefix go to the same replica, whose KV cache already holds it, unless that
    replica carries more than `load_factor` times the average load; then the next one on the
    ring takes it. Replicas joining or leaving move only their share of prefixes. The ring may
    hold more endpoints than `candidates` (not ready, already tried): those are stepped over,
    which picks what a ring of the candidates alone would."""
    if not view.prefix or len(candidates) == 1:
        return least_load(candidates, view, rng)
    route = view.route
    ring = view.ring if view.ring is not None else Ring(candidates)
    allowed = {e.url: e for e in candidates}
    total = sum(e.load() for e in candidates)
    bound = math.ceil(route.load_factor * (total + 1) / len(candidates))  # the +1 is this request
    for point in ring.walk(_hash(view.prefix[: route.prefix_length])):
        endpoint = allowed.get(point.url)
        if endpoint is not None and endpoint.load() + 1 <= bound:
            return endpoint
    return least_load(candidates, view, rng)


def choose_deployment(weights: Mapping[str, int], u: float) -> str:
    """Pure: the ModelDeployment that takes a request, in proportion to its weight, from a
    uniform `u` in [0, 1). Weights are relative (5 and 95: 5%); weight-0 ones are chosen only
    when every one is 0 (they then share evenly), so a canary at 0 takes over only while the
    weighted ones have no ready replica."""
    names = sorted(weights)
    total = sum(weights[n] for n in names)
    if total <= 0:
        return names[min(int(u * len(names)), len(names) - 1)]
    point = u * total
    for name in names:
        point -= weights[name]
        if point < 0 and weights[name] > 0:
            return name
    return next(n for n in reversed(names) if weights[n] > 0)


def by_weight(strategy: Strategy) -> Strategy:
    """`strategy` within one ModelDeployment, chosen first by weight when the candidates belong
    to several (a canary and a stable version serving one name). Only deployments with an
    available candidate take part, so a version with no ready replica gives its share to the
    others. Under prefix affinity the choice follows the prompt's hash, so a conversation
    stays on one version."""

    def pick(candidates: Sequence[Endpoint], view: RequestView, rng: random.Random) -> Endpoint:
        groups: dict[str, list[Endpoint]] = {}
        for endpoint in candidates:
            groups.setdefault(endpoint.deployment, []).append(endpoint)
        if len(groups) > 1:
            weights = {name: group[0].weight or 0 for name, group in groups.items()}
            sticky = strategy is prefix_affinity and view.prefix
            u = _hash(view.prefix[: view.route.prefix_length]) / 2**64 if sticky else rng.random()
            candidates = groups[choose_deployment(weights, u)]
        return strategy(candidates, view, rng)

    return pick


STRATEGIES: dict[str, Strategy] = {"least-load": by_weight(least_load), "prefix-affinity": by_weight(prefix_affinity)}
