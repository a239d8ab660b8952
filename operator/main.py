"""`modelfleet operator`: parse options, build the dependencies, run kopf until stopped.

The only place in the operator that reads the command line, the environment (through the
kubeconfig loader) or starts servers; everything below it receives what it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import re
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

import kopf

from modelfleet import labels

from .adapters import AdapterSync
from .config import EndpointPicker, OperatorConfig
from .handlers import Deps, register
from .inference_pool import INFERENCE_POOL
from .load import make_http_probe, no_probe
from .metrics import OperatorMetrics
from .resync import Peering

log = logging.getLogger("modelfleet.operator")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelfleet operator",
        description="Run the ModelDeployment operator (kopf) against the current kubeconfig or in-cluster account.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="namespace to watch (repeatable; globs allowed)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    p.add_argument(
        "--standalone", action="store_true", help="no peering: do not coordinate with other operator replicas"
    )
    p.add_argument(
        "--peering",
        default=None,
        help="kopf peering object that replicas elect a leader through (required to exist; operator/peering.yaml "
        "installs 'modelfleet'). Default: use the peering named 'default' if present, else run standalone",
    )
    p.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; the highest runs, others wait (default: random)",
    )
    p.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint URL ('' to disable)"
    )
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0 to disable)")
    p.add_argument("--metrics-host", default="0.0.0.0")
    p.add_argument(
        "--default-image",
        default=OperatorConfig.default_image,
        help="worker image when spec.engine.image is unset",
    )
    p.add_argument(
        "--vllm-image",
        default=OperatorConfig.vllm_image,
        help="image for spec.engine.kind vllm when spec.engine.image is unset",
    )
    p.add_argument(
        "--vllm-cpu-kv-cache-gib",
        type=int,
        default=OperatorConfig.vllm_cpu_kv_cache_gib,
        help="KV cache of vLLM replicas without a GPU (VLLM_CPU_KVCACHE_SPACE)",
    )
    p.add_argument(
        "--image-pull-policy",
        default=OperatorConfig.default_image_pull_policy,
        choices=["Always", "IfNotPresent", "Never"],
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=OperatorConfig.resync_seconds,
        help="reconcile every object this often",
    )
    p.add_argument(
        "--drain-seconds",
        type=int,
        default=OperatorConfig.drain_seconds,
        help="preStop sleep before a worker stops",
    )
    p.add_argument(
        "--host-path-models", action="store_true", help="mount file:// sources from the node (hostPath)"
    )
    p.add_argument(
        "--no-scrape",
        action="store_true",
        help="do not read workers' /metrics (autoscaling then sees only demand)",
    )
    p.add_argument(
        "--inference-pool-epp",
        default=None,
        metavar="NAME:PORT",
        help="render a Gateway API Inference Extension InferencePool per ModelDeployment, naming this endpoint "
        "picker Service ({name} becomes the ModelDeployment's name, e.g. {name}-epp:9002); needs the "
        "InferencePool CRD (inference.networking.k8s.io/v1)",
    )
    p.add_argument(
        "--worker-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every worker (repeatable), e.g. the OTEL_* tracing settings",
    )
    p.add_argument("--workers", type=int, default=8, help="reconciles that may run at once")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true")
    verbosity.add_argument("-q", "--quiet", action="store_true")
    return p


def _env_pair(value: str) -> tuple[str, str]:
    name, sep, val = value.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, val


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    if args.resync_seconds <= 0:
        raise ValueError("--resync-seconds must be positive")
    return OperatorConfig(
        default_image=args.default_image,
        default_image_pull_policy=args.image_pull_policy,
        vllm_image=args.vllm_image,
        vllm_cpu_kv_cache_gib=args.vllm_cpu_kv_cache_gib,
        resync_seconds=args.resync_seconds,
        drain_seconds=args.drain_seconds,
        host_path_models=args.host_path_models,
        scrape_workers=not args.no_scrape,
        worker_env=tuple(args.worker_env),
        endpoint_picker=EndpointPicker.parse(args.inference_pool_epp) if args.inference_pool_epp else None,
    )


def kopf_settings(args: argparse.Namespace) -> kopf.OperatorSettings:
    """kopf's settings: bookkeeping under our prefix, our name on Events, bounded workers."""
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=labels.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=labels.KOPF_PREFIX)
    settings.persistence.finalizer = f"{labels.KOPF_PREFIX}/finalizer"
    settings.posting.reporting_component = labels.FIELD_MANAGER
    # Our own Events say what changed; kopf's would repeat every handler log line.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = args.workers
    return settings


def build_registry(deps: Deps, peering: Peering | None = None) -> kopf.OperatorRegistry:
    """A fresh registry with our handlers and a login through the kubernetes client.

    kopf adds that login itself only to its process-wide default registry, which we do not use.
    """
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry, id="login")(kopf.login_via_client)
    register(registry, deps, peering)
    return registry


def _check_bindable(url: str) -> None:
    """Fail before kopf starts (which would log a traceback) if the liveness port is taken."""
    parsed = urlsplit(url)
    if parsed.scheme != "http" or not parsed.port:
        raise ValueError("expected http://HOST:PORT/PATH")
    with socket.socket(socket.AF_INET6 if ":" in (parsed.hostname or "") else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((parsed.hostname or "0.0.0.0", parsed.port))


def _check_served(dynamic, kind: tuple[str, str]) -> None:  # pragma: no cover - needs a cluster
    """Fail at start-up, naming the CRD, rather than on every reconcile's apply."""
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    try:
        dynamic.resources.get(api_version=kind[0], kind=kind[1])
    except ResourceNotFoundError:
        raise ValueError(
            f"--inference-pool-epp: the API server does not serve {kind[1]} ({kind[0]}); install the "
            "Gateway API Inference Extension's CRDs first"
        ) from None


def _kube_client():  # pragma: no cover - needs a cluster or kubeconfig
    """A DynamicClient from the in-cluster account, else the kubeconfig (KUBECONFIG)."""
    from kubernetes.dynamic import DynamicClient

    from modelfleet.kubeconfig import api_client

    return DynamicClient(api_client())


def run(argv: Sequence[str]) -> int:
    """Entry point for `modelfleet operator ARGS`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf logs every handler success at INFO: with a resync timer that is a line per
        # object every few seconds. Failures still show (WARNING and up).
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        # httpx logs each /metrics scrape at INFO: a line per ready worker per resync.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
        from .kube import Kube

        dynamic = _kube_client()
        if config.endpoint_picker is not None:
            _check_served(dynamic, INFERENCE_POOL)
        kube = Kube(dynamic)
    except Exception as exc:  # noqa: BLE001 - one clear line, as every command does (docs/cli.md)
        print(f"modelfleet operator: {exc}", file=sys.stderr)
        return 2

    if args.liveness:
        try:
            _check_bindable(args.liveness)
        except (OSError, ValueError) as exc:
            print(f"modelfleet operator: liveness endpoint {args.liveness}: {exc}", file=sys.stderr)
            return 2
    metrics = OperatorMetrics()
    if args.metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.registry)
        except OSError as exc:
            print(f"modelfleet operator: metrics port {args.metrics_port}: {exc}", file=sys.stderr)
            return 2

    probe = (
        make_http_probe(config.worker_port, config.scrape_timeout_seconds)
        if config.scrape_workers
        else no_probe
    )
    deps = Deps(
        kube=kube, config=config, probe=probe, metrics=metrics, clock=lambda: datetime.now(UTC),
        adapters=AdapterSync(),
    )
    namespaces = tuple(args.namespace)
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    peering = Peering(standalone=args.standalone, priority=priority, name=args.peering, clusterwide=not namespaces)
    registry = build_registry(deps, peering)
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                settings=kopf_settings(args),
                standalone=args.standalone,
                priority=priority,
                peering_name=args.peering,
                liveness_endpoint=args.liveness or None,
                clusterwide=not namespaces,
                namespaces=namespaces,
            )
        )
    except KeyboardInterrupt:
        return 0
    except OSError as exc:  # the liveness port in use, most often
        print(f"modelfleet operator: {exc}", file=sys.stderr)
        return 2
    return 0
