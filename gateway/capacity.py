"""How many requests a model may have in flight through this gateway, and each key's share.

A burst far beyond what the replicas can serve must not queue without bound in the workers
(where it ends in client timeouts): past `per_replica` requests in flight per available
replica, the gateway answers 503 with Retry-After at once. Under contention, API keys share the
capacity fairly: once a model is at least half full, a key may hold at most an equal share of
its capacity, capacity / max(2, keys with requests in flight), so one heavy client cannot crowd
out the others and a newcomer always finds room; beyond its share a key gets 429 with
Retry-After and can try again as its own requests finish. Without keys (an open gateway)
there is one tenant and no shares.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from modelfleet.protocol import OpenAIError, unavailable

CONTENTION = 0.5  # fraction of capacity from which fair shares apply


@dataclass(frozen=True)
class Verdict:
    """Pure: whether one more request of `key` may go to the model, and if not, why."""

    admitted: bool
    status: int = 200
    message: str = ""


def judge(model_inflight: int, key_inflight: int, active_keys: int, capacity: int, shared: bool = True) -> Verdict:
    """Pure admission rule; `active_keys` counts keys with requests in flight, this one included;
    `shared` is False for an open gateway's anonymous requests."""
    if model_inflight >= capacity:
        return Verdict(False, 503, "all replicas are at capacity")
    if shared and model_inflight >= CONTENTION * capacity:
        share = math.ceil(capacity / max(2, active_keys))
        if key_inflight >= share:
            return Verdict(False, 429, f"this key already has its fair share ({share}) of the model's capacity "
                                       "in flight")
    return Verdict(True)


@dataclass
class Capacity:
    """In-flight requests per model and per key; `acquire` hands out the release."""

    per_replica: int = 256
    inflight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_key: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def acquire(self, model: str, key: str, replicas: int) -> Callable[[], None]:
        """Counts one request in, or raises 503/429 with Retry-After; call the result once done."""
        keys = self.by_key[model]
        active = len(keys) + (0 if keys.get(key) else 1)
        verdict = judge(self.inflight[model], keys.get(key, 0), active, self.per_replica * max(1, replicas),
                        shared=bool(key))
        if not verdict.admitted:
            if verdict.status == 503:
                raise unavailable(f"Model `{model}`: {verdict.message}; retry shortly.", retry_after=1)
            raise OpenAIError(f"Model `{model}` is busy and {verdict.message}; retry shortly.", status=429,
                              type="requests", code="rate_limit_exceeded", headers={"retry-after": "1"})
        self.inflight[model] += 1
        keys[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.inflight[model] -= 1
            keys[key] -= 1
            if not keys[key]:
                del keys[key]

        return release
