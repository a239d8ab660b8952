"""Pure rendering: one ModelDeployment (+ operator settings) -> the objects it should own.

Each function returns a plain dict ready for server-side apply: only the fields the operator
cares about, so that fields set by others (HPA annotations, kubectl rollout restart, defaults
filled in by the API server) are left alone. No I/O here; `kube.py` applies the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import kopf

from modelfleet import labels
from modelfleet.api import DEFAULT_GPU_RESOURCE, ModelDeployment
from modelfleet.cli import WorkerSettings
from modelfleet.engines import LORA_RUNTIME_ENV, VLLM_SERVER_MODULE, VllmServer, vllm_env, vllm_tracing
from modelfleet.sources import ModelSourceError, parse_model_source

from .adapters import adapter_volumes, lora_slots
from .config import OperatorConfig

CONTAINER = "worker"
PORT_NAME = "http"
MODEL_VOLUME = "model"
CACHE_VOLUME = "cache"
SHM_VOLUME = "dshm"  # vLLM's workers share tensors through /dev/shm, which runtimes cap at 64 MiB
TMP_VOLUME = "tmp"
SHM_PATH, TMP_PATH = "/dev/shm", "/tmp"
# modelfleet's worker runs as its image's user (images/worker.Dockerfile: USER 65532:65532) on a
# read-only root filesystem; only /tmp and the hf:// cache (emptyDirs) are writable. vLLM's
# official image runs as root, so its containers keep only allowPrivilegeEscalation: false.
WORKER_UID = 65532


def worker_security_context() -> dict[str, Any]:
    """The worker's container's (and the weight cache's fill container's, which runs the same
    image): non-root, read-only root, no privilege, no capabilities. A fresh dict each call, as
    rendered manifests are merged and patched in place."""
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


GPU_RESOURCE = DEFAULT_GPU_RESOURCE  # spec.resources.gpuResource names another (amd.com/gpu, a MIG profile)
# Probe timing. The startup probe carries the whole model-loading budget so that liveness,
# which is strict, only starts once the server answers. It asks every second: a replica is
# Ready (and a held request served) at the first startup success, since the kubelet probes
# readiness at once then, so its period is what every cold start waits on top of the load
# (half of it on average); a GET a second while a model loads costs nothing that matters.
STARTUP_PERIOD_SECONDS = 1
LIVENESS_PERIOD_SECONDS = 10
LIVENESS_FAILURES = 6
READINESS_PERIOD_SECONDS = 5
READINESS_FAILURES = 2


@dataclass(frozen=True)
class WorkerModel:
    """Where the worker finds the model (its --model), and what must be mounted for that."""

    path: str
    volume: dict[str, Any] | None = None
    mount: dict[str, Any] | None = None
    needs_hf_cache: bool = False


def worker_model_arg(source: str, config: OperatorConfig) -> WorkerModel:
    """Map spec.model.source (parsed by modelfleet.sources) to the worker's --model value and its volume.

    pvc://claim/sub/path -> the claim mounted read-only under pvc_mount_root, and the local path
    to sub/path inside it. hf:// is passed through (the worker downloads into an emptyDir).
    file:// becomes its normalized path, mounted from the node when host_path_models is on.
    """
    parsed = parse_model_source(source)
    if parsed.scheme == "pvc":
        mount_path = parsed.mount_path(config.pvc_mount_root)
        return WorkerModel(
            path=parsed.claim_path(config.pvc_mount_root),
            volume={"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": parsed.claim, "readOnly": True}},
            mount={"name": MODEL_VOLUME, "mountPath": mount_path, "readOnly": True},
        )
    if parsed.scheme == "hf":
        return WorkerModel(path=source, needs_hf_cache=True)
    if parsed.scheme == "file":
        if not config.host_path_models:
            return WorkerModel(path=parsed.path)
        return WorkerModel(
            path=parsed.path,
            volume={"name": MODEL_VOLUME, "hostPath": {"path": parsed.path, "type": "Directory"}},
            mount={"name": MODEL_VOLUME, "mountPath": parsed.path, "readOnly": True},
        )
    raise ModelSourceError(f"spec.model.source {source!r} has no known scheme (file://, hf://, pvc://)")


def child_metadata(md: ModelDeployment, api_version: str, kind: str) -> dict[str, Any]:
    """A child's identity, owned by the ModelDeployment so that deleting it deletes the child.

    The owner reference is kopf's (`controller` and `blockOwnerDeletion` true), given the owner
    explicitly so that nothing is read from the handler's context and rendering stays pure.
    Not `kopf.adopt`: it would also copy the ModelDeployment's labels onto every child.
    """
    obj: dict[str, Any] = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": md.metadata.name,
            "namespace": md.metadata.namespace,
            "labels": labels.worker_labels(md.metadata.name),
            "ownerReferences": [owner_reference(md)],
        },
    }
    return obj


def owner_reference(md: ModelDeployment, controller: bool = True) -> dict[str, Any]:
    """kopf's owner reference to the ModelDeployment, built from the owner given explicitly so
    that nothing is read from the handler's context. Children get the controller one; a shared
    weight cache's claim one per user without `controller` (only one reference may be the
    controller) and without blockOwnerDeletion, which only matters to a foreground delete of the
    owner and needs delete rights on it."""
    obj: dict[str, Any] = {}
    owner = {"apiVersion": md.api_version, "kind": md.kind,
             "metadata": {"name": md.metadata.name, "uid": md.metadata.uid}}
    kopf.append_owner_reference(obj, owner=kopf.Body(owner), controller=controller, block_owner_deletion=controller)
    return obj["metadata"]["ownerReferences"][0]


def worker_args(md: ModelDeployment, model_path: str, config: OperatorConfig) -> list[str]:
    """The `modelfleet worker` command line (docs/cli.md), written by WorkerSettings.to_args;
    user args come last."""
    spec = md.spec
    settings = WorkerSettings(
        source=model_path,
        # Aliases too: the gateway forwards the request bytes unchanged, "model" included.
        served_names=[md.served_name, *spec.model.aliases],
        host="0.0.0.0",
        port=config.worker_port,
        # Explicit on CPU too: a node with GPUs may expose them to pods that did not ask.
        device="cuda" if spec.resources.gpu > 0 else "cpu",
        dtype=spec.engine.dtype,
        # Finish in-flight requests for as long as Kubernetes lets the pod live after SIGTERM.
        drain_timeout=spec.termination_grace_period_seconds,
        max_model_len=spec.engine.max_model_len,
        **({} if spec.engine.max_num_seqs is None else {"max_num_seqs": spec.engine.max_num_seqs}),
        # LoRA's slots only: the adapters themselves are loaded at runtime (operator/adapters.py).
        **({} if (slots := lora_slots(md)) is None else {"max_loras": slots[0], "max_lora_rank": slots[1]}),
    )
    return ["modelfleet", "worker", *settings.to_args(), *spec.engine.args]


def vllm_server(md: ModelDeployment, model_path: str, config: OperatorConfig) -> VllmServer:
    """vLLM's OpenAI server for this ModelDeployment: the same spec fields as the own worker's
    flags, and the GPUs of a replica as its tensor-parallel size."""
    spec = md.spec
    parsed = parse_model_source(model_path)
    model, revision = (parsed.repo, parsed.revision) if parsed.scheme == "hf" else (model_path, None)
    max_loras, max_lora_rank = lora_slots(md) or (None, 16)
    return VllmServer(
        model=model, revision=revision,
        served_names=[md.served_name, *spec.model.aliases],
        port=config.worker_port,
        dtype=spec.engine.dtype,
        max_model_len=spec.engine.max_model_len,
        max_num_seqs=spec.engine.max_num_seqs,
        tensor_parallel_size=max(1, spec.resources.gpu),
        task=spec.model.task,
        drain_seconds=spec.termination_grace_period_seconds,
        max_loras=max_loras, max_lora_rank=max_lora_rank,
        otlp_traces_endpoint=vllm_tracing(replica_environ(md, config))[0],
        extra_args=list(spec.engine.args),
    )  # fmt: skip


def replica_environ(md: ModelDeployment, config: OperatorConfig) -> dict[str, str]:
    """The plain values of a replica's environment that the operator sets: its --worker-env,
    then spec.engine.env, which wins (values from Secrets or fields are not known here)."""
    return dict(config.worker_env) | {e.name: e.value for e in md.spec.engine.env if e.value is not None}


def _merge_env(env: list[dict[str, Any]], user_count: int) -> list[dict[str, Any]]:
    """The user's spec.engine.env (the first `user_count` entries) wins over what the operator
    adds by default: an env list with a name twice is refused by server-side apply."""
    user = {e["name"] for e in env[:user_count]}
    return env[:user_count] + [e for e in env[user_count:] if e["name"] not in user]


def _resources(md: ModelDeployment) -> dict[str, Any]:
    """Requests and limits. No CPU limit: throttling a loading model only makes it slower."""
    res = md.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu is not None:
        requests["cpu"] = str(res.cpu)
    if res.memory is not None:
        requests["memory"] = limits["memory"] = str(res.memory)
    if res.gpu > 0:
        limits[res.gpu_resource] = str(res.gpu)
    # Extended resources cannot be overcommitted: Kubernetes sets the request to the limit.
    limits.update({name: str(quantity) for name, quantity in res.extended.items()})
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _http_probe(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME, "scheme": "HTTP"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
        "successThreshold": 1,
    }


def _container(md: ModelDeployment, source: WorkerModel, config: OperatorConfig,
               adapter_mounts: list[dict[str, Any]]) -> dict[str, Any]:
    engine = md.spec.engine
    env = [e.to_wire() for e in engine.env]
    mounts = ([source.mount] if source.mount else []) + adapter_mounts
    # With LoRA on, hf:// adapters download into the same writable cache as hf:// models.
    if source.needs_hf_cache or md.spec.lora_enabled:
        env.append({"name": "HF_HOME", "value": config.hf_cache_dir})
        mounts.append({"name": CACHE_VOLUME, "mountPath": config.hf_cache_dir})
    token = md.spec.model.token_secret_ref
    if token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    env += [{"name": name, "value": value} for name, value in config.worker_env]
    startup_failures = math.ceil(engine.startup_timeout_seconds / STARTUP_PERIOD_SECONDS)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "imagePullPolicy": engine.image_pull_policy or config.default_image_pull_policy,
        "ports": [{"name": PORT_NAME, "containerPort": config.worker_port, "protocol": "TCP"}],
        "resources": _resources(md),
        "startupProbe": _http_probe("/health", STARTUP_PERIOD_SECONDS, startup_failures, 3),
        "livenessProbe": _http_probe("/health", LIVENESS_PERIOD_SECONDS, LIVENESS_FAILURES, 5),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(config.drain_seconds)]}}},
        # The last log lines become the termination message, so a model that fails to load
        # shows why in status (CrashLoopBackOff: <message>) instead of only in the logs.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if engine.kind == "vllm":
        server = vllm_server(md, source.path, config)
        engine_env = vllm_env(md.spec.resources.gpu > 0, config.vllm_cpu_kv_cache_gib, server.args())
        env += [{"name": k, "value": v} for k, v in engine_env.items()]
        if md.spec.lora_enabled:  # the operator loads spec.adapters through the runtime API
            env += [{"name": k, "value": v} for k, v in LORA_RUNTIME_ENV.items()]
        # With tracing on, what vLLM's --otlp-traces-endpoint needs besides (engines.vllm_tracing).
        env += [{"name": k, "value": v} for k, v in vllm_tracing(replica_environ(md, config))[1].items()]
        mounts.append({"name": SHM_VOLUME, "mountPath": SHM_PATH})
        container.update({
            "image": engine.image or config.vllm_image,
            "command": ["python3", "-m", VLLM_SERVER_MODULE],
            "args": server.args(),
            # vLLM has no separate readiness endpoint: /health answers once the engine is up.
            "readinessProbe": _http_probe("/health", READINESS_PERIOD_SECONDS, READINESS_FAILURES, 3),
        })
    else:
        container.update({
            "image": engine.image or config.default_image,
            "command": worker_args(md, source.path, config),
            "readinessProbe": _http_probe("/ready", READINESS_PERIOD_SECONDS, READINESS_FAILURES, 3),
            "securityContext": worker_security_context(),
        })
        mounts.append({"name": TMP_VOLUME, "mountPath": TMP_PATH})
    env, mounts = _with_pod_template(md, _merge_env(env, len(engine.env)), mounts)
    container.update(env=env, volumeMounts=mounts)
    return {k: v for k, v in container.items() if v not in ([], {})}


def _with_pod_template(
    md: ModelDeployment, env: list[dict[str, Any]], mounts: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """spec.podTemplate's env and mounts under the container's own: an env name already set
    (by the operator or spec.engine.env) keeps its value; a mount at a path the operator
    mounts is refused, since the API server would refuse the pod anyway, less clearly."""
    template = md.spec.pod_template
    if template is None:
        return env, mounts
    taken = {e["name"] for e in env}
    env = env + [e.to_wire() for e in template.spec.env if e.name not in taken]
    paths = {m["mountPath"] for m in mounts}
    for mount in template.spec.volume_mounts:
        if mount.mount_path in paths:
            raise ValueError(
                f"spec.podTemplate.spec.volumeMounts mounts {mount.name} at {mount.mount_path}, "
                "where the operator mounts one of its own volumes"
            )
    return env, mounts + [m.to_wire() for m in template.spec.volume_mounts]


def pod_scheduling(md: ModelDeployment) -> dict[str, Any]:
    """Where and how a pod of this ModelDeployment may run: spec.nodeSelector and tolerations
    with spec.podTemplate's scheduling fields merged under them (spec.nodeSelector wins on a
    shared key, tolerations add up), empty ones left out. The replicas and the weight cache's
    fill pod both take it, so a fill lands where the replicas may run (the node of a
    ReadWriteOnce claim, the only nodes the workload may use) and pulls as they do."""
    spec = md.spec
    extra = spec.pod_template.spec if spec.pod_template is not None else None
    fields: dict[str, Any] = {
        "nodeSelector": {**(extra.node_selector if extra else {}), **spec.node_selector},
        "tolerations": [t.to_wire() for t in [*spec.tolerations, *(extra.tolerations if extra else [])]],
    }
    if extra is not None:
        fields |= {
            "imagePullSecrets": [s.to_wire() for s in extra.image_pull_secrets],
            "affinity": extra.affinity,
            "runtimeClassName": extra.runtime_class_name,
            "priorityClassName": extra.priority_class_name,
        }
    return {key: value for key, value in fields.items() if value}


def render_deployment(md: ModelDeployment, replicas: int, config: OperatorConfig) -> dict[str, Any]:
    """The Deployment of worker pods, sized to `replicas` (spec.replicas or the autoscaler's)."""
    spec = md.spec
    source = worker_model_arg(spec.model.source, config)
    pod_annotations = {
        "kubectl.kubernetes.io/default-container": CONTAINER,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(config.worker_port),
        "prometheus.io/path": "/metrics",
    }
    own_paths = (TMP_PATH, SHM_PATH, config.hf_cache_dir)  # the pod's own volumes' mount paths
    adapter_vols, adapter_mounts = adapter_volumes(
        md, config, [source.mount["mountPath"]] if source.mount else [], own_paths
    )
    volumes = ([source.volume] if source.volume else []) + adapter_vols
    if source.needs_hf_cache or spec.lora_enabled:
        volumes.append({"name": CACHE_VOLUME, "emptyDir": {}})
    if spec.engine.kind == "vllm":
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": config.vllm_shm_size}})
    else:
        volumes.append({"name": TMP_VOLUME, "emptyDir": {}})
    pod_spec: dict[str, Any] = {
        "containers": [_container(md, source, config, adapter_mounts)],
        # The grace period covers the preStop drain plus finishing in-flight requests.
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds + config.drain_seconds,
        # Workers never call the API server, and a namespace with many Services would
        # otherwise flood their environment.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        **pod_scheduling(md),
        # spec.podTemplate's volumes add up (the CRD refuses the operator's volume names).
        "volumes": volumes + ([dict(v) for v in spec.pod_template.spec.volumes] if spec.pod_template else []),
    }
    pod_spec = {k: v for k, v in pod_spec.items() if v not in ([], {})}
    obj = child_metadata(md, "apps/v1", "Deployment")
    obj["spec"] = {
        "replicas": replicas,
        "selector": {"matchLabels": labels.selector_labels(md.metadata.name)},
        # maxUnavailable 0: a new replica must be ready before an old one goes, so a rollout
        # never has a moment with fewer ready replicas than asked for (or zero).
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "revisionHistoryLimit": 3,
        # Loading counts as progress; only declare a stuck rollout well past the startup budget.
        "progressDeadlineSeconds": spec.engine.startup_timeout_seconds + 300,
        "template": {
            "metadata": _pod_metadata(md, pod_annotations),
            "spec": pod_spec,
        },
    }
    return obj


def _pod_metadata(md: ModelDeployment, annotations: dict[str, str]) -> dict[str, Any]:
    """The pod template's labels and annotations: spec.podTemplate's, then the operator's on top
    (the CRD refuses the keys the operator sets, so none is silently dropped)."""
    template = md.spec.pod_template
    extra = template.metadata if template is not None else None
    return {
        "labels": {**(extra.labels if extra else {}), **labels.worker_labels(md.metadata.name)},
        "annotations": {**(extra.annotations if extra else {}), **annotations},
    }


def render_service(md: ModelDeployment, config: OperatorConfig) -> dict[str, Any]:
    """The Service whose EndpointSlices (ready pods only) the gateway watches."""
    obj = child_metadata(md, "v1", "Service")
    obj["spec"] = {
        "type": "ClusterIP",
        "selector": labels.selector_labels(md.metadata.name),
        "ports": [
            {"name": PORT_NAME, "port": config.worker_port, "targetPort": PORT_NAME, "protocol": "TCP"}
        ],
    }
    return obj


def render_pdb(md: ModelDeployment, replicas: int) -> dict[str, Any] | None:
    """A PodDisruptionBudget keeping all but one replica through node drains; None below 2.

    With one replica a PDB would either block drains forever (minAvailable 1) or allow an
    outage anyway (maxUnavailable 1), so none is made and an existing one is deleted.
    """
    if replicas < 2:
        return None
    obj = child_metadata(md, "policy/v1", "PodDisruptionBudget")
    obj["spec"] = {
        "maxUnavailable": 1,
        "selector": {"matchLabels": labels.selector_labels(md.metadata.name)},
    }
    return obj
