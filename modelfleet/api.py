"""The ModelDeployment custom resource as typed models.

One shape shared by the operator (which reconciles it), the gateway (which reads `spec.model`
and `spec.routing`) and the tests (which check these models against `crds/` so the two cannot
drift). Field names are the CRD's camelCase spellings via aliases; Python code uses snake_case.

The validators repeat the CRD's CEL rules on purpose: the API server is the first line, but an
object written under an older CRD can still reach the operator, and it must fail with the same
message instead of a crash.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .engines import EngineKind, sets_flag
from .sources import CLIMB_RE as CLIMB_RE  # re-exported: the CRD's rules are checked against it
from .sources import SOURCE_RE, ModelSourceError, parse_model_source

GROUP = "modelfleet.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ("md",)
CATEGORY = "modelfleet"
CRD_NAME = f"{PLURAL}.{GROUP}"

# A served model name, as clients send it in `"model": ...`: OpenAI-style ("gpt-4o-mini"),
# Hugging Face-style ("org/name") and Ollama-style ("llama3:8b") names all fit.
MODEL_NAME_RE = r"^[A-Za-z0-9]([A-Za-z0-9._:/-]{0,126}[A-Za-z0-9])?$"
# spec.model.source's CEL rules (SOURCE_RE, CLIMB_RE) live with the parser, modelfleet.sources.
# A Kubernetes quantity ("4", "500m", "16Gi", "1e3"), as the API server's own pattern.
QUANTITY_RE = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
# Options the operator sets itself from spec.model, for either engine; user args must not
# repeat them (modelfleet worker's --served-name, vLLM's --served-model-name).
RESERVED_ARGS = ("--model", "--served-name", "--served-model-name", "--host", "--port")
# The Service is named after the ModelDeployment, so the name must be a DNS-1035 label.
OBJECT_NAME_RE = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"

# Pod-template fields the operator owns: refused in spec.podTemplate (by CEL in the CRD and by
# the validators below), so a user's value can never silently lose to the operator's.
# Labels: the Deployment's selector and the well-known labels on every worker object
# (modelfleet/labels.py). Annotations: the served names and what the operator sets for
# kubectl and Prometheus. Volumes: the names operator/render.py gives its own volumes.
OWNED_LABEL_KEYS = (
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
    "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by",
)  # fmt: skip
OWNED_ANNOTATION_KEYS = (
    "kubectl.kubernetes.io/default-container", "prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path",
)  # fmt: skip
OWNED_KEY_PREFIX = f"{GROUP}/"
OWNED_VOLUMES = ("model", "cache", "dshm", "tmp")
OWNED_MOUNT_PATHS = ("/tmp", "/dev/shm")
# An extended resource name as Kubernetes spells it: a DNS subdomain, '/', a name
# (nvidia.com/gpu, amd.com/gpu, nvidia.com/mig-1g.5gb, gpu.intel.com/i915).
EXTENDED_RESOURCE_RE = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

# vLLM's load_lora_adapter takes a repo id, no revision; modelfleet's worker follows it.
ADAPTER_REVISION = "spec.adapters hf:// sources take no @revision: the engines load an adapter's default branch"
# spec.model.cache's CEL rules, word for word.
CACHE_CLAIM_OR_SIZE = (
    "spec.model.cache takes a size (a claim the operator makes, of storageClassName) or claimName "
    "(an existing claim), not both"
)
CACHE_CLAIM_ALONE = "spec.model.cache.claimName names an existing claim: storageClassName and accessMode are its own"
CACHE_NOT_PVC = "spec.model.cache caches hf:// and file:// sources: a pvc:// source is a volume already"
ADAPTER_HUB_NEEDS_VLLM = (
    "spec.adapters hf:// sources need spec.engine.kind: vllm (modelfleet's worker loads an adapter from a "
    "directory: use file:// or pvc://)"
)
GPU_NEEDS_VLLM = (
    "spec.resources.gpu above 1 needs spec.engine.kind: vllm (modelfleet's own engine runs on one "
    "device; vLLM splits a model over the GPUs with tensor parallelism)"
)

Phase = Literal["Pending", "Loading", "Ready", "Degraded", "Failed"]
ConditionType = Literal["Ready", "Progressing", "Degraded", "AdaptersReady", "CacheReady"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Strategy = Literal["least-load", "prefix-affinity"]
ModelTask = Literal["auto", "generate", "embed"]


def cluster_source(source: str, field: str) -> str:
    """SOURCE if a cluster can serve it, else a ValueError naming FIELD: the CRD's pattern (a plain
    path is the worker's, not a cluster's) and the parser the operator and the worker use, which
    refuses what the CRD's CLIMB_RE rule does."""
    try:
        parse_model_source(source)
        valid = re.match(SOURCE_RE, source) is not None
    except ModelSourceError:
        valid = False
    if not valid:
        raise ValueError(f"{field} must be file:///abs/path, hf://[org/]name[@revision] or pvc://claim/path, "
                         "with no '..' segments")
    return source

class _Model(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields ignored.

    Unknown fields are ignored rather than rejected because the API server already prunes them
    for the current CRD; an object from an older or newer CRD must still reconcile.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server spells it (camelCase, no unset optional fields)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SecretKeyRef(_Model):
    """A key of a Secret in the ModelDeployment's namespace."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="token", min_length=1, max_length=253)


class WeightCache(_Model):
    """`spec.model.cache`: a volume the operator fills once with the weights (a Job), which the
    replicas then mount read-only instead of downloading (operator/cache.py). Either a storage
    class and size, for a claim the operator makes and shares between the ModelDeployments of
    one source (deleted with the last of them unless `keep`), or an existing claim of the user's."""

    storage_class_name: str | None = Field(default=None, max_length=253)
    size: int | str | None = None
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"] | None = None
    claim_name: str | None = Field(default=None, max_length=253)
    keep: bool = False

    @field_validator("size")
    @classmethod
    def _size(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, str) and not re.match(QUANTITY_RE, v):
            raise ValueError(f"spec.model.cache.size {v!r} is not a Kubernetes quantity (e.g. 20Gi)")
        return v

    @model_validator(mode="after")
    def _claim_or_size(self) -> WeightCache:
        if (self.claim_name is None) == (self.size is None):
            raise ValueError(CACHE_CLAIM_OR_SIZE)
        if self.claim_name is not None and (self.storage_class_name or self.access_mode):
            raise ValueError(CACHE_CLAIM_ALONE)
        return self


class ModelSource(_Model):
    """`spec.model`: where the weights come from and the names clients use."""

    source: str = Field(max_length=1024)
    served_name: str | None = Field(default=None, max_length=128)
    aliases: list[str] = Field(default_factory=list, max_length=16)
    # The Hugging Face token for gated or private hf:// models, as HF_TOKEN in the pod.
    token_secret_ref: SecretKeyRef | None = None
    # What the model is served for. auto: modelfleet's worker and vLLM both tell from the
    # architecture (a sentence-transformers or BERT-style model embeds, a causal LM generates).
    task: ModelTask = "auto"
    # A volume filled once with the weights, which replicas mount read-only (operator/cache.py).
    cache: WeightCache | None = None

    @model_validator(mode="after")
    def _cache_source(self) -> ModelSource:
        if self.cache is not None and self.source.startswith("pvc://"):
            raise ValueError(CACHE_NOT_PVC)
        return self

    @field_validator("source")
    @classmethod
    def _source_scheme(cls, v: str) -> str:
        return cluster_source(v, "spec.model.source")

    @field_validator("served_name")
    @classmethod
    def _served_name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(MODEL_NAME_RE, v):
            raise ValueError(f"spec.model.servedName {v!r} is not a valid model name")
        return v

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if not re.match(MODEL_NAME_RE, a)]
        if bad:
            raise ValueError(f"spec.model.aliases has invalid model names: {bad}")
        if len(set(v)) != len(v):
            raise ValueError("spec.model.aliases must not repeat a name")
        return v

    @model_validator(mode="after")
    def _alias_not_served_name(self) -> ModelSource:
        if self.served_name is not None and self.served_name in self.aliases:
            raise ValueError("spec.model.aliases must not repeat spec.model.servedName")
        return self


class Autoscaling(_Model):
    """`spec.autoscaling`: replicas follow in-flight requests; `spec.replicas` is then ignored."""

    min_replicas: int = Field(default=0, ge=0, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    target_inflight_per_replica: int = Field(default=8, ge=1, le=100000)
    scale_down_delay_seconds: int = Field(default=300, ge=0, le=86400)

    @model_validator(mode="after")
    def _min_le_max(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("spec.autoscaling.minReplicas must be <= spec.autoscaling.maxReplicas")
        return self


class Resources(_Model):
    """`spec.resources`: per replica. cpu and memory are Kubernetes quantities.

    `gpu` counts accelerators whatever their vendor: `gpu_resource` names the extended resource
    they are requested as (AMD, Intel, a MIG profile), and the count still sets vLLM's tensor
    parallelism. `extended` adds other device-plugin resources (RDMA, FUSE) that are not GPUs.
    """

    gpu: int = Field(default=0, ge=0, le=64)
    gpu_resource: str = Field(default=DEFAULT_GPU_RESOURCE, max_length=317)
    cpu: int | str | None = None
    memory: int | str | None = None
    extended: dict[str, int | str] = Field(default_factory=dict, max_length=16)

    @field_validator("gpu_resource")
    @classmethod
    def _gpu_resource(cls, v: str) -> str:
        if not re.match(EXTENDED_RESOURCE_RE, v):
            raise ValueError(
                f"spec.resources.gpuResource {v!r} must be an extended resource name such as nvidia.com/gpu, "
                "amd.com/gpu or nvidia.com/mig-1g.5gb"
            )
        return v

    @field_validator("extended")
    @classmethod
    def _extended(cls, v: dict[str, int | str]) -> dict[str, int | str]:
        for name, quantity in v.items():
            if not re.match(EXTENDED_RESOURCE_RE, name) or name.startswith(("kubernetes.io/", "requests.")):
                raise ValueError(
                    f"spec.resources.extended key {name!r} must be a domain-qualified extended resource name "
                    "(vendor.example/device), not cpu, memory or a kubernetes.io resource"
                )
            if isinstance(quantity, str) and not re.match(QUANTITY_RE, quantity):
                raise ValueError(f"spec.resources.extended[{name!r}] {quantity!r} is not a Kubernetes quantity")
        return v

    @model_validator(mode="after")
    def _gpu_once(self) -> Resources:
        if self.gpu_resource in self.extended:
            raise ValueError(
                "spec.resources.extended must not repeat spec.resources.gpuResource: set the count in spec.resources.gpu"
            )
        return self

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: int | str | None, info: Any) -> int | str | None:
        if isinstance(v, str) and not re.match(QUANTITY_RE, v):
            raise ValueError(
                f"spec.resources.{info.field_name} {v!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)"
            )
        return v


class EnvVar(_Model):
    """One container environment variable, as in a Pod spec."""

    name: str = Field(min_length=1, max_length=256)
    value: str | None = None
    value_from: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("spec.engine.env entries set value or valueFrom, not both")
        return self


class Engine(_Model):
    """`spec.engine`: which engine serves the model, its image and its options."""

    kind: EngineKind = "modelfleet"
    image: str | None = Field(default=None, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    args: list[str] = Field(default_factory=list, max_length=64)
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    max_model_len: int | None = Field(default=None, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    dtype: Dtype = "auto"
    startup_timeout_seconds: int = Field(default=1800, ge=30, le=86400)

    @field_validator("args")
    @classmethod
    def _no_reserved_args(cls, v: list[str]) -> list[str]:
        for arg in v:
            if sets_flag(arg, *RESERVED_ARGS):
                raise ValueError(
                    "spec.engine.args must not set --model, --served-name, --served-model-name, --host or "
                    "--port: the operator sets them from spec.model"
                )
        return v


class Toleration(_Model):
    """One Pod toleration, as in a Pod spec."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not set value")
        return self


class Routing(_Model):
    """`spec.routing`: how the gateway picks a replica for this model (the gateway reads it)."""

    strategy: Strategy = "least-load"
    prefix_length: int = Field(default=256, ge=1, le=65536)  # honoured whole by the gateway (gateway/pool.py)
    load_factor: float = Field(default=1.25, ge=1.0, le=10.0)
    max_queue: int = Field(default=100, ge=0, le=100000)
    hold_timeout_seconds: int = Field(default=60, ge=0, le=600)
    # Several ModelDeployments may serve one name when every one of them sets a weight: the
    # gateway splits that name's requests between them in proportion (5 and 95: a 5% canary).
    weight: int | None = Field(default=None, ge=0, le=100)


class VolumeMount(_Model):
    """A mount of one of spec.podTemplate.spec.volumes into the model container."""

    name: str = Field(min_length=1, max_length=63)
    mount_path: str = Field(min_length=1, max_length=1024)
    read_only: bool | None = None
    sub_path: str | None = Field(default=None, max_length=1024)


class LocalObjectReference(_Model):
    """A reference to an object in the ModelDeployment's namespace, by name."""

    name: str = Field(min_length=1, max_length=253)


class PodTemplateMetadata(_Model):
    """`spec.podTemplate.metadata`: extra labels and annotations for the worker pods."""

    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    annotations: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("labels", "annotations")
    @classmethod
    def _not_owned(cls, v: dict[str, str], info: Any) -> dict[str, str]:
        owned = OWNED_LABEL_KEYS if info.field_name == "labels" else OWNED_ANNOTATION_KEYS
        taken = sorted(k for k in v if k in owned or k.startswith(OWNED_KEY_PREFIX))
        if taken:
            raise ValueError(
                f"spec.podTemplate.metadata.{info.field_name} must not set {', '.join(taken)}: the operator owns "
                f"them (modelfleet.dev/* and {', '.join(owned)})"
            )
        return v


class PodTemplateSpec(_Model):
    """`spec.podTemplate.spec`: pod fields the operator does not set itself, merged under what it
    does. Big Kubernetes types (affinity, volumes) are kept as the API server validates them."""

    affinity: dict[str, Any] | None = None
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    runtime_class_name: str | None = Field(default=None, max_length=253)
    priority_class_name: str | None = Field(default=None, max_length=253)
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)
    volumes: list[dict[str, Any]] = Field(default_factory=list, max_length=32)
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=32)
    env: list[EnvVar] = Field(default_factory=list, max_length=64)

    @field_validator("volumes")
    @classmethod
    def _volume_names(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for volume in v:
            name = volume.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError("spec.podTemplate.spec.volumes entries need a name")
            if name in OWNED_VOLUMES:
                raise ValueError(
                    f"spec.podTemplate.spec.volumes must not use the names {', '.join(OWNED_VOLUMES)}: "
                    "the operator's own volumes have them"
                )
        return v

    @field_validator("volume_mounts")
    @classmethod
    def _mounts(cls, v: list[VolumeMount]) -> list[VolumeMount]:
        for mount in v:
            if mount.mount_path in OWNED_MOUNT_PATHS:
                raise ValueError(
                    f"spec.podTemplate.spec.volumeMounts must not mount at {', '.join(OWNED_MOUNT_PATHS)}: "
                    "the operator mounts its own volumes there"
                )
        return v

    @model_validator(mode="after")
    def _mounts_name_volumes(self) -> PodTemplateSpec:
        names = {volume.get("name") for volume in self.volumes}
        missing = sorted({m.name for m in self.volume_mounts} - names)
        if missing:
            raise ValueError(
                "spec.podTemplate.spec.volumeMounts must name volumes of spec.podTemplate.spec.volumes "
                f"(unknown: {', '.join(missing)})"
            )
        return self


class PodTemplate(_Model):
    """`spec.podTemplate`: the escape hatch for what real clusters need of a pod."""

    metadata: PodTemplateMetadata = Field(default_factory=PodTemplateMetadata)
    spec: PodTemplateSpec = Field(default_factory=PodTemplateSpec)


class Adapter(_Model):
    """One LoRA adapter of `spec.adapters`: served under its own model name on the base's
    replicas, loaded into each of them at runtime by the operator (docs/operator.md)."""

    name: str = Field(max_length=128)
    source: str = Field(max_length=1024)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(MODEL_NAME_RE, v):
            raise ValueError(f"spec.adapters name {v!r} is not a valid model name")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if cluster_source(v, "spec.adapters source").startswith("hf://") and "@" in v:
            raise ValueError(ADAPTER_REVISION)
        return v


class Lora(_Model):
    """`spec.lora`: the engine's LoRA slots, start-up flags of both engines (vLLM's
    --max-loras, --max-lora-rank). LoRA is on when this is set or spec.adapters is not empty."""

    max_loras: int = Field(default=4, ge=1, le=256)
    max_lora_rank: int = Field(default=16, ge=1, le=512)


class ModelDeploymentSpec(_Model):
    """`spec`: what the user asks for."""

    model: ModelSource
    replicas: int = Field(default=1, ge=0, le=1000)
    autoscaling: Autoscaling | None = None
    resources: Resources = Field(default_factory=Resources)
    engine: Engine = Field(default_factory=Engine)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    routing: Routing = Field(default_factory=Routing)
    termination_grace_period_seconds: int = Field(default=120, ge=0, le=3600)
    pod_template: PodTemplate | None = None
    adapters: list[Adapter] = Field(default_factory=list, max_length=64)
    lora: Lora | None = None

    @property
    def lora_enabled(self) -> bool:
        """Whether the pods start with LoRA on: a start-up flag, so it does not follow the
        adapter list itself (adding the first adapter turns it on, once)."""
        return self.lora is not None or bool(self.adapters)

    @field_validator("adapters")
    @classmethod
    def _unique_adapters(cls, v: list[Adapter]) -> list[Adapter]:
        names = [a.name for a in v]
        if len(set(names)) != len(names):
            raise ValueError("spec.adapters must not repeat a name")
        return v

    @model_validator(mode="after")
    def _hub_adapters_need_vllm(self) -> ModelDeploymentSpec:
        if self.engine.kind != "vllm" and any(a.source.startswith("hf://") for a in self.adapters):
            raise ValueError(ADAPTER_HUB_NEEDS_VLLM)
        return self

    @model_validator(mode="after")
    def _one_gpu_for_own_engine(self) -> ModelDeploymentSpec:
        if self.resources.gpu > 1 and self.engine.kind != "vllm":
            raise ValueError(GPU_NEEDS_VLLM)
        return self


class Condition(_Model):
    """A status condition, shaped like metav1.Condition."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class AutoscalerStatus(_Model):
    """The autoscaler's memory, kept in status so a restarted operator decides the same way."""

    desired_replicas: int = 0
    last_active_time: str | None = None
    last_needed_time: str | None = None
    last_scale_time: str | None = None


class AdapterStatus(_Model):
    """One adapter's readiness: on how many ready replicas it is loaded, and why not elsewhere."""

    name: str
    ready_replicas: int = 0
    message: str | None = None


class CacheStatus(_Model):
    """`status.cache`: the weight cache's claim and how much of the model it holds (bytes so
    far, of totalBytes when the source tells, as percent)."""

    claim_name: str
    path: str | None = None
    bytes: int | None = None
    total_bytes: int | None = None
    percent: int | None = None


class ModelDeploymentStatus(_Model):
    """`status`: what the cluster says, written only by the operator."""

    phase: Phase | None = None
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    desired_replicas: int = 0
    observed_generation: int | None = None
    selector: str | None = None
    served_name: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    autoscaler: AutoscalerStatus | None = None
    adapters: list[AdapterStatus] | None = None
    cache: CacheStatus | None = None

    def condition(self, type_: str) -> Condition | None:
        """The condition of that type, if present."""
        return next((c for c in self.conditions if c.type == type_), None)


class ObjectMeta(_Model):
    """The parts of metadata the operator uses."""

    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class ModelDeployment(_Model):
    """A whole ModelDeployment object."""

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus = Field(default_factory=ModelDeploymentStatus)

    @model_validator(mode="after")
    def _name_is_dns_label(self) -> ModelDeployment:
        if not re.match(OBJECT_NAME_RE, self.metadata.name):
            raise ValueError(
                f"metadata.name {self.metadata.name!r} must be a DNS-1035 label: it also names the worker Service"
            )
        return self

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ModelDeployment:
        """Parse an object as the API server returns it (a dict or kopf's Body)."""
        data = {k: _plain(body.get(k)) for k in ("apiVersion", "kind", "metadata", "spec", "status")}
        data = {k: v for k, v in data.items() if v is not None}
        data.setdefault("spec", {})
        return cls.model_validate(data)

    @property
    def served_name(self) -> str:
        """The name clients use: spec.model.servedName, defaulting to metadata.name."""
        return self.spec.model.served_name or self.metadata.name

    @model_validator(mode="after")
    def _adapters_not_own_names(self) -> ModelDeployment:
        own = {self.served_name, *self.spec.model.aliases}
        taken = sorted(a.name for a in self.spec.adapters if a.name in own)
        if taken:
            raise ValueError(f"spec.adapters names {taken} repeat the model's served name or an alias")
        return self


@dataclass(frozen=True)
class NameClaim:
    """The names one ModelDeployment asks to serve, and what decides who gets them.

    The operator (which reports NameConflict) and the gateway (which routes) both settle
    clashes with `settle_names`, so they always agree on the holder.
    """

    namespace: str
    name: str
    served: str
    aliases: tuple[str, ...] = ()
    weight: int | None = None
    created: int = 0  # metadata.creationTimestamp, seconds since the epoch
    adapters: tuple[str, ...] = ()  # spec.adapters' names: model names like the others

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def names(self) -> frozenset[str]:
        return frozenset((self.served, *self.aliases, *self.adapters))

    def shares_with(self, other: NameClaim) -> bool:
        """Whether both may serve their names side by side: one served name, both weighted."""
        return self.served == other.served and self.weight is not None and other.weight is not None

    @classmethod
    def of(cls, md: ModelDeployment, created: int) -> NameClaim:
        spec = md.spec
        return cls(md.metadata.namespace, md.metadata.name, md.served_name, tuple(spec.model.aliases),
                   spec.routing.weight, created, tuple(a.name for a in spec.adapters))  # fmt: skip


def settle_names(claims: Sequence[NameClaim]) -> dict[tuple[str, str], NameClaim | None]:
    """Who serves which name: for each claim, None if it serves its names, else the claim that
    holds one of them first. The oldest claim wins (then namespace and name, so two objects
    created in the same second still settle the same way everywhere); a newer one is refused
    when any of its names (served name or alias) is already held, unless the two share a
    served name and both set spec.routing.weight."""
    held: dict[str, list[NameClaim]] = {}
    out: dict[tuple[str, str], NameClaim | None] = {}
    for claim in sorted(claims, key=lambda c: (c.created, c.namespace, c.name)):
        holder = next((h for n in sorted(claim.names) for h in held.get(n, []) if not claim.shares_with(h)), None)
        out[claim.key] = holder
        if holder is None:
            for n in claim.names:
                held.setdefault(n, []).append(claim)
    return out


def created_seconds(timestamp: str | None) -> int:
    """metadata.creationTimestamp (RFC 3339) as seconds since the epoch; 0 when absent."""
    if not timestamp:
        return 0
    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())


def _plain(value: Any) -> Any:
    """Deep-copy kopf's read-only views (Body, Spec...) into plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
