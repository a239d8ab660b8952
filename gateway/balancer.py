"""Pure endpoint choice. Every strategy has one signature: (candidates, request view, rng) ->
endpoint, so the proxy never needs to know which one it is calling."""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .registry import Endpoint


@dataclass(frozen=True)
class RequestView:
    """What a strategy may know about the request."""

    prefix: str = ""  # the start of the conversation or prompt, for prefix affinity
    prefix_length: int = 256
    load_factor: float = 1.25


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


def prefix_affinity(candidates: Sequence[Endpoint], view: RequestView, rng: random.Random) -> Endpoint:
    """Consistent hashing with bounded loads (Mirrokni et al., as in KubeAI's CHWBL): requests
    sharing a prefix go to the same replica, whose KV cache already holds it, unless that
    replica carries more than `load_factor` times the average load; then the next one on the
    ring takes it. Replicas joining or leaving move only their share of prefixes."""
    if not view.prefix or len(candidates) == 1:
        return least_load(candidates, view, rng)
    ring = sorted((_hash(f"{e.url}#{i}"), e) for e in candidates for i in range(VNODES))
    keys = [k for k, _ in ring]
    total = sum(e.load() for e in candidates)
    bound = math.ceil(view.load_factor * (total + 1) / len(candidates))  # the +1 is this request
    start = bisect.bisect(keys, _hash(view.prefix[: view.prefix_length]))
    seen: set[str] = set()
    for i in range(len(ring)):
        endpoint = ring[(start + i) % len(ring)][1]
        if endpoint.url in seen:
            continue
        seen.add(endpoint.url)
        if endpoint.load() + 1 <= bound:
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
            u = _hash(view.prefix[: view.prefix_length]) / 2**64 if sticky else rng.random()
            candidates = groups[choose_deployment(weights, u)]
        return strategy(candidates, view, rng)

    return pick


STRATEGIES: dict[str, Strategy] = {"least-load": by_weight(least_load), "prefix-affinity": by_weight(prefix_affinity)}
