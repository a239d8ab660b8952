"""The gateways users would pick instead of ours, for bench/gateway_overhead.py: vLLM's router
(PyPI `vllm-router`, a Rust binary) and the LiteLLM proxy, each in a virtualenv of its own
under `${MODELFLEET_CACHE:-~/.cache/modelfleet}/bench-peers/NAME`, never in the project's
environment (LiteLLM alone pins dozens of packages the project does not want).

A peer that cannot be installed or started is skipped with a message saying why; the bench
measures the others.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from modelfleet.demo import cache_dir


@dataclass(frozen=True)
class Peer:
    name: str
    requirement: str  # what pip installs: pinned where a release was checked
    executable: str


VLLM_ROUTER = Peer("vllm-router", "vllm-router==0.1.17", "vllm-router")  # the release measured in README.md
# 1.80.0 installs and works here; a later LiteLLM release was reported compromised on PyPI, so
# the pin moves only to a release someone has checked.
LITELLM = Peer("litellm", "litellm[proxy]==1.80.0", "litellm")
PEERS = (VLLM_ROUTER, LITELLM)


def peers_dir() -> Path:
    return cache_dir() / "bench-peers"


def install(peer: Peer) -> Path | None:
    """The peer's executable, installed on first use with pip's progress shown; None (after
    saying why) if the install fails. A marker holding the requirement makes later runs free,
    and a changed pin reinstalls."""
    venv = peers_dir() / peer.name
    exe, marker = venv / "bin" / peer.executable, venv / ".modelfleet-installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(peers_dir() / f".{peer.name}.lock", "w") as lock:  # two bench runs, one venv
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.exists() and marker.exists() and marker.read_text() == peer.requirement:
            return exe
        print(f"installing {peer.requirement} into {venv} (once)", flush=True)
        steps = ([sys.executable, "-m", "venv", "--clear", str(venv)],
                 ["nice", "-n", "10", str(venv / "bin" / "python"), "-m", "pip", "install",
                  "--progress-bar", "on", peer.requirement])
        for step in steps:
            code = subprocess.call(step, cwd=peers_dir())  # not the repo root, whose operator/ shadows the stdlib's
            if code != 0:
                print(f"SKIPPING {peer.name}: `{' '.join(step[-4:])}` failed with exit {code} (output above); "
                      "the bench goes on without it", flush=True)
                return None
        if not exe.exists():
            print(f"SKIPPING {peer.name}: {exe} is missing after the install", flush=True)
            return None
        marker.write_text(peer.requirement)
    return exe


def router_command(exe: Path, port: int, metrics_port: int, backend: str) -> list[str]:
    """vllm-router in front of one worker, round robin; its Prometheus listener gets a port of
    its own (its default, 29000, would collide between runs)."""
    return [str(exe), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", backend,
            "--policy", "round_robin", "--prometheus-port", str(metrics_port), "--log-level", "warning"]


def litellm_config(backend: str, model: str) -> str:
    """One model through LiteLLM's `openai/` provider: any OpenAI-compatible server."""
    return (f"model_list:\n  - model_name: {model}\n    litellm_params:\n      model: openai/{model}\n"
            f"      api_base: {backend}/v1\n      api_key: none\n"
            "litellm_settings:\n  telemetry: false\n  drop_params: true\n")


def litellm_command(exe: Path, port: int, config: Path) -> list[str]:
    return [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]


def litellm_env() -> dict[str, str]:
    """No network at start (the model cost map ships in the package) and quiet logs."""
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
            "PYTHONPATH": ""}
