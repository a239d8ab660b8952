"""LoRA adapters (spec.adapters): loaded into each ready worker pod through the engine's API.

The pod template carries only LoRA's start-up flags (on or off, slots, rank: `lora_slots`) and
the volumes adapter sources need, never the adapter list, so adding or removing an adapter
restarts nothing. Instead every reconcile converges each ready pod, as KubeAI's model
controller does: read what the pod holds (its `/v1/models`, where both engines list a loaded
adapter as a card whose `parent` is the base), plan the difference (`plan`, pure), and apply
it with vLLM's `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`, which modelfleet's
worker serves too. A new or restarted pod becomes ready, its Deployment's status changes, and
that reconcile loads the adapters into it. What each pod holds is read back from the pod
every time (not remembered in labels, as KubeAI does), so a restarted pod or operator cannot
leave the record and the pod disagreeing. The gateway reads the same `/v1/models` to route an
adapter's requests only to replicas that hold it.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from modelfleet.api import AdapterStatus, Condition, Lora, ModelDeployment, ModelDeploymentStatus
from modelfleet.sources import parse_model_source

from .conditions import make_condition
from .config import OperatorConfig
from .load import is_ready

log = logging.getLogger(__name__)

ADAPTERS_READY = "AdaptersReady"
VOLUME_PREFIX = "lora-"
# Seconds for one pod's /v1/models, and for one load (an hf:// adapter downloads first).
LIST_TIMEOUT = 5.0
LOAD_TIMEOUT = 120.0
# Seconds after which pods that held every adapter are asked again (see AdapterSync.settled).
RECHECK_SECONDS = 60.0


# -- rendering: what the pod template needs (render.py adds it) -----------------------------------


def lora_slots(md: ModelDeployment) -> tuple[int, int] | None:
    """(max loras, max rank) the pods start with; None while LoRA is off. Never the number of
    adapters: a start-up flag that followed the list would restart the pods at every change."""
    spec = md.spec
    if not spec.lora_enabled:
        return None
    lora = spec.lora or Lora()
    return lora.max_loras, lora.max_lora_rank


def adapter_path(source: str, config: OperatorConfig) -> str:
    """Where a pod finds an adapter, as its lora_path: a pvc:// claim's directory under the
    mount root, file://'s path, or an hf:// repo id (the engine downloads it into HF_HOME)."""
    parsed = parse_model_source(source)
    if parsed.scheme == "pvc":
        return parsed.claim_path(config.pvc_mount_root)
    if parsed.scheme == "hf":
        return parsed.repo
    return parsed.path


def _volume_name(key: str) -> str:
    name = f"{VOLUME_PREFIX}{key}"
    if len(name) <= 63 and all(c.isalnum() or c == "-" for c in key) and key == key.lower():
        return name
    return f"{VOLUME_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _adapter_folder(path: str, reserved: Collection[str]) -> str:
    """The node folder a file:// adapter is mounted by: the folder that holds it, as a claim
    holds pvc:// adapters, so that adapters kept side by side (/adapters/sql, /adapters/poet)
    share one mount and adding another there rolls nothing. An adapter directly under / or
    under a path the pod mounts a volume of its own at (`reserved`: its /tmp) is mounted by
    itself: the node's root is never mounted into a pod, nor a node folder over its own."""
    parent = posixpath.dirname(path.rstrip("/"))
    return path if parent in ("", "/") or parent in reserved else parent


def adapter_volumes(
    md: ModelDeployment, config: OperatorConfig, taken_paths: Sequence[str], reserved_paths: Collection[str] = ()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts the adapters' sources need, besides those already mounted at
    `taken_paths` (the model's own claim or folder) and never at `reserved_paths` (the pod's
    own volumes, such as its /tmp): one read-only mount per pvc:// claim, and with
    --host-path-models one hostPath per folder that holds file:// adapters (`_adapter_folder`).
    Adding an adapter on a claim, or in a folder, not yet mounted changes the pod template (the
    pods roll once); one beside adapters already mounted does not."""
    volumes: dict[str, dict[str, Any]] = {}
    mounts: dict[str, dict[str, Any]] = {}
    for adapter in md.spec.adapters:
        parsed = parse_model_source(adapter.source)
        if parsed.scheme == "pvc":
            path = parsed.mount_path(config.pvc_mount_root)
            source: dict[str, Any] = {"persistentVolumeClaim": {"claimName": parsed.claim, "readOnly": True}}
            name = _volume_name(parsed.claim)
        elif parsed.scheme == "file" and config.host_path_models:
            path = _adapter_folder(parsed.path, reserved_paths)
            source = {"hostPath": {"path": path, "type": "Directory"}}
            name = _volume_name(hashlib.sha256(path.encode()).hexdigest()[:16])
        else:
            continue
        if path in taken_paths or path in mounts:
            continue
        volumes[name] = {"name": name, **source}
        mounts[path] = {"name": name, "mountPath": path, "readOnly": True}
    return ([volumes[k] for k in sorted(volumes)],
            [mounts[k] for k in sorted(mounts, key=lambda p: (mounts[p]["name"], p))])


# -- the plan: pure ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodPlan:
    """What one pod must load (name, path) and unload (name) to hold exactly the adapters asked for.
    An adapter whose source changed is unloaded and loaded again."""

    load: tuple[tuple[str, str], ...] = ()
    unload: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.load or self.unload)


def desired_adapters(md: ModelDeployment, config: OperatorConfig) -> dict[str, str]:
    """spec.adapters as {name: lora_path in the pod}."""
    return {a.name: adapter_path(a.source, config) for a in md.spec.adapters}


def held_adapters(cards: Sequence[Mapping[str, Any]], own_names: Sequence[str]) -> dict[str, str]:
    """The adapters a pod's /v1/models lists, as {name: root}: cards with a parent that are not
    the model's own served name or aliases (modelfleet's worker lists aliases with a parent too)."""
    return {str(c["id"]): str(c.get("root") or "") for c in cards
            if isinstance(c, Mapping) and c.get("parent") and c.get("id") and c["id"] not in own_names}


def plan(desired: Mapping[str, str], held: Mapping[str, str]) -> PodPlan:
    """The loads and unloads that take a pod from `held` to `desired` (both {name: path})."""
    stale = sorted(n for n, root in held.items() if n not in desired or root != desired[n])
    load = tuple((n, desired[n]) for n in sorted(desired) if n not in held or n in stale)
    return PodPlan(load=load, unload=tuple(stale))


def adapters_condition(
    md: ModelDeployment, statuses: Sequence[AdapterStatus], ready_pods: int, old: ModelDeploymentStatus, now: str
) -> Condition:
    """AdaptersReady: True once every adapter is on every ready replica; else why not."""
    generation = md.metadata.generation
    missing = [s for s in statuses if s.ready_replicas < ready_pods]
    if not statuses:
        value = ("True", "NoAdapters", "LoRA is on and no adapter is asked for")
    elif ready_pods == 0:
        value = ("False", "NoReadyReplica", "no ready replica to load the adapters into yet")
    elif not missing:
        value = ("True", "Loaded", f"{len(statuses)} adapter(s) loaded on {ready_pods} ready replica(s)")
    else:
        failed = [s for s in missing if s.message]
        if failed:
            value = ("False", "LoadFailed", "; ".join(f"{s.name}: {s.message}" for s in failed))
        else:
            names = ", ".join(s.name for s in missing)
            value = ("False", "Loading", f"loading {names} on {ready_pods} ready replica(s)")
    return make_condition(ADAPTERS_READY, value, old, now, generation)


def with_adapters(
    status: ModelDeploymentStatus, md: ModelDeployment, statuses: Sequence[AdapterStatus], ready_pods: int, now: str
) -> ModelDeploymentStatus:
    """`status` (as conditions.compute_status made it) with status.adapters and the
    AdaptersReady condition, for a ModelDeployment with LoRA on."""
    conditions = [c for c in status.conditions if c.type != ADAPTERS_READY]
    condition = adapters_condition(md, statuses, ready_pods, md.status, now)
    return status.model_copy(update={"adapters": list(statuses), "conditions": [*conditions, condition]})


# -- the executor: HTTP to each ready pod ----------------------------------------------------------


class PodApi(Protocol):
    """The engine API on one pod (vLLM's shapes); tests fake it."""

    def models(self, url: str) -> list[dict[str, Any]]: ...
    def load(self, url: str, name: str, path: str) -> None: ...
    def unload(self, url: str, name: str) -> None: ...


class AdapterError(Exception):
    """A pod refused or failed a load; the message is the engine's answer."""


class HttpPodApi:
    """PodApi over httpx: one client per call, as load.make_http_probe does."""

    def models(self, url: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{url}/v1/models", timeout=LIST_TIMEOUT)
        resp.raise_for_status()
        data = resp.json().get("data")
        return [c for c in data if isinstance(c, dict)] if isinstance(data, list) else []

    def load(self, url: str, name: str, path: str) -> None:
        self._post(f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload(self, url: str, name: str) -> None:
        self._post(f"{url}/v1/unload_lora_adapter", {"lora_name": name})

    @staticmethod
    def _post(url: str, body: dict[str, str]) -> None:
        resp = httpx.post(url, json=body, timeout=LOAD_TIMEOUT)
        if resp.status_code >= 400:
            raise AdapterError(f"{resp.status_code} {_error_message(resp)}")


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str((body or {}).get("message") or body)[:300] if isinstance(body, dict) else str(body)[:300]


def pod_url(pod: Mapping[str, Any], port: int) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


@dataclass
class AdapterSync:
    """Converges every ready pod of a ModelDeployment on spec.adapters; returns each adapter's
    readiness. A pod that cannot be reached counts for no adapter, and is tried again next time."""

    api: PodApi = field(default_factory=HttpPodApi)
    # A reconcile runs on every child event and resync: once every ready pod was found holding
    # what the spec wants, ask them again only when the spec or the ready pods change (a new
    # pod, a restarted container) or RECHECK_SECONDS have passed (someone else's load/unload).
    clock: Callable[[], float] = time.monotonic
    settled: dict[tuple[str, str], tuple[Hashable, float, list[AdapterStatus]]] = field(default_factory=dict)

    def converge(
        self, md: ModelDeployment, pods: Sequence[Mapping[str, Any]], config: OperatorConfig
    ) -> list[AdapterStatus]:
        key = (md.metadata.namespace or "", md.metadata.name)
        state = (tuple(sorted(desired_adapters(md, config).items())), md.served_name, tuple(md.spec.model.aliases),
                 tuple(sorted(_pod_identity(p) for p in pods if is_ready(p))))
        now = self.clock()
        known = self.settled.get(key)
        if known is not None and known[0] == state and now - known[1] < RECHECK_SECONDS:
            return known[2]
        statuses, complete = self._converge(md, pods, config)
        if complete:
            self.settled[key] = (state, now, statuses)
        else:
            self.settled.pop(key, None)
        return statuses

    def _converge(
        self, md: ModelDeployment, pods: Sequence[Mapping[str, Any]], config: OperatorConfig
    ) -> tuple[list[AdapterStatus], bool]:
        """Each adapter's status, and whether every ready pod was reached and holds them all."""
        desired = desired_adapters(md, config)
        own = [md.served_name, *md.spec.model.aliases]
        counts = dict.fromkeys(desired, 0)
        errors: dict[str, str] = {}
        complete = True
        for pod in pods:
            url = pod_url(pod, config.worker_port)
            if url is None or not is_ready(pod):
                continue
            pod_name = (pod.get("metadata") or {}).get("name", url)
            try:
                held = held_adapters(self.api.models(url), own)
            except (httpx.HTTPError, ValueError) as exc:
                log.info("%s: cannot list adapters of %s: %s", md.metadata.name, pod_name, exc)
                complete = False
                continue
            todo = plan(desired, held)
            for name in todo.unload:
                try:
                    self.api.unload(url, name)
                    held.pop(name, None)
                    log.info("%s: unloaded adapter %s from %s", md.metadata.name, name, pod_name)
                except (httpx.HTTPError, AdapterError) as exc:
                    log.warning("%s: unloading adapter %s from %s: %s", md.metadata.name, name, pod_name, exc)
            for name, path in todo.load:
                if name in held:  # its unload failed: it still serves the old source
                    continue
                try:
                    self.api.load(url, name, path)
                    held[name] = path
                    log.info("%s: loaded adapter %s into %s", md.metadata.name, name, pod_name)
                except (httpx.HTTPError, AdapterError) as exc:
                    errors.setdefault(name, f"pod {pod_name}: {exc}")
                    log.warning("%s: loading adapter %s into %s: %s", md.metadata.name, name, pod_name, exc)
            for name in desired:
                if held.get(name) == desired[name]:
                    counts[name] += 1
            complete = complete and held == desired
        statuses = [AdapterStatus(name=n, ready_replicas=counts[n], message=errors.get(n)) for n in desired]
        return statuses, complete


def _pod_identity(pod: Mapping[str, Any]) -> tuple[str, int]:
    """A pod as far as its adapters go: a restarted container lost what was loaded into it."""
    restarts = sum(c.get("restartCount", 0) for c in (pod.get("status") or {}).get("containerStatuses") or [])
    meta = pod.get("metadata") or {}
    return meta.get("uid") or meta.get("name", ""), restarts


def ready_pod_count(pods: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for p in pods if is_ready(p))

