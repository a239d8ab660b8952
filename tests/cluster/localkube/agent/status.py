"""Pure: the facts the pod worker knows -> the pod's status as the API server expects it
(phase, conditions, IPs, container statuses), following the kubelet's rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .container import Terminated, now


class ContainerFacts(Protocol):
    name: str
    image: str
    restart_count: int
    started_at: str | None
    waiting: tuple[str, str] | None
    terminated: Terminated | None
    last: Terminated | None
    runs: int

    @property
    def running(self) -> bool: ...
    @property
    def ready(self) -> bool: ...
    @property
    def started(self) -> bool: ...
    @property
    def never_started(self) -> bool: ...


@dataclass(frozen=True)
class PodFacts:
    pod_ip: str | None
    host_ip: str
    start_time: str
    sandbox_ready: bool
    init_done: bool
    init_failed: bool
    message: str | None = None


def container_status(c: ContainerFacts, pod_uid: str) -> dict:
    # Every state key is always present, null when unused: the status is a strategic merge
    # patch, and a stale `waiting` next to a new `running` would be invalid.
    state: dict = {"waiting": None, "running": None, "terminated": None}
    if c.running:
        state["running"] = {"startedAt": c.started_at}
    elif c.terminated is not None:
        state["terminated"] = c.terminated.as_api()
    else:
        reason, message = c.waiting or ("ContainerCreating", "")
        state["waiting"] = {"reason": reason, **({"message": message} if message else {})}
    out = {
        "name": c.name,
        "image": c.image,
        "imageID": f"localkube://{c.image}",
        "ready": c.ready,
        "started": c.started,
        "restartCount": c.restart_count,
        "state": state,
        "lastState": {"waiting": None, "running": None,
                      "terminated": c.last.as_api() if c.last else None},
    }
    if c.runs:
        out["containerID"] = f"localkube://{pod_uid}/{c.name}/{c.runs}"
    return out


def phase(policy: str, facts: PodFacts, containers: list[ContainerFacts]) -> str:
    if facts.init_failed:
        return "Failed"
    if not facts.init_done or any(c.never_started and c.terminated is None for c in containers):
        return "Pending"
    if containers and all(c.terminated is not None for c in containers):
        return "Succeeded" if all(c.terminated.exit_code == 0 for c in containers if c.terminated) else "Failed"
    return "Running"


def _condition(kind: str, ok: bool, prev: dict[str, dict], reason: str | None = None) -> dict:
    status = "True" if ok else "False"
    old = prev.get(kind)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now()
    return {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": since,
            "reason": None if ok else reason, "message": None}


def pod_status(pod: dict, facts: PodFacts, init: list[ContainerFacts], containers: list[ContainerFacts]) -> dict:
    """The full status we own. PodScheduled is the scheduler's and is left as it is."""
    uid = pod["metadata"]["uid"]
    prev = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    p = phase(pod["spec"].get("restartPolicy", "Always"), facts, containers)
    all_ready = bool(containers) and all(c.ready for c in containers)
    gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
    gates_ok = all(prev.get(g, {}).get("status") == "True" for g in gates)
    done = p in ("Succeeded", "Failed")
    conditions = [
        _condition("PodReadyToStartContainers", facts.sandbox_ready and not done, prev),
        _condition("Initialized", facts.init_done, prev, "ContainersNotInitialized"),
        _condition("ContainersReady", all_ready and not done, prev, "ContainersNotReady"),
        _condition("Ready", all_ready and gates_ok and not done, prev, "ContainersNotReady"),
    ]
    status: dict = {
        "phase": p,
        "conditions": conditions,
        "hostIP": facts.host_ip,
        "hostIPs": [{"ip": facts.host_ip}],
        "startTime": facts.start_time,
        "containerStatuses": [container_status(c, uid) for c in containers],
    }
    if init:
        status["initContainerStatuses"] = [container_status(c, uid) for c in init]
    if facts.pod_ip:
        status["podIP"] = facts.pod_ip
        status["podIPs"] = [{"ip": facts.pod_ip}]
    if facts.message:
        status["message"] = facts.message
    return status
