"""The weight cache (`spec.model.cache`): a claim filled once by a Job, mounted read-only by the
replicas, shared by the ModelDeployments of one source (docs/operator.md, "Weight cache").

Identity: one claim per (source, storage class) in the ModelDeployment's namespace, named by a
digest of both, so every ModelDeployment of that source finds the same one; or the user's own
claim, with each source in its own directory. The model sits in `models/<digest of the source>`
inside the claim either way.

Lifetime without finalizers: every ModelDeployment using an operator-made claim is one of its
owners (non-controller references), so the garbage collector deletes the claim once the last of
them is gone, whether or not the operator runs; `keep: true` strips the references instead. The
fill Job is owned by the ModelDeployment that started it (its pods by the Job), so deleting
that one deletes the Job and its pods, and another user starts a new Job that resumes the
fill. Nothing here can wait on the operator: KubeAI's cache Jobs hung behind a finalizer when
their storage class did not exist (kubeai#286); here such a claim and its Pending pod just go
with their owners.

Readiness is recorded on the claim (the CACHE_FILLED annotation, per model directory) when
the Job succeeds, then the Job is deleted with its pods, so a finished pod never pins the claim
(pvc-protection) and every user of the claim, present or future, sees it filled with one GET.
Replicas are not started until then: the worker Deployment is applied at zero replicas while
the cache fills, so no pod holds a GPU waiting for a download, and status says why.

Pure rendering and status (cache_ref, render_claim, render_fill_job, serving_model,
with_cache) beside the one function that talks to the cluster (sync_cache), through KubeApi.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelfleet import labels
from modelfleet.api import CacheStatus, ModelDeployment, ModelDeploymentStatus
from modelfleet.worker.fetch import UNFETCHABLE_EXIT, Progress, parse_progress

from .conditions import NAME_CONFLICT, error_line, last_line, make_condition
from .config import OperatorConfig
from .kube import JOB, POD, PVC, KubeApi
from .render import WORKER_UID, owner_reference, pod_scheduling, worker_model_arg, worker_security_context

log = logging.getLogger(__name__)

CLAIM_PREFIX = "modelfleet-cache-"
JOB_PREFIX = "modelfleet-fill-"
MODELS_DIR = "models"
DIGEST_CHARS = 12
FILL_CONTAINER = "fetch"
FILL_MOUNT = "/cache"  # where the fill pod mounts the claim
CACHE_VOLUME = "cache"
TMP_VOLUME = "tmp"
SOURCE_VOLUME = "source"
DEFAULT_ACCESS_MODE = "ReadWriteOnce"
# A failed fill Job stays this long (its error in status), then the operator starts a new one:
# a retry every ten minutes, or at once when the user deletes the Job. A succeeded one is
# deleted by the operator at once; the TTL only covers an operator that is down then.
JOB_TTL_SECONDS = 600
FILL_BACKOFF_LIMIT = 2
LOG_TAIL_LINES = 20
CACHE_READY = "CacheReady"
FILLING = "CacheFilling"
FILL_FAILED = "CacheFillFailed"
FILLED = "CacheFilled"
# Ready reasons that say more than the cache's state and keep their place in status.
OUTRANKS_CACHE = frozenset({NAME_CONFLICT, "ApplyFailed", "InvalidSpec"})


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:DIGEST_CHARS]


@dataclass(frozen=True)
class CacheRef:
    """Where one ModelDeployment's weights are cached: the claim, the model's directory in it,
    the digest that labels and names the claim (when the operator makes it) and the fill Job."""

    claim: str
    directory: str
    digest: str
    owned: bool  # the operator makes the claim, shares it and lets it go with its last user
    keep: bool

    @property
    def job(self) -> str:
        return JOB_PREFIX + self.digest

    @property
    def filled_key(self) -> str:
        """The claim's annotation that records this directory as filled."""
        return labels.CACHE_FILLED + self.directory.rpartition("/")[2]

    @property
    def source(self) -> str:
        """The cached model as a pvc:// source: what the replicas load instead."""
        return f"pvc://{self.claim}/{self.directory}"


def cache_ref(md: ModelDeployment) -> CacheRef | None:
    """The cache of this ModelDeployment, or None without spec.model.cache."""
    cache = md.spec.model.cache
    if cache is None:
        return None
    source = md.spec.model.source
    directory = f"{MODELS_DIR}/{_digest(source)}"
    if cache.claim_name is not None:
        return CacheRef(cache.claim_name, directory, _digest(cache.claim_name, source), owned=False, keep=True)
    digest = _digest(source, cache.storage_class_name or "")
    return CacheRef(CLAIM_PREFIX + digest, directory, digest, owned=True, keep=cache.keep)


def cache_labels(digest: str) -> dict[str, str]:
    """Labels of a cache claim, its fill Job and the Job's pods (never the worker's selector
    label, so the Service and status never count a fill pod as a replica)."""
    return {
        labels.CACHE: digest,
        labels.APP_NAME: "modelfleet-cache",
        labels.APP_COMPONENT: labels.COMPONENT_CACHE,
        labels.APP_PART_OF: labels.PART_OF,
        labels.APP_MANAGED_BY: labels.MANAGED_BY,
    }


def render_claim(md: ModelDeployment, ref: CacheRef) -> dict[str, Any]:
    """The claim the operator makes for an operator-made cache. Without owner references: each
    user adds its own afterwards (_join), the first one too, since two first users applying
    theirs at once under one field manager would leave only the last one's."""
    cache = md.spec.model.cache
    assert cache is not None and ref.owned
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode or DEFAULT_ACCESS_MODE],
        "resources": {"requests": {"storage": str(cache.size)}},
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    meta: dict[str, Any] = {
        "name": ref.claim,
        "namespace": md.metadata.namespace,
        "labels": cache_labels(ref.digest) | ({labels.CACHE_KEEP: "true"} if ref.keep else {}),
        "annotations": {labels.CACHE_SOURCE: md.spec.model.source},
    }
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def _fill_env(md: ModelDeployment, config: OperatorConfig) -> list[dict[str, Any]]:
    """The user's variables (spec.engine.env, then spec.podTemplate's: HF_ENDPOINT, proxies),
    the operator's --worker-env, then what the fill needs, each name once (first wins)."""
    spec = md.spec
    env = [e.to_wire() for e in spec.engine.env]
    if spec.pod_template is not None:
        env += [e.to_wire() for e in spec.pod_template.spec.env]
    env += [{"name": name, "value": value} for name, value in config.worker_env]
    token = spec.model.token_secret_ref
    if token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    env.append({"name": "HF_HOME", "value": "/tmp/hf"})  # the hub client's own files, not the cache's
    first: dict[str, dict[str, Any]] = {}
    for entry in env:
        first.setdefault(entry["name"], entry)
    return list(first.values())


def fill_scheduling(md: ModelDeployment) -> dict[str, Any]:
    """The replicas' scheduling (render.pod_scheduling) for the fill pod: a ReadWriteOnce claim
    binds on the fill's node, and where only some nodes may run the workload, the fill must run
    there too. Of the affinity only the node affinity: pod (anti-)affinity places replicas
    against pods (each other, most often), terms a fill pod, with other labels and running before
    any replica, might never meet, which would leave the fill, and so the replicas, Pending."""
    fields = pod_scheduling(md)
    node_affinity = (fields.pop("affinity", None) or {}).get("nodeAffinity")
    if node_affinity:
        fields["affinity"] = {"nodeAffinity": node_affinity}
    return fields


def render_fill_job(md: ModelDeployment, ref: CacheRef, config: OperatorConfig) -> dict[str, Any]:
    """The Job that runs `modelfleet fetch SOURCE /cache/<directory>` once, in the worker image,
    owned by this ModelDeployment, on the nodes the replicas may use (fill_scheduling).
    Restricted like the worker (non-root, read-only root); fsGroup makes a fresh volume
    writable for it."""
    spec = md.spec
    image = spec.engine.image if spec.engine.kind == "modelfleet" and spec.engine.image else config.default_image
    volumes: list[dict[str, Any]] = [
        {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": ref.claim}},
        {"name": TMP_VOLUME, "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": CACHE_VOLUME, "mountPath": FILL_MOUNT},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    source = worker_model_arg(spec.model.source, config)  # file:// from the node with --host-path-models
    if source.volume is not None and source.mount is not None:
        volumes.append({**source.volume, "name": SOURCE_VOLUME})
        mounts.append({**source.mount, "name": SOURCE_VOLUME})
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"fsGroup": WORKER_UID},
        **fill_scheduling(md),
        "containers": [{
            "name": FILL_CONTAINER,
            "image": image,
            "imagePullPolicy": spec.engine.image_pull_policy or config.default_image_pull_policy,
            "command": ["modelfleet", "fetch", spec.model.source, f"{FILL_MOUNT}/{ref.directory}"],
            "env": _fill_env(md, config),
            "volumeMounts": mounts,
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
            # Its last line (the error) becomes the pod's termination message, which status shows.
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": worker_security_context(),
        }],
        "volumes": volumes,
    }  # fmt: skip
    pod = {k: v for k, v in pod.items() if v not in ([], {})}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": ref.job,
            "namespace": md.metadata.namespace,
            "labels": cache_labels(ref.digest),
            "annotations": {labels.CACHE_SOURCE: spec.model.source},
            "ownerReferences": [owner_reference(md, controller=True)],
        },
        "spec": {
            "backoffLimit": FILL_BACKOFF_LIMIT,
            # A source no retry can fetch (`modelfleet fetch` says so by its exit status) fails
            # the Job at once; the Job's retries are for what may pass (network, disk, the hub).
            "podFailurePolicy": {"rules": [{
                "action": "FailJob",
                "onExitCodes": {"containerName": FILL_CONTAINER, "operator": "In", "values": [UNFETCHABLE_EXIT]},
            }]},
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": cache_labels(ref.digest)}, "spec": pod},
        },
    }


def serving_model(md: ModelDeployment, ref: CacheRef) -> ModelDeployment:
    """The ModelDeployment as the worker Deployment is rendered from it: the cached directory
    as a pvc:// source (mounted read-only under --pvc-mount-root, so both engines get a local
    path for their --model), and no download cache."""
    model = md.spec.model.model_copy(update={"source": ref.source, "cache": None})
    return md.model_copy(update={"spec": md.spec.model_copy(update={"model": model})})


# --- what the cluster says -------------------------------------------------------------------


@dataclass(frozen=True)
class CacheState:
    """One reconcile's view of the cache: filled, failing (with the fill's error), or on its way
    (with progress, or why the fill pod does not run yet)."""

    ref: CacheRef
    ready: bool = False
    progress: Progress | None = None
    error: str | None = None
    job_failed: bool = False  # the error is the fill Job's (retried), not a missing claim
    waiting: str | None = None


def filled_bytes(claim: Mapping[str, Any], ref: CacheRef) -> int | None:
    """Bytes recorded for this directory on the claim, or None when it is not filled."""
    value = ((claim.get("metadata") or {}).get("annotations") or {}).get(ref.filled_key)
    if not value:
        return None
    try:
        return int(json.loads(value).get("bytes", 0))
    except (ValueError, TypeError, AttributeError):
        return 0  # filled, size unreadable: the record is the claim's, not ours to doubt


def _condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term
    return {}


def fill_error(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> str:
    """Why a failed fill Job failed: the last failed pod's last error line (`modelfleet fetch`
    prints its failure as one line), else the Job's own condition message."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""))
    for pod in reversed(failed):
        line = error_line(_terminated(pod).get("message"))
        if line:
            return line
    cond = _condition(job, "Failed") or {}
    return last_line(cond.get("message")) or cond.get("reason") or "the fill Job failed"


def pod_waiting(pod: Mapping[str, Any]) -> str | None:
    """Why a fill pod does not run yet (unschedulable, an unbound claim, an image), or None."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return last_line(cond.get("message")) or "no node fits the fill pod"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] != "ContainerCreating":
            return f"{waiting['reason']}: {last_line(waiting.get('message'))}".rstrip(": ")
    return None


def sync_cache(md: ModelDeployment, kube: KubeApi, config: OperatorConfig, now: str) -> CacheState | None:
    """Make the cache exist, join it, start or follow its fill, and say where it stands; and let
    go of a cache this ModelDeployment no longer uses. None without spec.model.cache.

    A few calls per reconcile while filling (claim, Job, its pods, a log tail); one GET once
    filled. Never raises for a fill that fails: that is the user's news, in status."""
    ref = cache_ref(md)
    previous = md.status.cache
    if previous is not None and (ref is None or previous.claim_name != ref.claim):
        release(md, previous.claim_name, kube)
    if ref is None:
        return None
    ns = md.metadata.namespace
    claim = kube.get(PVC, ns, ref.claim)
    if claim is None and not ref.owned:
        return CacheState(ref, error=f"the claim {ref.claim} (spec.model.cache.claimName) does not exist in {ns}")
    if claim is None:
        claim = kube.apply(render_claim(md, ref))
    elif (claim.get("metadata") or {}).get("deletionTimestamp"):
        return CacheState(ref, waiting=f"the claim {ref.claim} is being deleted; a new one is made once it is gone "
                                       "(replicas are stopped so that it can go)")
    if ref.owned:
        _join(md, ref, claim, kube)
    size = filled_bytes(claim, ref)
    if size is not None:
        return CacheState(ref, ready=True, progress=Progress(size, size))
    job = kube.get(JOB, ns, ref.job)
    if job is None:
        kube.apply(render_fill_job(md, ref, config))
        return CacheState(ref, waiting="starting the fill Job")
    pods = kube.list(POD, ns, label_selector=f"{labels.CACHE}={ref.digest}")
    pods = [p for p in pods if _owned_by(p, job)]
    if _condition(job, "Complete") or int((job.get("status") or {}).get("succeeded") or 0) > 0:
        done = _progress(kube, ns, [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"])
        size = done.bytes if done is not None else 0
        record = json.dumps({"bytes": size, "time": now}, separators=(",", ":"))
        kube.patch(PVC, ns, ref.claim, {"metadata": {"annotations": {ref.filled_key: record}}})
        # Its finished pod would otherwise pin the claim (pvc-protection) until the Job's TTL;
        # Background so that the pods go too (a Job's own default is to orphan them).
        kube.delete(JOB, ns, ref.job, propagation="Background")
        return CacheState(ref, ready=True, progress=Progress(size, size))
    if _condition(job, "Failed"):
        return CacheState(ref, error=fill_error(job, pods), job_failed=True)
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        return CacheState(ref, progress=_progress(kube, ns, running))
    waiting = next((w for p in pods if (w := pod_waiting(p))), None)
    return CacheState(ref, progress=_progress(kube, ns, pods) if pods else None,
                      waiting=f"the fill pod waits: {waiting}" if waiting else "waiting for the fill pod to start")


def _owned_by(pod: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    uid = (job.get("metadata") or {}).get("uid")
    return any(r.get("uid") == uid for r in (pod.get("metadata") or {}).get("ownerReferences") or []) or not uid


def _progress(kube: KubeApi, ns: str, pods: Sequence[Mapping[str, Any]]) -> Progress | None:
    """The last progress line of the newest of these pods' logs (None before the first)."""
    newest = sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""))
    for pod in reversed(newest):
        try:
            text = kube.pod_log(ns, pod["metadata"]["name"], FILL_CONTAINER, LOG_TAIL_LINES)
        except Exception as exc:  # noqa: BLE001 - progress is a courtesy; status still says filling
            log.debug("no log from fill pod %s/%s: %s", ns, pod["metadata"]["name"], exc)
            continue
        progress = parse_progress(text)
        if progress is not None:
            return progress
    return None


def _join(md: ModelDeployment, ref: CacheRef, claim: Mapping[str, Any], kube: KubeApi) -> None:
    """Become one of the claim's owners (a strategic merge patch merges ownerReferences by uid,
    so concurrent joiners do not overwrite each other); or, with keep, strip every owner so the
    garbage collector never deletes it, and mark it kept so later users do not add theirs."""
    meta = claim.get("metadata") or {}
    kept = (meta.get("labels") or {}).get(labels.CACHE_KEEP) == "true"
    refs = meta.get("ownerReferences") or []
    ns = md.metadata.namespace
    if ref.keep and (not kept or refs):
        kube.patch(PVC, ns, ref.claim, {"metadata": {"labels": {labels.CACHE_KEEP: "true"}, "ownerReferences": None}})
    elif not kept and not any(r.get("uid") == md.metadata.uid for r in refs):
        kube.patch(PVC, ns, ref.claim, {"metadata": {"ownerReferences": [owner_reference(md, controller=False)]}},
                   strategic=True)


def release(md: ModelDeployment, claim_name: str, kube: KubeApi) -> None:
    """Stop using an operator-made claim (the source or the cache setting changed): drop this
    ModelDeployment's owner reference, or delete the claim when it was the last owner, as the
    garbage collector would once it is deleted. Claims of the user's are left alone."""
    ns, uid = md.metadata.namespace, md.metadata.uid
    claim = kube.get(PVC, ns, claim_name)
    meta = (claim or {}).get("metadata") or {}
    digest = (meta.get("labels") or {}).get(labels.CACHE)
    refs = meta.get("ownerReferences") or []
    if claim is None or not digest or not any(r.get("uid") == uid for r in refs):
        return
    if len(refs) == 1:  # the last user: a fill still running is for nobody now
        kube.delete(JOB, ns, JOB_PREFIX + digest, propagation="Background")
        kube.delete(PVC, ns, claim_name)
    else:
        kube.patch(PVC, ns, claim_name, {"metadata": {"ownerReferences": [{"$patch": "delete", "uid": uid}]}},
                   strategic=True)


# --- status ----------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def progress_text(progress: Progress | None) -> str:
    if progress is None:
        return "no progress reported yet"
    if progress.total is None:
        return f"{human_bytes(progress.bytes)} so far"
    return f"{human_bytes(progress.bytes)} of {human_bytes(progress.total)} ({progress.percent}%)"


def cache_status(state: CacheState) -> CacheStatus:
    p = state.progress
    return CacheStatus(claim_name=state.ref.claim, path=state.ref.directory,
                       bytes=p.bytes if p else None, total_bytes=p.total if p else None,
                       percent=p.percent if p else None)  # fmt: skip


def cache_verdict(state: CacheState) -> tuple[str, str, str]:
    """The CacheReady condition's status, reason and message."""
    claim = state.ref.claim
    if state.ready:
        size = state.progress.bytes if state.progress else 0
        return "True", FILLED, f"the claim {claim} holds the model ({human_bytes(size)})"
    if state.error is not None:
        retry = (f"; the operator retries when the Job {state.ref.job} is gone (it expires "
                 f"{JOB_TTL_SECONDS // 60} minutes after failing; delete it to retry now)") if state.job_failed else ""
        return "False", FILL_FAILED, f"filling the weight cache failed: {state.error}{retry}"
    detail = progress_text(state.progress)
    if state.waiting:
        detail = f"{state.waiting}; {detail}" if state.progress else state.waiting
    return "False", FILLING, f"filling the weight cache {claim}: {detail}"


def with_cache(
    status: ModelDeploymentStatus, state: CacheState | None, previous: ModelDeploymentStatus, now: str, generation: int
) -> ModelDeploymentStatus:
    """Status with the cache's part: status.cache, the CacheReady condition, and while the cache
    is not ready, Ready (False, CacheFilling or CacheFillFailed), Progressing and Degraded to
    match, since no replica runs then (a name conflict or a refused apply keeps its Ready)."""
    if state is None:
        return status
    value = cache_verdict(state)
    conditions = [c for c in status.conditions if c.type != CACHE_READY]
    update: dict[str, Any] = {"cache": cache_status(state)}
    ready = status.condition("Ready")
    if not state.ready and (ready is None or ready.reason not in OUTRANKS_CACHE):
        failed = state.error is not None
        overrides = {
            "Ready": ("False", value[1], value[2]),
            "Progressing": ("False", value[1], value[2]) if failed else ("True", value[1], value[2]),
            "Degraded": ("True", value[1], value[2]) if failed else ("False", "AsExpected", "no replica reports a problem"),
        }  # fmt: skip
        conditions = [make_condition(c.type, overrides[c.type], previous, now, generation) if c.type in overrides
                      else c for c in conditions]  # fmt: skip
        update["phase"] = "Failed" if failed else "Pending"
    conditions.append(make_condition(CACHE_READY, value, previous, now, generation))
    update["conditions"] = conditions
    return status.model_copy(update=update)
