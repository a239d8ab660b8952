"""Thin kopf handlers: every trigger calls the same reconcile(); errors become retry policy.

Create, update (spec, labels or annotations such as the gateway's demand signal), resume
after a restart, the periodic resync (resync.py), and changes of a worker Deployment all run one level-based
reconcile, so it does not matter which of them fires or how often. Handlers are registered
on a registry passed in (no module-level state), so tests and embedders build their own.

What kopf does and what is added here (docs/operator.md, "kopf and the operator"): kopf runs
the handlers of one object one at a time, but it keys that on (resource, uid), so a
ModelDeployment's own handlers, its Deployment's events (another resource, another uid) and
the resync loop reach reconcile() side by side; and it calls a handler for every event,
however many wait. make_runner serialises the three per ModelDeployment and lets one waiting
run stand for all the triggers behind it. ModelDeployments use on.create/update/resume, whose
diff ignores status, so the echo of our own status write triggers nothing, and whose errors
kopf retries; worker Deployments use on.event, which keeps no kopf state on them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import kopf

from modelfleet import labels
from modelfleet.api import API_VERSION, GROUP, KIND, PLURAL, VERSION

from .adapters import AdapterSync
from .conditions import deployment_facts
from .config import OperatorConfig
from .kube import KubeApi
from .load import LoadProbe
from .metrics import OperatorMetrics
from .reconcile import Applied, Gone, InvalidSpec, Outcome, reconcile
from .resync import Peering, Resync

log = logging.getLogger(__name__)

# HTTP statuses that a later try can fix, and how long to wait before it (seconds).
RETRY_DELAYS = {409: 1.0, 410: 1.0, 429: 5.0, 403: 30.0}
SERVER_ERROR_DELAY = 5.0
NETWORK_DELAY = 5.0


@dataclass(frozen=True)
class Deps:
    """Everything the handlers need, built once by main.py."""

    kube: KubeApi
    config: OperatorConfig
    probe: LoadProbe
    metrics: OperatorMetrics
    clock: Callable[[], datetime]
    adapters: AdapterSync | None = None  # loads spec.adapters into pods (adapters.py); None: off


def classify(exc: BaseException) -> BaseException:
    """Map a reconcile failure to kopf's retry policy.

    InvalidSpec: the user must change the object (status already says so), so no retry until
    the next change or resync. Conflicts, expired resource versions, throttling, API server
    errors and lost connections: retry soon. Forbidden: retry slowly (RBAC may be fixed).
    Anything else is a bug: let kopf log it with its traceback and retry with backoff.
    """
    if isinstance(exc, (kopf.PermanentError, kopf.TemporaryError)):
        return exc
    if isinstance(exc, InvalidSpec):
        return kopf.PermanentError(str(exc))
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        if status in RETRY_DELAYS:
            return kopf.TemporaryError(f"API server answered {status}: {exc}", delay=RETRY_DELAYS[status])
        if status >= 500:
            return kopf.TemporaryError(f"API server error {status}: {exc}", delay=SERVER_ERROR_DELAY)
    if isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith("urllib3"):
        return kopf.TemporaryError(f"cannot reach the API server: {exc}", delay=NETWORK_DELAY)
    return exc


class _Slot:
    """The reconcile lock of one ModelDeployment and whether a run already waits for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting = False
        # deployment_facts() of the Deployment the last reconcile computed status from.
        self.deployment_facts: Hashable | None = None
        # When the last reconcile finished (monotonic seconds), None before the first.
        self.finished: float | None = None
        # Outcome.applied of the last reconcile: what a child event's Deployment is compared to.
        self.applied: Applied | None = None
        # Whether a reconcile of this object has run in this process (finished or not): after
        # one, a body kopf saw earlier may predate what that run wrote.
        self.ran = False


class _Slots:
    """One slot per ModelDeployment: an update (kopf's worker for the ModelDeployment), a child
    event (kopf's worker for its Deployment) and the resync loop may fire together."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def enter(self, uid: str) -> _Slot | None:
        """Claim the right to run next for `uid`; None if another trigger already waits.

        A waiting run has not read the cluster yet, so it will see whatever the newer trigger
        was about: one is enough. Without this, a burst of child events (every status update
        of a new Deployment) queues reconciles that each hold one of kopf's worker threads.
        """
        with self._guard:
            slot = self._slots.setdefault(uid, _Slot())
            if slot.waiting:
                return None
            slot.waiting = True
            return slot

    def started(self, slot: _Slot) -> None:
        with self._guard:
            slot.waiting = False

    def recent(self, uid: str, since: float) -> bool:
        """True if a reconcile of `uid` finished after `since` (monotonic)."""
        with self._guard:
            slot = self._slots.get(uid)
            return slot is not None and slot.finished is not None and slot.finished > since

    def current(self, uid: str, facts: Hashable) -> bool:
        """True if the last reconcile of `uid` computed status from a Deployment like this."""
        with self._guard:
            slot = self._slots.get(uid)
            return slot is not None and slot.deployment_facts == facts

    def forget(self, uid: str) -> None:
        with self._guard:
            slot = self._slots.get(uid)
            if slot is not None and not slot.waiting:
                del self._slots[uid]


def make_runner(
    deps: Deps, monotonic: Callable[[], float] = time.monotonic
) -> Callable[..., Outcome | None]:
    """The one function all triggers call: coalesce, lock, time, reconcile, translate errors.

    `deployment` (child events) is the worker Deployment that changed: if the last reconcile
    computed status from a Deployment with the same facts (the echo of our own apply, or a
    status update that changes nothing status reads), there is nothing to do. The resync
    timer skips an object reconciled within the last half interval for another reason, so
    each object is still reconciled at least every 1.5 intervals, and a burst of new objects
    is not slowed by their first resyncs.

    `fresh` (a create's first try, kopf's body has no status) is honoured only by the first
    reconcile of an object in this process. After a restart, the watch of worker Deployments
    can reconcile an object (writing its status and posting its Events) before kopf hands
    over the create it listed earlier; that body, trusted as stored, would post every
    transition a second time.
    """
    slots = _Slots()
    fresh_for = deps.config.resync_seconds / 2

    def run(
        body: Mapping[str, Any], trigger: str, deployment: Mapping[str, Any] | None = None, fresh: bool = False
    ) -> Outcome | None:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        facts = deployment_facts(deployment) if deployment is not None else None
        if (facts is not None and slots.current(uid, facts)) or (
            trigger == "timer" and slots.recent(uid, monotonic() - fresh_for)
        ):
            deps.metrics.coalesced.labels("modeldeployments", trigger).inc()
            return None
        slot = slots.enter(uid)
        if slot is None:
            deps.metrics.coalesced.labels("modeldeployments", trigger).inc()
            return None
        with slot.lock:
            slots.started(slot)
            if facts is not None and slot.deployment_facts == facts:  # the run we waited for saw it
                deps.metrics.coalesced.labels("modeldeployments", trigger).inc()
                return None
            fresh, slot.ran = fresh and not slot.ran, True
            with deps.metrics.timed(trigger):
                try:
                    outcome = reconcile(body, deps.kube, deps.config, deps.probe, deps.clock(),
                                        child=deployment, applied=slot.applied, fresh=fresh,
                                        adapters=deps.adapters)
                except Gone:
                    slots.forget(uid)
                    return None  # deleted meanwhile: ownerReferences clean up the children
                except Exception as exc:
                    translated = classify(exc)
                    kind = "permanent" if isinstance(translated, kopf.PermanentError) else "temporary"
                    if translated is exc and not isinstance(exc, kopf.TemporaryError):
                        kind = "unexpected"
                    deps.metrics.errors.labels("modeldeployments", kind).inc()
                    if translated is exc:
                        raise
                    raise translated from exc
            slot.deployment_facts, slot.finished = outcome.deployment_facts, monotonic()
            slot.applied = outcome.applied
        if outcome.scale_reason:
            grew = outcome.scaled_from is None or outcome.desired > outcome.scaled_from
            deps.metrics.scaled.labels("up" if grew else "down").inc()
        return outcome

    return run


def owner_stub(child: Mapping[str, Any]) -> dict[str, Any] | None:
    """Name, namespace and uid of the ModelDeployment controlling a child, or None.

    Enough for reconcile(), which reads the owner itself.
    """
    meta = child.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION:
            return {
                "metadata": {
                    "name": ref["name"],
                    "namespace": meta.get("namespace", ""),
                    "uid": ref.get("uid", ""),
                }
            }
    return None


def register(registry: kopf.OperatorRegistry, deps: Deps, peering: Peering | None = None) -> None:
    """Register the handlers on `registry`. `peering` is how the resync loop follows kopf
    peering (standalone when None)."""
    peering = peering or Peering(standalone=True, priority=0, name=None, clusterwide=True)
    run = make_runner(deps)
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.create(*resource, registry=registry, id="reconcile-create")
    def on_create(body: kopf.Body, retry: int, **_: Any) -> None:
        # A first try with no status yet sees the object as stored: no need to read it again
        # (unless another trigger reconciled it first: see make_runner).
        run(body, "create", fresh=retry == 0 and not body.get("status"))

    @kopf.on.update(*resource, registry=registry, id="reconcile-update")
    def on_update(body: kopf.Body, **_: Any) -> None:
        run(body, "update")

    @kopf.on.resume(*resource, registry=registry, id="reconcile-resume")
    def on_resume(body: kopf.Body, **_: Any) -> None:
        run(body, "resume")

    # The periodic resync walks this index (see resync.py for why it is not a kopf timer).
    @kopf.index(*resource, registry=registry, id="modeldeployments")
    def index_model_deployments(name: str, namespace: str, uid: str, **_: Any) -> dict[str, dict[str, Any]]:
        return {uid: {"metadata": {"name": name, "namespace": namespace, "uid": uid}}}

    resync_holder: list[Resync] = []

    @kopf.on.startup(registry=registry, id="start-resync")
    async def start_resync(modeldeployments: kopf.Index, **_: Any) -> None:
        def snapshot() -> list[Mapping[str, Any]]:
            return [stub for store in modeldeployments.values() for stub in store]

        resync = Resync(run, snapshot, deps.config.resync_seconds, deps.kube, peering)
        resync.start()
        resync_holder.append(resync)

    @kopf.on.cleanup(registry=registry, id="stop-resync")
    async def stop_resync(**_: Any) -> None:
        for resync in resync_holder:
            await resync.stop()

    # A worker Deployment changed (pods became ready, or someone deleted it): reconcile its
    # owner now rather than at the next resync. Errors here are only logged by kopf; the
    # timer retries.
    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        registry=registry,
        id="child",
        labels={labels.APP_MANAGED_BY: labels.MANAGED_BY},
    )
    def on_child(body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002 - kopf's name
        owner = owner_stub(body)
        if owner is not None:
            run(owner, "child", deployment=None if type == "DELETED" else body)

    # A weight cache's fill Job changed (started, finished, failed): reconcile the
    # ModelDeployment that started it now, so its replicas start as soon as the cache is
    # filled; the other users of a shared cache see it within a resync (cache.py).
    @kopf.on.event(
        "batch",
        "v1",
        "jobs",
        registry=registry,
        id="cache-fill",
        labels={labels.APP_MANAGED_BY: labels.MANAGED_BY, labels.CACHE: kopf.PRESENT},
    )
    def on_fill(body: kopf.Body, **_: Any) -> None:
        owner = owner_stub(body)
        if owner is not None:
            run(owner, "cache")

    @kopf.on.probe(registry=registry, id="reconciles")
    def probe_reconciles(**_: Any) -> float:
        return sum(
            s.value for m in deps.metrics.reconciles.collect() for s in m.samples if s.name.endswith("_total")
        )
