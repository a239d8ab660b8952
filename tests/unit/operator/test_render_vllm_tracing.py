"""operator/render.py: a vLLM replica traces when the operator's --worker-env turns tracing on."""

from __future__ import annotations

from modelfleet.api import ModelDeployment
from modelfleet.operator.config import OperatorConfig
from modelfleet.operator.render import render_deployment

TRACING = OperatorConfig(worker_env=(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector.observability:4318"),
                                     ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")))


def render(engine: dict, config: OperatorConfig) -> dict:
    md = ModelDeployment.from_body({
        "apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "uid-1", "generation": 1},
        "spec": {"model": {"source": "hf://org/chat"}, "engine": engine},
    })
    (container,) = render_deployment(md, 1, config)["spec"]["template"]["spec"]["containers"]
    return container


def endpoint_flag(container: dict) -> str | None:
    args = container.get("args") or container["command"]
    return args[args.index("--otlp-traces-endpoint") + 1] if "--otlp-traces-endpoint" in args else None


def test_a_vllm_replica_gets_the_traces_flag_and_the_environment_it_needs() -> None:
    c = render({"kind": "vllm"}, TRACING)
    assert endpoint_flag(c) == "http://otel-collector.observability:4318/v1/traces"
    env = [e["name"] for e in c["env"]]
    assert len(env) == len(set(env))  # server-side apply refuses a name twice
    values = {e["name"]: e.get("value") for e in c["env"]}
    assert values["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf" and values["OTEL_SERVICE_NAME"] == "vllm"


def test_without_tracing_or_with_it_switched_off_for_one_model_vllm_gets_no_flag() -> None:
    assert endpoint_flag(render({"kind": "vllm"}, OperatorConfig())) is None
    off = render({"kind": "vllm", "env": [{"name": "OTEL_SDK_DISABLED", "value": "true"}]}, TRACING)
    assert endpoint_flag(off) is None
    assert "OTEL_SERVICE_NAME" not in {e["name"] for e in off["env"]}


def test_the_users_own_service_name_wins_and_the_own_engine_gets_no_vllm_flag() -> None:
    named = render({"kind": "vllm", "env": [{"name": "OTEL_SERVICE_NAME", "value": "chat-vllm"}]}, TRACING)
    assert [e for e in named["env"] if e["name"] == "OTEL_SERVICE_NAME"] == [{"name": "OTEL_SERVICE_NAME",
                                                                              "value": "chat-vllm"}]
    own = render({}, TRACING)
    assert endpoint_flag(own) is None and "OTEL_SERVICE_NAME" not in {e["name"] for e in own["env"]}
