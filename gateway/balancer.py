"""Pure endpoint choice. One signature for every strategy: (candidates, request view) -> endpoint."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from .registry import Endpoint


class Strategy(Protocol):
    def __call__(self, candidates: Sequence[Endpoint], rng: random.Random) -> Endpoint: ...


def least_load_p2c(candidates: Sequence[Endpoint], rng: random.Random) -> Endpoint:
    """Power of two choices over outstanding requests: near-best balance without every gateway
    replica herding onto the same least-loaded endpoint."""
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(list(candidates), 2)
    if a.load() != b.load():
        return a if a.load() < b.load() else b
    return a if rng.random() < 0.5 else b


STRATEGIES: dict[str, Strategy] = {"least-load": least_load_p2c}
