"""`modelfleet serve`: the cluster's topology on one machine.

One worker process per model replica, and a gateway with static discovery in this process in
front of them. Workers are children of this process: Ctrl-C or SIGTERM stops all of them, and a
worker that dies is reported and the whole command ends, since a silent half-working server would
be worse.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from .cli import CommandError, WorkerSettings, engine_settings, lora_module_arg
from .netutil import PortInUseError, bind_socket, free_port

if TYPE_CHECKING:
    from .gateway.app import GatewaySettings


@dataclass
class WorkerProcess:
    name: str
    replica: int
    url: str
    process: subprocess.Popen
    ready_path: str = "/ready"  # vLLM's server has only /health

    @property
    def label(self) -> str:
        return f"{self.name}#{self.replica}"


def default_models(engine: str = "modelfleet") -> list[tuple[str, str]]:
    from .demo import VLLM_DEMO_SPEC, DemoSpec, ensure_demo_model, minilm_path

    print("modelfleet serve: preparing the embedded default models", file=sys.stderr, flush=True)
    # vLLM's CPU attention needs a head size of at least 32, which the smallest demo lacks.
    spec = VLLM_DEMO_SPEC if engine == "vllm" else DemoSpec()
    return [("all-MiniLM-L6-v2", str(minilm_path())), ("tiny-chat", str(ensure_demo_model(spec)))]


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    models = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise CommandError(f"--model takes NAME=SOURCE, got {spec!r}")
        models.append((name, source))
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise CommandError("each --model needs a distinct NAME")
    return models


def worker_command(name: str, source: str, port: int, args: argparse.Namespace,
                   environ: Mapping[str, str] = os.environ) -> list[str]:
    """One replica's command line: modelfleet's worker, or vLLM's OpenAI server, which traces
    when the replica's environment `environ` says so."""
    if args.engine != "vllm":
        settings = WorkerSettings(source=source, served_names=[name], host="127.0.0.1", port=port,
                                  **engine_settings(args))
        return [sys.executable, "-m", "modelfleet", "--log-level", args.log_level, "worker", *settings.to_args()]
    from .engines import VLLM_SERVER_MODULE, VllmServer, detect_task, find_vllm_python, vllm_tracing
    from .sources import parse_model_source

    python = find_vllm_python()
    assert python is not None  # checked before anything started
    parsed = parse_model_source(source)  # check_sources parsed it already
    model, revision = (parsed.repo, parsed.revision) if parsed.scheme == "hf" else (parsed.path or source, None)
    server = VllmServer(model=model, revision=revision, served_names=[name], host="127.0.0.1", port=port,
                        dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        task=detect_task(model) if revision is None and os.path.isdir(model) else "auto",
                        drain_seconds=DRAIN_SECONDS,
                        max_loras=args.max_loras if args.lora_modules else None, max_lora_rank=args.max_lora_rank,
                        otlp_traces_endpoint=vllm_tracing(environ)[0],
                        kv_cache_bytes=None if args.kv_cache_memory is None else int(args.kv_cache_memory * 2**30),
                        extra_args=[*(f"--lora-modules={lora_module_arg(n, p)}" for n, p in args.lora_modules),
                                    *args.vllm_arg])
    # -P: never import from the current directory (a checkout's operator/ would shadow the stdlib's).
    return [python, "-P", "-m", VLLM_SERVER_MODULE, *server.args()]


def start_workers(models: list[tuple[str, str]], replicas: int, args: argparse.Namespace) -> list[WorkerProcess]:
    from .engines import vllm_env, vllm_tracing

    workers = []
    for name, source in models:
        for replica in range(replicas):
            port = free_port()
            # Workers share 2-core machines with each other: keep torch from oversubscribing.
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, len(models)))))
            cmd = worker_command(name, source, port, args, env)
            if args.engine == "vllm":
                env = {**vllm_env(args.device == "cuda", server_args=cmd), **vllm_tracing(env)[1], **env}
                if not source.startswith("hf://"):
                    env["HF_HUB_OFFLINE"] = "1"  # a local model: nothing to ask the hub
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
            workers.append(WorkerProcess(name, replica, f"http://127.0.0.1:{port}", proc,
                                         "/health" if args.engine == "vllm" else "/ready"))
    return workers


def die_with_parent() -> None:
    """In the child: the kernel sends SIGTERM if `serve` dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


DRAIN_SECONDS = 8  # a stopping replica finishes its requests this long, within stop_workers' grace


def stop_workers(workers: list[WorkerProcess], grace: float = 10.0) -> None:
    for w in workers:
        if w.process.poll() is None:
            w.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for w in workers:
        try:
            w.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.process.kill()
            w.process.wait()


def check_sources(models: list[tuple[str, str]]) -> None:
    from .sources import ModelSourceError, parse_model_source
    from .worker.loader import local_model_dir

    for name, source in models:
        try:
            if parse_model_source(source).scheme != "hf":  # hf://: downloaded by the worker itself
                local_model_dir(source)
        except ModelSourceError as exc:
            raise CommandError(f"model {name}: {exc}") from None


async def watch(workers: list[WorkerProcess], server) -> None:
    """Reports each worker once it is ready, and stops everything if one dies."""
    pending = {w.label: w for w in workers}
    async with httpx.AsyncClient(timeout=2.0) as client:
        while not server.should_exit:
            for w in workers:
                code = w.process.poll()
                if code is not None:
                    print(f"modelfleet serve: error: worker {w.label} exited with status {code}", file=sys.stderr,
                          flush=True)
                    server.exit_code = 1
                    server.should_exit = True
                    return
            for label, w in list(pending.items()):
                try:
                    if (await client.get(w.url + w.ready_path)).status_code == 200:
                        print(f"modelfleet serve: {label} ready", file=sys.stderr, flush=True)
                        del pending[label]
                        if not pending:
                            print(f"modelfleet serve: all models ready at {server.public_url}", file=sys.stderr,
                                  flush=True)
                except httpx.HTTPError:
                    pass
            await asyncio.sleep(0.3 if pending else 1.0)


def gateway_settings(args: argparse.Namespace, workers: list[WorkerProcess]) -> GatewaySettings:
    """The gateway in front of serve's workers: static discovery of each model's replicas, and
    serve's own hold bound (requests wait for workers that start with the gateway)."""
    from .gateway.app import GatewaySettings

    backends: dict[str, list[str]] = {}
    for w in workers:
        backends.setdefault(w.name, []).append(w.url)
    return GatewaySettings(host=args.host, port=args.port, backends=backends, hold_timeout=args.hold_timeout,
                           api_keys=Path(args.api_keys) if args.api_keys else None)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from modelfleet.http import GuardedHttpToolsProtocol

    from .cli import build_gateway

    try:
        sock = bind_socket(args.host, args.port)
    except PortInUseError as exc:
        raise CommandError(str(exc)) from None
    if args.engine == "vllm":
        from .engines import MISSING_VLLM, find_vllm_python

        if find_vllm_python() is None:
            raise CommandError(MISSING_VLLM)
    models = parse_models(args.model) if args.model else default_models(args.engine)
    if args.lora_modules and len(models) > 1:
        # An adapter fits one base model; the worker command line has no way to say which.
        raise CommandError("--lora-modules needs exactly one --model (an adapter is made for one base model)")
    check_sources(models)
    workers = start_workers(models, args.replicas, args)
    settings = gateway_settings(args, workers)
    try:
        app = build_gateway(settings)
    except CommandError:
        stop_workers(workers)
        raise

    class ServeServer(uvicorn.Server):
        exit_code = 0
        public_url = f"http://{args.host}:{args.port}"

        async def serve(self, sockets=None) -> None:
            watcher = asyncio.create_task(watch(workers, self))
            try:
                await super().serve(sockets)
            finally:
                watcher.cancel()

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            http=GuardedHttpToolsProtocol)  # bounds slow and huge request heads
    server = ServeServer(config)
    print(f"modelfleet serve: gateway on http://{args.host}:{args.port}, loading {len(workers)} worker(s)",
          file=sys.stderr, flush=True)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default handler
    # that would end this process before `finally` stops the workers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(server.exit_code))
    try:
        server.run(sockets=[sock])
    finally:
        stop_workers(workers)
    return server.exit_code
