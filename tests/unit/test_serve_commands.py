"""`modelfleet serve`: what its vLLM and own-engine replicas are told (adapters, tracing)."""

from __future__ import annotations

import pytest

from modelfleet import engines
from modelfleet.cli import build_parser
from modelfleet.serve import WorkerProcess, gateway_settings, worker_command


def serve_args(*extra: str):
    return build_parser().parse_args(["serve", "--lora-modules", "sql=/adapters/sql", *extra])


def test_the_own_worker_gets_the_adapters() -> None:
    command = worker_command("demo", "/models/demo", 9001, serve_args())
    assert command[command.index("--lora-modules") + 1] == "sql=/adapters/sql"


def test_vllm_gets_lora_enabled_and_the_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "find_vllm_python", lambda: "/vllm/bin/python")
    command = worker_command("demo", "/models/demo", 9001, serve_args("--engine", "vllm", "--max-loras", "2"))
    assert "--enable-lora" in command
    assert command[command.index("--max-loras") + 1] == "2"
    assert "--lora-modules=sql=/adapters/sql" in command


def test_vllm_traces_when_serve_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM records spans only with --otlp-traces-endpoint; serve's replicas get it from the
    OTEL_* environment serve itself traces by."""
    monkeypatch.setattr(engines, "find_vllm_python", lambda: "/vllm/bin/python")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    command = worker_command("demo", "/models/demo", 9001, serve_args("--engine", "vllm"))
    assert command[command.index("--otlp-traces-endpoint") + 1] == "http://127.0.0.1:4318/v1/traces"


def test_an_adapter_path_with_a_comma_reaches_vllm_in_its_json_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM splits NAME=PATH values at commas; the JSON form keeps such a path whole."""
    monkeypatch.setattr(engines, "find_vllm_python", lambda: "/vllm/bin/python")
    args = build_parser().parse_args(["serve", "--engine", "vllm", "--lora-modules",
                                      '{"name": "odd", "path": "/adapters/a,b"}'])
    command = worker_command("demo", "/models/demo", 9001, args)
    assert '--lora-modules={"name": "odd", "path": "/adapters/a,b"}' in command


def test_serve_holds_requests_longer_than_a_bare_gateway_while_its_workers_start() -> None:
    """serve starts its workers with the gateway: a request in the first minutes waits for them
    (vLLM alone takes one to two minutes on a small CPU) rather than getting a 503 at 60 s."""
    gateway = build_parser().parse_args(["gateway", "--backend", "m=http://127.0.0.1:1"])
    workers = [WorkerProcess("chat", i, f"http://127.0.0.1:{9000 + i}", None) for i in range(2)]
    settings = gateway_settings(build_parser().parse_args(["serve"]), workers)
    assert settings.hold_timeout == 300 > gateway.hold_timeout
    assert settings.backends == {"chat": ["http://127.0.0.1:9000", "http://127.0.0.1:9001"]}
    assert gateway_settings(build_parser().parse_args(["serve", "--hold-timeout", "20"]), workers).hold_timeout == 20


def test_kv_cache_memory_sizes_vllms_cache_and_keeps_the_cpu_variable_from_overriding_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One flag for both engines. On CPU, vLLM lets VLLM_CPU_KVCACHE_SPACE override
    --kv-cache-memory-bytes, so a replica whose arguments size its cache gets no such variable."""
    monkeypatch.setattr(engines, "find_vllm_python", lambda: "/vllm/bin/python")
    sized = worker_command("demo", "/models/demo", 9001, serve_args("--engine", "vllm", "--kv-cache-memory", "0.25"))
    assert sized[sized.index("--kv-cache-memory-bytes") + 1] == str(1 << 28)
    assert "VLLM_CPU_KVCACHE_SPACE" not in engines.vllm_env(False, server_args=sized)
    default = worker_command("demo", "/models/demo", 9001, serve_args("--engine", "vllm"))
    assert "--kv-cache-memory-bytes" not in default
    assert engines.vllm_env(False, server_args=default)["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "VLLM_CPU_KVCACHE_SPACE" not in engines.vllm_env(False, server_args=["--kv-cache-memory-bytes=1000"])
