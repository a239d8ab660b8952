"""The periodic resync: every ModelDeployment is reconciled at least every `resync_seconds`, so
what no watch event announces (worker load for the autoscaler, a demand signal going stale,
a pod stuck pulling) still reaches status and replicas.

Not kopf's @timer: a timer makes kopf put a finalizer on every ModelDeployment, and deleting
one then hangs while no operator runs (kopf's troubleshooting page, "kubectl freezes on object
deletion"). This loop leaves the objects alone. It walks a kopf index of the ModelDeployments
(kept by kopf from its own watch, so it needs no extra list calls), and it stands down when
kopf peering would: while a live peer has a higher priority, or the same one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from .kube import KubeApi

log = logging.getLogger(__name__)
PEERING_API = "kopf.dev/v1"
DEFAULT_PEERING = "default"  # what kopf looks for when no peering is named


def peering_allows(status: Mapping[str, Any] | None, priority: int, now: datetime) -> bool:
    """Pure: kopf's rule for whether the operator with `priority` may act, given a peering
    object's status (peer id -> priority, lastseen, lifetime). Our own entry is among them, so
    one live peer with our priority is us; two mean a tie, which pauses everyone in kopf too."""
    same = 0
    for info in (status or {}).values():
        if not isinstance(info, Mapping):
            continue
        try:
            seen = datetime.fromisoformat(str(info["lastseen"]))
            alive = seen + timedelta(seconds=int(info.get("lifetime", 60))) > now
            peer_priority = int(info.get("priority", 0))
        except (KeyError, TypeError, ValueError):
            continue
        if not alive:
            continue
        if peer_priority > priority:
            return False
        same += peer_priority == priority
    return same <= 1


@dataclass(frozen=True)
class Peering:
    """How this operator takes part in kopf peering; None name means kopf's default lookup."""

    standalone: bool
    priority: int
    name: str | None
    clusterwide: bool

    def allows(self, kube: KubeApi, namespace: str, now: datetime) -> bool:
        if self.standalone:
            return True
        kind = (PEERING_API, "ClusterKopfPeering" if self.clusterwide else "KopfPeering")
        try:
            peering = kube.get(kind, "" if self.clusterwide else namespace, self.name or DEFAULT_PEERING)
        except Exception as exc:  # noqa: BLE001 - no peering CRD: kopf runs standalone then
            log.debug("peering %s unreadable: %s", self.name or DEFAULT_PEERING, exc)
            peering = None
        if peering is None:
            # kopf pauses an operator whose named peering is missing, and runs one standalone
            # when the default peering does not exist.
            return self.name is None
        return peering_allows(peering.get("status"), self.priority, now)


class Resync:
    """Reconciles each indexed ModelDeployment once per interval, on kopf's event loop.

    `snapshot` lists the objects' metadata stubs (read on the loop, as kopf updates the index
    there); each reconcile runs in a worker thread, one at a time, so a resync never competes
    with event-driven reconciles for more than one of kopf's threads.
    """

    def __init__(self, run: Callable[..., Any], snapshot: Callable[[], list[Mapping[str, Any]]],
                 interval: float, kube: KubeApi, peering: Peering,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.run = run
        self.snapshot = snapshot
        self.interval = interval
        self.kube = kube
        self.peering = peering
        self.clock = clock
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.loop(), name="modelfleet-resync")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.round()

    async def round(self) -> int:
        """One pass over the index; returns how many objects it handed to reconcile."""
        allowed: dict[str, bool] = {}
        handed = 0
        for stub in self.snapshot():
            namespace = str((stub.get("metadata") or {}).get("namespace", ""))
            if namespace not in allowed:
                allowed[namespace] = await asyncio.to_thread(self.peering.allows, self.kube, namespace, self.clock())
            if not allowed[namespace]:
                continue
            handed += 1
            name = stub["metadata"].get("name")
            try:
                await asyncio.to_thread(self.run, stub, "timer")
            except kopf.PermanentError as exc:  # an invalid spec: status says so; not worth a warning a round
                log.debug("resync of %s/%s: %s", namespace, name, exc)
            except Exception as exc:  # noqa: BLE001 - the next round retries; events have the details
                log.warning("resync of %s/%s failed: %s", namespace, name, exc)
        return handed
