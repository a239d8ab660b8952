"""Operator settings: one typed value object, built once at start-up and passed in.

Nothing here reads the environment or the command line; `main.py` does that, so tests build
settings fresh with whatever they need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelfleet.engines import VLLM_VERSION

# A Service name (DNS-1035 label), as the endpoint picker's Service must have.
_SERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class EndpointPicker:
    """The Inference Extension's endpoint picker (EPP) Service each InferencePool names.

    `name` may hold `{name}`, replaced by the ModelDeployment's name: an EPP serves one pool.
    """

    name: str
    port: int

    @classmethod
    def parse(cls, value: str) -> EndpointPicker:
        """NAME:PORT, as `--inference-pool-epp` takes it; ValueError saying what is wrong."""
        name, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected NAME:PORT with a port 1-65535, got {value!r}")
        epp = cls(name, int(port))
        if not _SERVICE_NAME.fullmatch(epp.service_name("x")):
            raise ValueError(f"{name!r} is not a Service name (lowercase letters, digits, '-'; {{name}} allowed)")
        return epp

    def service_name(self, md_name: str) -> str:
        return self.name.replace("{name}", md_name)


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator needs beyond the ModelDeployment itself."""

    # Worker image when spec.engine.image is not set.
    default_image: str = "modelfleet:latest"
    default_image_pull_policy: str = "IfNotPresent"
    # Image for spec.engine.kind vllm when spec.engine.image is not set (the chart pins one).
    vllm_image: str = f"vllm/vllm-openai:v{VLLM_VERSION}"
    # vLLM on CPU (no GPU asked for): GiB of KV cache (VLLM_CPU_KVCACHE_SPACE).
    vllm_cpu_kv_cache_gib: int = 2
    # Size of the in-memory /dev/shm that vLLM pods get.
    vllm_shm_size: str = "1Gi"
    # Port the worker listens on inside the pod (also the Service and EndpointSlice port).
    worker_port: int = 8000
    # preStop sleep: time for the gateway and kube-proxy to see the endpoint go away before the
    # worker gets SIGTERM and finishes its in-flight requests.
    drain_seconds: int = 5
    # Mount file:// sources from the node as read-only hostPath volumes. Off by default because
    # hostPath is forbidden by the baseline Pod Security Standard; on for kind-style clusters
    # whose nodes hold the models. Without it, file:// is a path inside the worker container.
    host_path_models: bool = False
    # Where pvc:// claims are mounted inside the worker container.
    pvc_mount_root: str = "/mnt/models"
    # Scratch space for hf:// downloads (an emptyDir), exported as HF_HOME.
    hf_cache_dir: str = "/var/cache/modelfleet/hf"
    # How often every ModelDeployment is reconciled even when nothing changed (drift, status).
    resync_seconds: float = 10.0
    # Scrape workers' /metrics for in-flight counts (autoscaling); the timeout per pod.
    scrape_workers: bool = True
    scrape_timeout_seconds: float = 2.0
    # Environment every worker gets, as (name, value) pairs: the chart's tracing settings
    # (OTEL_*); a ModelDeployment's own spec.engine.env wins over them.
    worker_env: tuple[tuple[str, str], ...] = ()
    # Render an InferencePool per ModelDeployment naming this EPP (operator/inference_pool.py).
    endpoint_picker: EndpointPicker | None = None
