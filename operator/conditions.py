"""Pure status computation: what the cluster says -> phase, counts and conditions.

Status is taken from the Deployment and the worker Pods as they are, never from what the
operator last asked for: a pod the scheduler cannot place, an image that does not pull or a
model that crashes while loading each show up as a reason and a message the user can act on.
No I/O; `handlers.py` gathers the facts and `kube.py` writes the result.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelfleet.api import (
    AutoscalerStatus,
    Condition,
    ModelDeployment,
    ModelDeploymentStatus,
    NameClaim,
    Phase,
)

# Waiting reasons that no amount of waiting fixes: the user must change something.
IMAGE_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
# Pod warning events that explain a pod stuck before its container starts.
EVENT_REASONS = frozenset({"FailedMount", "FailedAttachVolume", "FailedCreatePodSandBox"})
MAX_MESSAGE = 512


@dataclass(frozen=True)
class Problem:
    """Why one pod (or the Deployment) is not serving. `severity` orders which one is shown."""

    reason: str
    message: str
    severity: int  # 3: broken (user must act), 2: blocked (waits for capacity/volume), 0: busy
    hard: bool  # True: counts as Degraded/Failed; False: progress that will finish by itself


@dataclass(frozen=True)
class StatusEvent:
    """A Kubernetes Event to post for a status transition."""

    type: str  # Normal | Warning
    reason: str
    message: str


def _get(obj: Mapping[str, Any] | None, *path: str, default: Any = None) -> Any:
    cur: Any = obj
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return default
        cur = cur[key]
    return cur


def last_line(text: str | None) -> str:
    """The last non-empty line: where a traceback or a worker's one-line error says why."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= MAX_MESSAGE else "..." + line[-MAX_MESSAGE:]


# A log line that says what went wrong; the noise that libraries print after it does not.
ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b|\berror\b", re.IGNORECASE)
AFTER_ERROR_NOISE = ("[type=", "For further information", "Traceback", "File ")


def error_line(text: str | None) -> str:
    """The last line of a crashed container's log that names an error (vLLM ends its log with
    pydantic's link to its docs, after the line that says why), else the last line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for line in reversed(lines):
        if ERROR_LINE.search(line) and not line.startswith(AFTER_ERROR_NOISE):
            return last_line(line)
    return last_line(text)


def _killed(term: Mapping[str, Any]) -> str | None:
    """Why a container ended by a signal (exit code 128+n) whose log names no error, or None.

    Its log then ends wherever it was, often a line from long after the model loaded: shown as
    "failed to load" it would send the user after a problem that never was.
    """
    code = term.get("exitCode")
    if not isinstance(code, int) or code <= 128 or term.get("reason") == "OOMKilled":
        return None
    if any(ERROR_LINE.search(ln) for ln in (term.get("message") or "").splitlines()):
        return None
    return f"the worker was killed by signal {code - 128} (exit code {code})"


def _crash_problem(md: ModelDeployment, status: Mapping[str, Any]) -> Problem:
    term = _get(status, "lastState", "terminated") or _get(status, "state", "terminated") or {}
    killed = _killed(term)
    if killed is not None and _get(status, "state", "running") is not None:
        # Killed once (a node agent, an operator's kill -9) and running again: it restarts by
        # itself. A container killed again and again waits in CrashLoopBackOff instead.
        return Problem("Restarted", f"{killed}; it is starting again", 1, True)
    why = killed or error_line(term.get("message"))
    exit_reason = term.get("reason") or "Error"
    if exit_reason == "OOMKilled":
        limit = md.spec.resources.memory
        hint = f" (spec.resources.memory is {limit})" if limit is not None else " (set spec.resources.memory)"
        why = why or f"the worker ran out of memory loading the model{hint}"
    if not why:
        why = f"the worker exited with code {term.get('exitCode', '?')} ({exit_reason})"
    return Problem("CrashLoopBackOff", f"the model failed to load: {why}", 3, True)


def _container_problem(md: ModelDeployment, status: Mapping[str, Any]) -> Problem | None:
    waiting = _get(status, "state", "waiting") or {}
    reason = waiting.get("reason", "")
    if reason == "CrashLoopBackOff":
        return _crash_problem(md, status)
    if reason in IMAGE_REASONS:
        msg = waiting.get("message") or f"cannot pull image {status.get('image', '')}"
        return Problem(reason, f"{last_line(msg)}; check spec.engine.image", 3, True)
    if reason in CONFIG_REASONS:
        return Problem(reason, last_line(waiting.get("message")) or reason, 3, True)
    terminated = _get(status, "state", "terminated")
    if terminated and terminated.get("exitCode", 0) != 0:
        return _crash_problem(md, status)
    if _get(status, "state", "running") is not None and not status.get("ready", False):
        # Restarted after a failure: between back-offs the container runs again, and the
        # last failure is still the best explanation of why the model is not ready.
        last = _get(status, "lastState", "terminated")
        if last and last.get("exitCode", 0) != 0:
            return _crash_problem(md, status)
        return Problem("Loading", "loading the model", 0, False)
    if reason in ("ContainerCreating", "PodInitializing"):
        return Problem("ContainerCreating", "starting the worker container", 0, False)
    if reason:
        return Problem(reason, last_line(waiting.get("message")) or reason, 0, False)
    return None


def _gpu_hint(md: ModelDeployment) -> str:
    res = md.spec.resources
    return f" (each replica asks for {res.gpu} {res.gpu_resource})" if res.gpu else ""


def diagnose_pod(
    md: ModelDeployment, pod: Mapping[str, Any], events: Sequence[Mapping[str, Any]] = ()
) -> Problem | None:
    """The worst thing about one worker pod, or None when it serves."""
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return Problem(
            status.get("reason") or "PodFailed", last_line(status.get("message")) or "pod failed", 1, True
        )
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            msg = last_line(cond.get("message")) or "no node fits the pod"
            return Problem(cond.get("reason") or "Unschedulable", msg + _gpu_hint(md), 2, True)
    problems = [p for cs in status.get("containerStatuses") or [] if (p := _container_problem(md, cs))]
    if any(p.hard for p in problems):
        return max(problems, key=lambda p: p.severity)
    # A pod stuck before its container starts says why only in its events (volume mounts).
    name = _get(pod, "metadata", "name")
    for ev in events:
        if ev.get("type") == "Warning" and ev.get("reason") in EVENT_REASONS:
            if _get(ev, "involvedObject", "name") == name:
                return Problem(ev["reason"], last_line(ev.get("message")), 2, True)
    if problems:
        return max(problems, key=lambda p: p.severity)
    if status.get("phase") == "Running":
        return None  # running and every container ready
    return Problem("ContainerCreating", "starting the worker container", 0, False)


def diagnose_deployment(deployment: Mapping[str, Any]) -> Problem | None:
    """Deployment-level trouble: pods that cannot be created, or a rollout past its deadline."""
    for cond in _get(deployment, "status", "conditions", default=[]) or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return Problem(cond.get("reason") or "FailedCreate", last_line(cond.get("message")), 3, True)
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return Problem("ProgressDeadlineExceeded", last_line(cond.get("message")), 3, True)
    return None


def _is_terminating(pod: Mapping[str, Any]) -> bool:
    return _get(pod, "metadata", "deletionTimestamp") is not None


def worst_problem(
    md: ModelDeployment,
    deployment: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
) -> Problem | None:
    """The problem to headline: the most severe, hard before soft."""
    found = [p for p in [diagnose_deployment(deployment)] if p]
    found += [p for pod in pods if not _is_terminating(pod) and (p := diagnose_pod(md, pod, events))]
    if not found:
        return None
    return max(found, key=lambda p: (p.hard, p.severity))


@dataclass(frozen=True)
class _Counts:
    replicas: int
    ready: int
    updated: int
    rollout_seen: bool


def deployment_facts(deployment: Mapping[str, Any] | None) -> tuple[_Counts, Problem | None]:
    """Everything compute_status reads from a Deployment: two Deployments with equal facts
    give the same status (for the same pods), so an event that changes none is no news."""
    return _counts(deployment), diagnose_deployment(deployment) if deployment is not None else None


def _counts(deployment: Mapping[str, Any] | None) -> _Counts:
    status = (deployment or {}).get("status") or {}
    generation = _get(deployment, "metadata", "generation", default=0)
    return _Counts(
        replicas=int(status.get("replicas") or 0),
        ready=int(status.get("readyReplicas") or 0),
        updated=int(status.get("updatedReplicas") or 0),
        rollout_seen=int(status.get("observedGeneration") or 0) >= int(generation or 0),
    )


def _phase(desired: int, c: _Counts, problem: Problem | None, has_deployment: bool) -> Phase:
    if desired == 0 or not has_deployment:
        return "Pending"
    if c.ready >= 1:
        return "Degraded" if problem and problem.hard else "Ready"
    if problem and problem.severity >= 3:
        return "Failed"
    if problem and problem.reason == "Loading":
        return "Loading"
    return "Pending"


def _ready(desired: int, c: _Counts, problem: Problem | None, has_deployment: bool) -> tuple[str, str, str]:
    if not has_deployment:
        return "False", "Creating", "creating the worker Deployment"
    if desired == 0:
        if c.replicas:
            return "False", "ScalingDown", f"scaling to zero; {c.replicas} replica(s) still stopping"
        return "False", "ScaledToZero", "scaled to zero; requests through the gateway bring it back"
    counts = f"{c.ready}/{desired} replicas ready"
    if c.ready >= 1:
        if problem and problem.hard:
            return "True", "PartiallyReady", f"{counts}; {problem.reason}: {problem.message}"
        return "True", "ReplicasReady", counts
    if problem:
        return "False", problem.reason, problem.message
    return "False", "Pending", f"{counts}; waiting for worker pods"


def _progressing(
    desired: int, c: _Counts, problem: Problem | None, has_deployment: bool
) -> tuple[str, str, str]:
    if not has_deployment:
        return "True", "Creating", "creating the worker Deployment"
    if problem and problem.reason == "ProgressDeadlineExceeded":
        return "False", problem.reason, problem.message
    if not c.rollout_seen:
        return "True", "RollingUpdate", "waiting for the Deployment controller to see the new spec"
    if c.updated < c.replicas:
        return "True", "RollingUpdate", f"{c.updated}/{desired} replicas updated"
    if c.replicas > desired:
        return "True", "ScalingDown", f"{c.replicas} -> {desired} replicas"
    if c.ready < desired or c.replicas < desired:
        return "True", "ScalingUp", f"{c.ready}/{desired} replicas ready"
    return "False", "RolloutComplete", f"{desired} replicas up to date"


def _degraded(problem: Problem | None, desired: int) -> tuple[str, str, str]:
    if desired > 0 and problem and problem.hard:
        return "True", problem.reason, problem.message
    return "False", "AsExpected", "no replica reports a problem"


def apply_failed(message: str, c: _Counts) -> tuple[tuple[str, str, str], tuple[str, str, str],
                                                   tuple[str, str, str], Phase]:
    """Ready, Progressing, Degraded and phase when the API server refuses a rendered child.

    Ready is False whatever still runs: the spec the user wrote is not what is deployed, and
    only they can fix it. Replicas of an earlier spec that still serve make the phase
    Degraded (the gateway keeps routing to them); with none the phase is Failed, which the
    gateway turns into a fast 503 carrying this message instead of holding requests.
    """
    value = ("False", "ApplyFailed", last_line(message))
    phase: Phase = "Degraded" if c.ready >= 1 else "Failed"
    return value, value, ("True", "ApplyFailed", value[2]), phase


NAME_CONFLICT = "NameConflict"


def name_conflict(md: ModelDeployment, holder: NameClaim) -> str:
    """What a ModelDeployment refused a name (modelfleet.api.settle_names) says: who holds it and
    the two ways out."""
    adapters = [a.name for a in md.spec.adapters]
    names = sorted(holder.names & frozenset((md.served_name, *md.spec.model.aliases, *adapters)))
    way = ("set spec.routing.weight on both to split its traffic between them, or "
           if holder.served == md.served_name else "")
    return (f"the model name {', '.join(names)} is already served by ModelDeployment {holder.namespace}/"
            f"{holder.name}, which the gateway keeps routing to; {way}choose another spec.model.servedName "
            f"or spec.model.aliases{' or spec.adapters name' if adapters else ''}")


def make_condition(
    type_: str, value: tuple[str, str, str], previous: ModelDeploymentStatus, now: str, generation: int
) -> Condition:
    """Build one condition, keeping lastTransitionTime while status (True/False) is unchanged."""
    status, reason, message = value
    old = previous.condition(type_)
    since = old.last_transition_time if old is not None and old.status == status else now
    return Condition(
        type=type_,  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )


def compute_status(
    md: ModelDeployment,
    desired: int,
    deployment: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    selector: str,
    now: str,
    apply_error: str | None = None,
    conflict: str | None = None,
    autoscaler: AutoscalerStatus | None = None,
) -> ModelDeploymentStatus:
    """The whole status from cluster facts; `md.status` supplies the previous conditions.

    `apply_error` is the API server's refusal of a rendered child (see apply_failed): the
    counts still describe the Deployment and pods that exist, but the spec is not applied.
    `conflict` (name_conflict) says another ModelDeployment holds this one's name: its pods may
    run, but no request reaches them, so it is not Ready and the phase is Failed until the
    user renames it, weights both, or the holder goes.
    `autoscaler` is the autoscaler's memory, placed as given: reconcile.py decides it (the new
    decision, or the stored one when that decision was not applied), nothing here reads it.
    """
    has_deployment = deployment is not None
    c = _counts(deployment)
    problem = worst_problem(md, deployment or {}, pods, events) if has_deployment else None
    previous = md.status
    generation = md.metadata.generation
    ready = _ready(desired, c, problem, has_deployment)
    progressing = _progressing(desired, c, problem, has_deployment)
    degraded = _degraded(problem, desired)
    phase = _phase(desired, c, problem, has_deployment)
    if apply_error is not None:
        ready, progressing, degraded, phase = apply_failed(apply_error, c)
    elif conflict is not None:
        ready = ("False", NAME_CONFLICT, conflict)
        degraded = ("True", NAME_CONFLICT, conflict)
        phase = "Failed"
    conditions = [
        make_condition("Ready", ready, previous, now, generation),
        make_condition("Progressing", progressing, previous, now, generation),
        make_condition("Degraded", degraded, previous, now, generation),
    ]
    return ModelDeploymentStatus(
        phase=phase,
        replicas=c.replicas,
        ready_replicas=c.ready,
        updated_replicas=c.updated,
        desired_replicas=desired,
        observed_generation=generation,
        selector=selector,
        served_name=md.served_name,
        conditions=conditions,
        autoscaler=autoscaler,
    )


def transition_events(old: ModelDeploymentStatus, new: ModelDeploymentStatus) -> list[StatusEvent]:
    """Events for what changed: the phase, or the reason the model is (not) ready.

    Keyed on reasons, not messages, so a message that only changes its counts does not post
    a new Event every resync.
    """
    old_ready, new_ready = old.condition("Ready"), new.condition("Ready")
    changed_phase = old.phase != new.phase
    changed_reason = new_ready is not None and (
        old_ready is None or (old_ready.status, old_ready.reason) != (new_ready.status, new_ready.reason)
    )
    if not (changed_phase or changed_reason) or new_ready is None:
        return []
    degraded = new.condition("Degraded")
    warn = new.phase in ("Failed", "Degraded") or (degraded is not None and degraded.status == "True")
    message = new_ready.message
    if changed_phase:
        message = f"phase {old.phase or 'None'} -> {new.phase}: {message}"
    return [StatusEvent("Warning" if warn else "Normal", new_ready.reason, message)]
