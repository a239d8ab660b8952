"""One level-based reconcile of one ModelDeployment: the function every kopf handler calls.

Reads the cluster, decides the size, applies the rendered children, writes status from what
the cluster then says, and posts Events for transitions. Idempotent: a second run with
nothing changed applies identical objects (server-side apply makes that a no-op) and writes
no status. All I/O goes through the KubeApi and LoadProbe passed in, so tests use fakes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from modelfleet import labels
from modelfleet.api import (
    AutoscalerStatus,
    ModelDeployment,
    ModelDeploymentStatus,
    NameClaim,
    ObjectMeta,
    created_seconds,
    settle_names,
)

from .adapters import AdapterSync, ready_pod_count, with_adapters
from .autoscale import Observation, decide, format_time
from .cache import serving_model, sync_cache, with_cache
from .conditions import (
    NAME_CONFLICT,
    StatusEvent,
    compute_status,
    deployment_facts,
    make_condition,
    name_conflict,
    transition_events,
)
from .config import OperatorConfig
from .inference_pool import render_inference_pool
from .kube import DEPLOYMENT, EVENT, MODEL_DEPLOYMENT, PDB, POD, KubeApi
from .load import LoadProbe, is_ready
from .render import render_deployment, render_pdb, render_service

log = logging.getLogger(__name__)

# A demand signal counts for at least this long even when the gateway holds requests for less
# (holdTimeoutSeconds 0): it must survive until the next resync sees it.
MIN_DEMAND_TTL_SECONDS = 30
# Answers to an apply that status reports as ApplyFailed: 500 is what server-side apply
# returns for a body it cannot merge. 502-504 (an API server restarting, a timeout) and the
# codes handlers.RETRY_DELAYS lists are only retried: they say nothing about the object.
APPLY_REFUSALS = frozenset({500})


class InvalidSpec(Exception):
    """The object cannot be rendered or was rejected by the API server: the user must fix it.

    Retrying does not help (kopf.PermanentError); the next change or resync tries again.
    """


class ApplyFailed(Exception):
    """The API server refused a rendered child with an error that names no field (server-side
    apply answers 500 for a body it cannot merge, such as a duplicate env name).

    It may be transient (an API server in trouble), so kopf retries it; meanwhile status and
    a Warning Event say why. `status` keeps the HTTP status for handlers.classify.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Gone(Exception):
    """The ModelDeployment was deleted before this reconcile ran; nothing to do."""


@dataclass(frozen=True)
class Outcome:
    """What one reconcile did, for logs, metrics and tests."""

    desired: int
    status: ModelDeploymentStatus
    status_written: bool
    events: list[StatusEvent] = field(default_factory=list)
    scale_reason: str | None = None
    scaled_from: int | None = None
    # deployment_facts() of the Deployment this status was computed from: a Deployment event
    # with the same facts brings nothing new (see handlers.make_runner).
    deployment_facts: Hashable | None = None
    # (ModelDeployment generation, Deployment generation) once the children match the spec.
    applied: Applied | None = None


# The ModelDeployment's generation and its Deployment's generation right after an apply.
Applied = tuple[int, int]


def _applied(md: ModelDeployment, deployment: Mapping[str, Any] | None) -> Applied:
    generation = int(((deployment or {}).get("metadata") or {}).get("generation") or 0)
    return md.metadata.generation or 0, generation


def _error_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _status_patch(old: ModelDeploymentStatus, new: ModelDeploymentStatus) -> dict[str, Any]:
    """The merge patch from old to new: fields new no longer has are nulled out."""
    patch = new.to_wire()
    for key in old.to_wire():
        patch.setdefault(key, None)
    return patch


def desired_replicas(
    md: ModelDeployment,
    deployment: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    probe: LoadProbe,
    now: datetime,
) -> tuple[int, AutoscalerStatus | None, str | None, int]:
    """spec.replicas, or the autoscaler's decision with its new memory, why it moved (None if
    it did not) and the size it moved from."""
    auto = md.spec.autoscaling
    if auto is None:
        return md.spec.replicas, None, None, md.spec.replicas
    previous = md.status.autoscaler
    if previous is not None:
        current = previous.desired_replicas
    elif deployment is not None:
        current = int((deployment.get("spec") or {}).get("replicas") or 0)
    else:
        current = auto.min_replicas
    ready = [p for p in pods if is_ready(p)]
    # Nothing running and nothing asked for: load is known to be zero, not unknown.
    inflight = probe(ready) if ready else (0 if current == 0 else None)
    demand = labels.parse_demand(md.metadata.annotations.get(labels.DEMAND))
    ttl = timedelta(seconds=max(md.spec.routing.hold_timeout_seconds, MIN_DEMAND_TTL_SECONDS))
    decision = decide(auto, previous, current, Observation(now, inflight, demand, ttl))
    moved = decision.desired != current
    return decision.desired, decision.state, decision.reason if moved else None, current


def _may_have_pdb(md: ModelDeployment) -> bool:
    """Whether an earlier reconcile could have left a PDB: only one that asked for 2 or more
    replicas. Status records that; before status is first written, only an object whose spec
    changed since creation, or that autoscales, could have had an earlier reconcile ask for 2.
    Skipping the DELETE otherwise saves a call per create and per resync."""
    if md.status.observed_generation is not None:
        return md.status.desired_replicas >= 2
    return md.metadata.generation != 1 or md.spec.autoscaling is not None or md.spec.replicas >= 2


def _apply_children(
    md: ModelDeployment, replicas: int, kube: KubeApi, config: OperatorConfig
) -> dict[str, Any]:
    kind = "Deployment"
    try:
        # The Deployment first: its pods take longest to become ready, so they start one call sooner.
        deployment = kube.apply(render_deployment(md, replicas, config))
        kind = "Service"
        kube.apply(render_service(md, config))
        kind = "PodDisruptionBudget"
        pdb = render_pdb(md, replicas)
        if pdb is not None:
            kube.apply(pdb)
        elif _may_have_pdb(md):
            kube.delete(PDB, md.metadata.namespace, md.metadata.name)
        # Only with the setting on; a pool left from before it was turned off stays until its
        # ModelDeployment goes (owner reference), as no call is spent per resync to look for it.
        pool = render_inference_pool(md, config)
        if pool is not None:
            kind = "InferencePool"
            kube.apply(pool)
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from exc
    except Exception as exc:
        code = getattr(exc, "status", None)
        if code in (400, 422):
            raise InvalidSpec(f"the API server rejected a worker object: {_api_message(exc)}") from exc
        if code in APPLY_REFUSALS:
            raise ApplyFailed(f"the API server refused the worker {kind}: {_api_message(exc)}", code) from exc
        raise
    return deployment


def _api_message(exc: Exception) -> str:
    """The human part of an API error (its Status.message), falling back to str()."""
    body = getattr(exc, "body", None)
    if isinstance(body, (bytes, str)):
        try:
            return str(json.loads(body).get("message") or body)
        except ValueError:
            return str(body)
    return str(exc)


def report_invalid(body: Mapping[str, Any], message: str, kube: KubeApi, now: datetime) -> None:
    """Put an InvalidSpec failure into status and an Event, keeping what status there was.

    Written only when it changes, so a resync of a still-invalid object is silent.
    """
    meta = ObjectMeta.model_validate(dict(body.get("metadata") or {}))
    try:
        old = ModelDeploymentStatus.model_validate(dict(body.get("status") or {}))
    except ValidationError:
        old = ModelDeploymentStatus()
    stamp, gen = format_time(now), meta.generation
    conditions = [c for c in old.conditions if c.type not in ("Ready", "Degraded")]
    conditions += [
        make_condition("Ready", ("False", "InvalidSpec", message), old, stamp, gen),
        make_condition("Degraded", ("True", "InvalidSpec", message), old, stamp, gen),
    ]
    new = old.model_copy(update={"phase": "Failed", "observed_generation": gen, "conditions": conditions})
    if new.to_wire() != old.to_wire():
        kube.patch_status(meta, _status_patch(old, new))
        ready = old.condition("Ready")
        if ready is None or ready.reason != "InvalidSpec" or ready.message != message:
            kube.post_event(meta, StatusEvent("Warning", "InvalidSpec", message))


def report_apply_failed(
    md: ModelDeployment, desired: int, message: str, kube: KubeApi, now: datetime
) -> None:
    """Status (Ready=False, reason ApplyFailed, the API server's message) and a Warning Event
    for a refused apply, with counts from what does run. Without this the object kept an
    empty status while kopf retried and only its log said why.

    Written only when it changes, and the Event only on a transition, so the retries of a
    still-refused object are silent.
    """
    ns, name = md.metadata.namespace, md.metadata.name
    selector = labels.selector_string(labels.selector_labels(name))
    deployment = kube.get(DEPLOYMENT, ns, name)
    pods = kube.list(POD, ns, label_selector=selector) if deployment is not None else []
    # The autoscaler's memory stays as stored: its new decision was not applied, and the
    # retry decides again.
    status = compute_status(md, desired, deployment, pods, [], selector, format_time(now),
                            apply_error=message, autoscaler=md.status.autoscaler)
    if status.to_wire() != md.status.to_wire():
        kube.patch_status(md.metadata, _status_patch(md.status, status))
    for event in transition_events(md.status, status):
        kube.post_event(md.metadata, event)


def _claim(obj: Mapping[str, Any]) -> NameClaim | None:
    """The names one listed ModelDeployment claims; None for one the gateway would ignore too."""
    try:
        md = ModelDeployment.from_body(obj)
    except ValidationError:
        return None
    return NameClaim.of(md, created_seconds((obj.get("metadata") or {}).get("creationTimestamp")))


def check_names(md: ModelDeployment, body: Mapping[str, Any], kube: KubeApi) -> str | None:
    """NameConflict's message when an older ModelDeployment of the namespace holds one of this
    one's names (see modelfleet.api.settle_names, which the gateway routes by), else None.

    One namespaced list per reconcile that applies: the price of saying so in status instead
    of only in the gateway's log. Names are checked within the namespace; across namespaces
    the gateway settles them the same way but only its log says so."""
    mine = NameClaim.of(md, created_seconds((body.get("metadata") or {}).get("creationTimestamp")))
    claims = [c for obj in kube.list(MODEL_DEPLOYMENT, md.metadata.namespace)
              if (c := _claim(obj)) is not None and c.key != mine.key]
    holder = settle_names([*claims, mine]).get(mine.key)
    return name_conflict(md, holder) if holder is not None else None


def _previous_conflict(md: ModelDeployment) -> str | None:
    """The NameConflict status keeps while only the Deployment changed (no list call then);
    the next apply or resync checks again."""
    ready = md.status.condition("Ready")
    return ready.message if ready is not None and ready.reason == NAME_CONFLICT else None


def reconcile(
    body: Mapping[str, Any],
    kube: KubeApi,
    config: OperatorConfig,
    probe: LoadProbe,
    now: datetime,
    child: Mapping[str, Any] | None = None,
    applied: Applied | None = None,
    fresh: bool = False,
    adapters: AdapterSync | None = None,
) -> Outcome:
    """Bring one ModelDeployment's children and status in line with its spec and the cluster.

    `body` may be stale (kopf hands over the last object its watch saw, possibly from before
    our previous status write), so the object is read again first: transitions and the
    autoscaler's memory must start from the status actually stored.

    `child` is the worker Deployment whose event triggered this run, and `applied` what the
    last reconcile left (see Outcome.applied). If neither the ModelDeployment's spec nor the
    Deployment's has changed since, the children are as rendered and only status is
    recomputed: this spares two server-side applies for every status update the Deployment
    controller makes, which in a burst of new objects is most of the API server's work for
    them. A Deployment edited by hand has a new generation, so drift is still applied away.

    `fresh` says `body` is already what is stored (the first try of a create, before any
    status): the re-read is skipped, so the Deployment exists one call sooner.

    `adapters` loads spec.adapters into the ready pods (operator/adapters.py) when LoRA is on.
    """
    meta = body.get("metadata") or {}
    stored = body if fresh else kube.get(MODEL_DEPLOYMENT, str(meta.get("namespace", "")), str(meta.get("name", "")))
    if stored is None:
        raise Gone(f"{meta.get('namespace')}/{meta.get('name')} no longer exists")
    if (stored.get("metadata") or {}).get("deletionTimestamp"):
        # Being deleted: the garbage collector removes the children, and in a terminating
        # namespace every write would be refused (403) and retried until kopf lets it go.
        raise Gone(f"{meta.get('namespace')}/{meta.get('name')} is being deleted")
    body = stored
    try:
        md = ModelDeployment.from_body(body)
    except ValidationError as exc:
        message = f"invalid spec: {_error_summary(exc)}"
        report_invalid(body, message, kube, now)
        raise InvalidSpec(message) from exc
    ns, name = md.metadata.namespace, md.metadata.name
    selector = labels.selector_string(labels.selector_labels(name))

    # Only the autoscaler needs the Deployment and pods before the apply (current size, load);
    # status uses what the apply returns.
    autoscaled = md.spec.autoscaling is not None
    deployment = kube.get(DEPLOYMENT, ns, name) if autoscaled else None
    pods = kube.list(POD, ns, label_selector=selector) if autoscaled else None
    desired, autoscaler, scale_reason, previous = desired_replicas(md, deployment, pods or [], probe, now)
    if scale_reason:
        log.info("%s/%s: %s", ns, name, scale_reason)
    # The weight cache (cache.py): until it is filled the Deployment runs no replica, and once
    # it is, the replicas load the cached directory instead of the source.
    try:
        cache = sync_cache(md, kube, config, format_time(now))
    except Exception as exc:
        if getattr(exc, "status", None) not in (400, 422):
            raise
        message = f"the API server rejected the weight cache's claim or fill Job: {_api_message(exc)}"
        report_invalid(body, message, kube, now)
        raise InvalidSpec(message) from exc
    replicas = desired if cache is None or cache.ready else 0
    if (child is not None and not autoscaled and applied == _applied(md, child)
            and (cache is None or int((child.get("spec") or {}).get("replicas") or 0) == replicas)):
        deployment = dict(child)
        conflict = _previous_conflict(md)
    else:
        try:
            deployment = _apply_children(serving_model(md, cache.ref) if cache else md, replicas, kube, config)
        except InvalidSpec as exc:
            report_invalid(body, str(exc), kube, now)
            raise
        except ApplyFailed as exc:
            report_apply_failed(md, desired, str(exc), kube, now)
            raise
        # After the apply, so that a new object's pods start one call sooner.
        conflict = check_names(md, body, kube)
    if pods is None:
        # A Deployment at zero that had no pods when last seen has none to list: this saves a
        # call per create and per resync of every scaled-to-zero model.
        had_pods = md.status.replicas > 0 or int(((deployment.get("status") or {}).get("replicas")) or 0) > 0
        pods = kube.list(POD, ns, label_selector=selector) if replicas > 0 or had_pods else []

    # Pod warnings (volume mounts) explain pods stuck before their container starts; only
    # worth a list call while some pod is not ready.
    events: list[dict[str, Any]] = []
    if any(not is_ready(p) for p in pods):
        events = kube.list(EVENT, ns, field_selector="involvedObject.kind=Pod,type=Warning")
    status = compute_status(md, desired, deployment, pods, events, selector, format_time(now),
                            conflict=conflict, autoscaler=autoscaler)
    if adapters is not None and md.spec.lora_enabled:
        status = with_adapters(status, md, adapters.converge(md, pods, config), ready_pod_count(pods), format_time(now))
    status = with_cache(status, cache, md.status, format_time(now), md.metadata.generation)
    written = status.to_wire() != md.status.to_wire()
    if written:
        kube.patch_status(md.metadata, _status_patch(md.status, status))
    transitions = transition_events(md.status, status)
    if scale_reason:
        transitions.append(StatusEvent("Normal", "Scaled", scale_reason))
    for event in transitions:
        kube.post_event(md.metadata, event)
    return Outcome(
        desired, status, written, transitions, scale_reason, previous if scale_reason else None,
        deployment_facts(deployment), _applied(md, deployment),
    )
