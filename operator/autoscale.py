"""Pure autoscaling: in-flight load, demand and memory -> desired replicas.

Up is immediate (a held request is waiting); down waits `scaleDownDelaySeconds` after load
last needed the current size, so a short lull does not throw away a loaded model. The memory
this needs lives in status (AutoscalerStatus), so a restarted operator decides the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from modelfleet.api import AutoscalerStatus, Autoscaling
from modelfleet.labels import Demand

# A demand signal older than the gateway's hold timeout (spec.routing.holdTimeoutSeconds) is
# stale: the gateway re-signals while it still holds requests (docs/operator.md), so an older
# one means they were served or gave up. This default is for callers without a spec.
DEMAND_TTL = timedelta(seconds=60)


@dataclass(frozen=True)
class Observation:
    """What the autoscaler sees at `now`."""

    now: datetime
    # Requests running + waiting, summed over the workers that answered; None when no worker
    # could be asked (none ready, or every scrape failed): then load is unknown, not zero.
    inflight: int | None
    demand: Demand | None = None
    demand_ttl: timedelta = DEMAND_TTL

    @property
    def fresh_demand(self) -> Demand | None:
        """The demand signal if it is recent enough to stand for requests still held."""
        if self.demand is not None and self.now - self.demand.time <= self.demand_ttl:
            return self.demand
        return None


@dataclass(frozen=True)
class Decision:
    """The desired size, the memory to keep, and why (for logs and events)."""

    desired: int
    state: AutoscalerStatus
    reason: str


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with a Z, as Kubernetes writes times."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    """Inverse of format_time; None for absent or malformed values."""
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _elapsed(now: datetime, since: str | None) -> timedelta:
    t = parse_time(since)
    return timedelta.max if t is None else now - t


def recommend(spec: Autoscaling, obs: Observation, current: int) -> int:
    """Replicas the load alone asks for, before delays; `current` when load is unknown."""
    demand = obs.fresh_demand
    target = spec.target_inflight_per_replica
    if obs.inflight is None:
        rec = current
    else:
        rec = math.ceil(obs.inflight / target)
    if demand is not None:
        # Held requests are not in any worker's count yet: add them, and never answer 0.
        rec = max(rec, math.ceil(max(demand.waiting, 1) / target), 1)
    return min(max(rec, spec.min_replicas), spec.max_replicas)


def decide(spec: Autoscaling, state: AutoscalerStatus | None, current: int, obs: Observation) -> Decision:
    """Desired replicas for one ModelDeployment under spec.autoscaling.

    `current` is the size last asked for (status.autoscaler.desiredReplicas, or the
    Deployment's replicas when autoscaling was just turned on).
    """
    now = format_time(obs.now)
    # First decision (autoscaling just turned on): count from now, so a running model is not
    # scaled down before it had scaleDownDelaySeconds to see traffic.
    state = state or AutoscalerStatus(desired_replicas=current, last_active_time=now, last_needed_time=now)
    current_clamped = min(max(current, spec.min_replicas), spec.max_replicas)
    rec = recommend(spec, obs, current_clamped)
    active = bool(obs.inflight) or obs.fresh_demand is not None
    last_active = now if active else state.last_active_time
    last_needed = now if rec >= current_clamped else state.last_needed_time
    delay = timedelta(seconds=spec.scale_down_delay_seconds)

    desired, reason = current_clamped, f"holding at {current_clamped}"
    if current != current_clamped:
        desired, reason = current_clamped, f"{current} is outside [{spec.min_replicas}, {spec.max_replicas}]"
    if rec > current_clamped:
        desired = rec
        reason = f"scale up {current_clamped} -> {rec}: {_load(obs)}"
    elif rec < current_clamped and _elapsed(obs.now, last_needed) >= delay:
        if rec == 0 and _elapsed(obs.now, last_active) < delay:
            rec = 1 if current_clamped >= 1 else 0
        if rec < current_clamped:
            desired = rec
            word = "scale to zero" if rec == 0 else "scale down"
            reason = f"{word} {current_clamped} -> {rec}: {_load(obs)} for {spec.scale_down_delay_seconds}s"
    changed = desired != state.desired_replicas
    new_state = AutoscalerStatus(
        desired_replicas=desired,
        last_active_time=last_active,
        last_needed_time=now if changed else last_needed,
        last_scale_time=now if changed else state.last_scale_time,
    )
    return Decision(desired=desired, state=new_state, reason=reason)


def _load(obs: Observation) -> str:
    parts = ["load unknown" if obs.inflight is None else f"{obs.inflight} in flight"]
    if obs.fresh_demand is not None:
        parts.append(f"{obs.fresh_demand.waiting} waiting at the gateway")
    return ", ".join(parts)
