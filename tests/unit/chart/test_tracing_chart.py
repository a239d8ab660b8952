"""The chart's tracing values: the gateway gets the OTEL_* environment, and the operator passes
it on to the workers it renders (through its own command line, parsed here as it parses it)."""

from __future__ import annotations

from modelfleet.api import ModelDeployment
from modelfleet.operator.main import build_parser, config_from_args
from modelfleet.operator.render import render_deployment
from modelfleet.tracing import enabled

TRACING = {"tracing.otlpEndpoint": "http://otel-collector.observability:4318", "tracing.samplerRatio": 0.25}
EXPECTED = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25"}


def deployment(objects: list[dict], component: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == "Deployment"
                and o["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    return found["spec"]["template"]["spec"]["containers"][0]


def worker_env(operator: dict) -> dict[str, str]:
    """The env of a worker that this operator container would render."""
    args = operator["args"]
    assert args[0] == "operator"
    config = config_from_args(build_parser().parse_args(args[1:]))
    md = ModelDeployment.from_body({
        "apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "u", "generation": 1},
        "spec": {"model": {"source": "hf://org/model"},
                 "engine": {"env": [{"name": "OTEL_TRACES_SAMPLER_ARG", "value": "1"}]}}})
    (container,) = render_deployment(md, 1, config)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_tracing_values_reach_the_gateway_and_every_worker(render) -> None:
    objects = render(TRACING)
    gateway = {e["name"]: e.get("value") for e in deployment(objects, "gateway")["env"]}
    assert {k: gateway.get(k) for k in EXPECTED} == EXPECTED
    assert enabled(gateway)  # what modelfleet/tracing.py reads in the gateway pod
    env = worker_env(deployment(objects, "operator"))
    # the chart's settings, but a ModelDeployment's own spec.engine.env wins
    assert {k: env.get(k) for k in EXPECTED} == {**EXPECTED, "OTEL_TRACES_SAMPLER_ARG": "1"}
    assert enabled(env)


def test_tracing_is_off_by_default(render) -> None:
    objects = render()
    gateway = {e["name"] for e in deployment(objects, "gateway")["env"]}
    assert not {n for n in gateway if n.startswith("OTEL_")}
    operator = deployment(objects, "operator")
    assert not [a for a in operator["args"] if "--worker-env" in a]
    assert not [n for n in worker_env(operator) if n.startswith("OTEL_") and n != "OTEL_TRACES_SAMPLER_ARG"]
