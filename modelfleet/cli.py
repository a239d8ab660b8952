"""`modelfleet serve|worker|gateway|operator`: the only place that reads argv and the environment.

Every command exits non-zero with one clear line on stderr for bad arguments, a missing model
directory or a port in use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status `exit_code` (1 unless said)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the usage itself is under --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(frozen=True)
class WorkerSettings:
    """`modelfleet worker`'s settings, and the one home of its command line: `to_args` writes it
    (for the operator's pods and `modelfleet serve`'s children), the `worker` parser below reads
    it back (`worker_settings`), with these defaults. Here rather than in worker/app.py so that
    the operator can write it without importing the model stack."""

    source: str
    served_names: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # vLLM's default for its CPU build's server; see worker/chunked.py
    drain_timeout: float = 30.0
    enable_prefix_caching: bool = True
    prefix_cache_gib: float = 1.0
    kv_cache_gib: float | None = None  # None: sized from free memory (kvcache.default_kv_cache_bytes)
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path) of LoRA adapters loaded at start
    max_loras: int = 4  # LoRA adapters held at once
    max_lora_rank: int = 16
    prepack_weights: bool = True  # linear layers on oneDNN-packed weights (worker/fastlinear.py)

    def to_args(self) -> list[str]:
        """The `modelfleet worker` arguments for these settings. Where the worker runs, device,
        dtype and the drain timeout are always written; the engine's tuning only when it differs
        from the default, so that a pod's command line shows what its spec asked for."""
        args = ["--model", self.source, *[a for name in self.served_names for a in ("--served-name", name)],
                "--host", self.host, "--port", str(self.port), "--device", self.device, "--dtype", self.dtype,
                "--drain-timeout", _number(self.drain_timeout)]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_seqs != _DEFAULTS.max_num_seqs:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.max_num_batched_tokens != _DEFAULTS.max_num_batched_tokens:
            args += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.enable_prefix_caching != _DEFAULTS.enable_prefix_caching:
            args.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        if self.prefix_cache_gib != _DEFAULTS.prefix_cache_gib:
            args += ["--prefix-cache-gib", _number(self.prefix_cache_gib)]
        if self.kv_cache_gib is not None:
            args += ["--kv-cache-memory", _number(self.kv_cache_gib)]
        for name, path in self.lora_modules:
            args += ["--lora-modules", lora_module_arg(name, path)]
        if self.max_loras != _DEFAULTS.max_loras:
            args += ["--max-loras", str(self.max_loras)]
        if self.max_lora_rank != _DEFAULTS.max_lora_rank:
            args += ["--max-lora-rank", str(self.max_lora_rank)]
        if self.prepack_weights != _DEFAULTS.prepack_weights:
            args.append("--prepack-weights" if self.prepack_weights else "--no-prepack-weights")
        return args


_DEFAULTS = WorkerSettings(source="", served_names=[])


def lora_module_arg(name: str, path: str) -> str:
    """One --lora-modules value, as both engines parse it: vLLM's NAME=PATH, or its JSON form
    where a comma in the path would not parse (inverse of _lora_module)."""
    return f"{name}={path}" if "," not in path else json.dumps({"name": name, "path": path})


def _number(value: float) -> str:
    """30 and 30.0 as "30" (a grace period in a pod spec is whole seconds), 0.5 as "0.5"."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default=_DEFAULTS.device)
    group.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=_DEFAULTS.dtype)
    group.add_argument("--max-model-len", type=_positive, default=_DEFAULTS.max_model_len,
                       help="context length (default: model's)")
    group.add_argument("--max-num-seqs", type=_positive, default=_DEFAULTS.max_num_seqs,
                       help="sequences in the running batch")
    group.add_argument("--max-num-batched-tokens", type=_positive, default=_DEFAULTS.max_num_batched_tokens,
                       help="tokens one engine step computes: a decode token per running sequence, then "
                       "prompt tokens; longer prompts are prefilled in chunks (vLLM's meaning)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=_DEFAULTS.enable_prefix_caching,
                       help="reuse the KV of prompt prefixes that earlier requests computed")
    group.add_argument("--prefix-cache-gib", type=float, default=_DEFAULTS.prefix_cache_gib, metavar="GIB",
                       help="memory for cached prefix blocks")
    group.add_argument("--kv-cache-memory", type=_positive_float, default=_DEFAULTS.kv_cache_gib, metavar="GIB",
                       help="memory for the running sequences' KV; requests wait when it is full "
                            "(default: 40%% of the memory free at start-up, at most 32; with --engine vllm: "
                            "its --kv-cache-memory-bytes, default 2 GiB on CPU)")
    group.add_argument("--lora-modules", nargs="+", action="extend", type=_lora_module, default=[],
                       metavar="NAME=PATH", help="LoRA adapters to serve from the start, each under its own "
                       "model name (vLLM's: NAME=PATH or JSON {\"name\": ..., \"path\": ...}; repeatable); "
                       "more load at runtime through POST /v1/load_lora_adapter")
    group.add_argument("--max-loras", type=_positive, default=_DEFAULTS.max_loras,
                       help="LoRA adapters held at once")
    group.add_argument("--max-lora-rank", type=_positive, default=_DEFAULTS.max_lora_rank,
                       help="the largest LoRA rank an adapter may have")
    group.add_argument("--prepack-weights", action=argparse.BooleanOptionalAction,
                       default=_DEFAULTS.prepack_weights,
                       help="on a CPU, run the model's linear layers on weights packed once for oneDNN "
                            "(each held once; a tied LM head on a packed copy), Llama-family RMSNorms fused and "
                            "their bfloat16 decode steps as one function; off: the model as transformers runs it")


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options (`worker`'s and `serve`'s) as WorkerSettings fields."""
    return {"device": args.device, "dtype": args.dtype, "max_model_len": args.max_model_len,
            "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "enable_prefix_caching": args.enable_prefix_caching, "prefix_cache_gib": args.prefix_cache_gib,
            "kv_cache_gib": args.kv_cache_memory, "lora_modules": tuple(args.lora_modules),
            "max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank,
            "prepack_weights": args.prepack_weights}


def worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """Parsed `modelfleet worker` arguments -> its settings (the inverse of WorkerSettings.to_args)."""
    names = [n for raw in args.served_name for n in raw.split(",") if n]
    if not names:
        names = [os.path.basename(args.model.rstrip("/")) or "model"]
    return WorkerSettings(source=args.model, served_names=names, host=args.host, port=args.port,
                          drain_timeout=args.drain_timeout, **engine_settings(args))


def _lora_module(text: str) -> tuple[str, str]:
    """One --lora-modules value as (name, path): vLLM's NAME=PATH, or its JSON object form."""
    if "=" in text and "," not in text and not text.lstrip().startswith("{"):
        name, _, path = text.partition("=")
    else:
        try:
            item = json.loads(text)
            name, path = item["name"], item["path"]
        except (ValueError, TypeError, KeyError):
            raise argparse.ArgumentTypeError(
                f'expected NAME=PATH or {{"name": ..., "path": ...}}, got {text!r}') from None
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise argparse.ArgumentTypeError(f"expected a non-empty name and path, got {text!r}")
    return name, path


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _float(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 <= value if allow_zero else 0 < value) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number {'>=' if allow_zero else '>'} 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _float(text, allow_zero=False)


def _non_negative_float(text: str) -> float:
    return _float(text, allow_zero=True)


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"ports go up to 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="modelfleet", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("MODELFLEET_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("MODELFLEET_LOG_FORMAT"),
                        help="default: json for the gateway, text otherwise")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="local all-in-one serving: workers plus a gateway")
    serve.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                       help="a model to serve (repeatable); default: MiniLM and the demo chat model")
    serve.add_argument("--replicas", type=_positive, default=1, help="worker processes per model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--api-keys", metavar="FILE", default=None)
    # Longer than the gateway's 60 s: serve starts its workers with the gateway, and vLLM's start
    # alone takes one to two minutes on a small CPU; a worker that dies stops serve itself.
    serve.add_argument("--hold-timeout", type=_non_negative_float, default=300.0, metavar="SECONDS",
                       help="how long a request waits for a worker that is still starting (then 503)")
    serve.add_argument("--engine", choices=["modelfleet", "vllm"], default="modelfleet",
                       help="modelfleet's own worker, or vLLM's OpenAI server (see `make vllm`)")
    serve.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                       help="with --engine vllm: an extra vLLM server argument (repeatable, e.g. --vllm-arg=--enforce-eager)")
    _engine_options(serve)

    worker = sub.add_parser("worker", help="serve one model")
    worker.add_argument("--model", required=True, metavar="SOURCE")
    worker.add_argument("--served-name", action="append", default=[], metavar="NAME",
                        help="name clients use (repeat or comma-separate for aliases)")
    worker.add_argument("--host", default=_DEFAULTS.host)
    worker.add_argument("--port", type=_port, default=_DEFAULTS.port)
    worker.add_argument("--drain-timeout", type=float, default=_DEFAULTS.drain_timeout,
                        help="seconds to finish in-flight requests after SIGTERM")
    _engine_options(worker)

    gateway = sub.add_parser("gateway", help="the OpenAI front door")
    gateway.add_argument("--discovery", choices=["static", "kubernetes"], default="static")
    gateway.add_argument("--backend", action="append", default=[], metavar="NAME=URL")
    gateway.add_argument("--api-keys", metavar="FILE", default=None)
    gateway.add_argument("--namespace", action="append", default=[], metavar="NS",
                         help="kubernetes: watch ModelDeployments here (repeatable; default: all namespaces)")
    gateway.add_argument("--key-namespace", default=None, metavar="NS",
                         help="kubernetes: namespace of API-key Secrets (default: the gateway's own)")
    gateway.add_argument("--gateway-service", default=None, metavar="NAME",
                         help="kubernetes: the gateway's own Service, to share rate limits between replicas")
    gateway.add_argument("--first-byte-timeout", type=float, default=15.0, metavar="SECONDS",
                         help="a streamed request whose replica sends nothing for this long moves to another")
    gateway.add_argument("--hold-timeout", type=float, default=60.0, metavar="SECONDS",
                         help="static: how long a request waits for a backend that is still starting")
    gateway.add_argument("--max-inflight-per-replica", type=_positive, default=256, metavar="N",
                         help="requests in flight per ready replica before a burst gets 503 at once")
    gateway.add_argument("--responses-ttl", type=_non_negative_float, default=86400.0, metavar="SECONDS",
                         help="keep stored Responses (store: true, the default) this long; 0: storing off")
    gateway.add_argument("--responses-max", type=_positive, default=10000, metavar="N",
                         help="stored Responses kept at most; past it the soonest to expire go first")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=_port, default=8000)

    fetch = sub.add_parser("fetch", help="copy a model's files into a directory, printing progress "
                                         "(the operator's weight-cache fill Job runs it)")
    fetch.add_argument("source", metavar="SOURCE", help="hf://[org/]name[@revision], file:///abs/path or a path")
    fetch.add_argument("dest", metavar="DEST", help="directory to fill (made if missing)")

    sub.add_parser("operator", help="the ModelDeployment operator (kopf options follow)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["operator"]:
        from modelfleet.operator.main import run

        return run(argv[1:])
    args = build_parser().parse_args(argv)
    from .logs import configure

    configure(args.log_level, args.log_format or ("json" if args.command == "gateway" else "text"))
    try:
        if args.command == "worker":
            return run_worker(args)
        if args.command == "gateway":
            return run_gateway(args)
        if args.command == "serve":
            from .serve import run_serve

            return run_serve(args)
        if args.command == "fetch":
            return run_fetch(args)
    except CommandError as exc:
        print(f"modelfleet {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 2


def run_worker(args: argparse.Namespace) -> int:
    from modelfleet.netutil import PortInUseError
    from modelfleet.worker.app import serve
    from modelfleet.worker.loader import ModelSourceError

    try:
        serve(worker_settings(args))
    except (ModelSourceError, PortInUseError) as exc:
        raise CommandError(str(exc)) from None
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    """`modelfleet fetch`: any failure is one line (the fill pod's last, which its termination
    message and so the ModelDeployment's status show); one no retry can mend exits with
    UNFETCHABLE_EXIT, on which the fill Job stops retrying."""
    from modelfleet.worker.fetch import UNFETCHABLE_EXIT, fetch, unfetchable
    from modelfleet.worker.loader import ModelSourceError

    try:
        fetch(args.source, args.dest)
    except ModelSourceError as exc:  # already one line naming the hub's error
        raise CommandError(str(exc)[:400], UNFETCHABLE_EXIT if unfetchable(exc) else 1) from None
    except Exception as exc:  # noqa: BLE001 - network and disk errors alike, as one line
        # Some errors span lines; the status shows one.
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise CommandError(f"cannot fetch {args.source}: {type(exc).__name__}: {text[:400]}") from None
    return 0


def build_gateway(settings):
    """The gateway app, with a key file's problems reported as one line."""
    from modelfleet.gateway.app import create_app
    from modelfleet.gateway.auth import KeyFileError

    if settings.api_keys is not None and not settings.api_keys.is_file():
        raise CommandError(f"--api-keys {settings.api_keys}: no such file")
    try:
        return create_app(settings)
    except (KeyFileError, OSError, ValueError) as exc:
        raise CommandError(f"--api-keys {settings.api_keys}: {exc}") from None


def run_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from modelfleet.gateway.app import GatewaySettings
    from modelfleet.gateway.static import parse_backends
    from modelfleet.http import GuardedHttpToolsProtocol
    from modelfleet.netutil import PortInUseError, bind_socket

    if args.discovery == "kubernetes" and args.backend:
        raise CommandError("--backend goes with --discovery static")
    try:
        backends = parse_backends(args.backend)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        sock = bind_socket(args.host, args.port)
    except PortInUseError as exc:
        raise CommandError(str(exc)) from None
    app = build_gateway(GatewaySettings(host=args.host, port=args.port, backends=backends,
                                        api_keys=Path(args.api_keys) if args.api_keys else None,
                                        discovery=args.discovery, namespaces=args.namespace,
                                        key_namespace=args.key_namespace, gateway_service=args.gateway_service,
                                        first_byte_timeout=args.first_byte_timeout,
                                        hold_timeout=args.hold_timeout,
                                        max_inflight_per_replica=args.max_inflight_per_replica,
                                        responses_ttl=args.responses_ttl, responses_max=args.responses_max))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            http=GuardedHttpToolsProtocol)  # bounds slow and huge request heads
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: other modules raise
    # modelfleet.cli.CommandError, which a second copy of this module would not catch.
    from modelfleet.cli import main as _main

    sys.exit(_main())
