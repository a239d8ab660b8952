"""The InferencePool per ModelDeployment (Gateway API Inference Extension): what it selects,
where it sends traffic, which endpoint picker it names, when reconcile applies it, and the
worker metrics the endpoint picker reads from the pods it selects."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.api import ModelDeployment
from modelfleet.operator.config import EndpointPicker, OperatorConfig
from modelfleet.operator.inference_pool import render_inference_pool
from modelfleet.operator.main import build_parser, config_from_args
from modelfleet.operator.reconcile import reconcile
from modelfleet.operator.render import render_deployment, render_service
from modelfleet.worker.engine import EngineStats
from modelfleet.worker.metrics import WorkerMetrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_reconcile's in-memory cluster
from test_reconcile import FakeKube, body  # noqa: E402

EPP = EndpointPicker("{name}-epp", 9002)
CONFIG = OperatorConfig(default_image="modelfleet:test", worker_port=8123, endpoint_picker=EPP)


def make(engine: str = "modelfleet", name: str = "tiny-chat") -> ModelDeployment:
    return ModelDeployment.from_body({
        "apiVersion": "modelfleet.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "team-a", "uid": "uid-1", "generation": 2},
        "spec": {"model": {"source": "file:///models/tiny-chat"}, "engine": {"kind": engine}},
    })


def test_off_by_default_renders_nothing() -> None:
    assert render_inference_pool(make(), OperatorConfig()) is None


@pytest.mark.parametrize("engine", ["modelfleet", "vllm"])
def test_pool_selects_what_the_service_selects_on_the_worker_port(engine: str) -> None:
    md = make(engine)
    pool = render_inference_pool(md, CONFIG)
    service = render_service(md, CONFIG)
    deployment = render_deployment(md, 1, CONFIG)
    assert (pool["apiVersion"], pool["kind"]) == ("inference.networking.k8s.io/v1", "InferencePool")
    assert (pool["metadata"]["name"], pool["metadata"]["namespace"]) == ("tiny-chat", "team-a")
    # Owned like the Service: deleting the ModelDeployment deletes the pool.
    assert pool["metadata"]["ownerReferences"] == service["metadata"]["ownerReferences"]
    assert pool["metadata"]["ownerReferences"][0]["controller"] is True
    assert pool["spec"]["selector"] == {"matchLabels": service["spec"]["selector"]}
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    (port,) = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert pool["spec"]["targetPorts"] == [{"number": port["containerPort"]}] == [{"number": 8123}]


def test_each_pool_names_its_own_endpoint_picker() -> None:
    ref = render_inference_pool(make(name="llama"), CONFIG)["spec"]["endpointPickerRef"]
    assert ref == {"kind": "Service", "name": "llama-epp", "port": {"number": 9002}}
    shared = OperatorConfig(endpoint_picker=EndpointPicker("epp", 9002))
    assert render_inference_pool(make(), shared)["spec"]["endpointPickerRef"]["name"] == "epp"


def test_flag_parses_name_and_port() -> None:
    args = build_parser().parse_args(["--inference-pool-epp", "{name}-epp:9002"])
    assert config_from_args(args).endpoint_picker == EPP
    assert config_from_args(build_parser().parse_args([])).endpoint_picker is None


@pytest.mark.parametrize(
    ("value", "says"),
    [("epp", "NAME:PORT"), ("epp:0", "1-65535"), ("epp:http", "NAME:PORT"), ("Epp_1:9002", "not a Service name"),
     (":9002", "not a Service name")],
)
def test_bad_flag_values_say_what_is_wrong(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        EndpointPicker.parse(value)


def test_reconcile_applies_the_pool_only_when_on() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    off, on = FakeKube(), FakeKube()
    for kube, config in ((off, OperatorConfig()), (on, CONFIG)):
        kube.md = body()
        reconcile(kube.md, kube, config, lambda pods: None, now)
    assert not [c for c in off.calls if c[1] == "InferencePool"]
    assert ("patch", "InferencePool") in on.calls
    pool = on.objects[("inference.networking.k8s.io/v1", "InferencePool", "default", "tiny-chat")]
    assert pool["spec"]["endpointPickerRef"]["name"] == "tiny-chat-epp"


def test_worker_metrics_carry_what_the_endpoint_picker_reads() -> None:
    """The EPP's default mapping (vLLM's names): queue length and running requests as gauges,
    KV cache usage as a fraction, and the LoRA info gauge whose empty adapter lists it skips."""
    stats = EngineStats()
    stats.waiting, stats.running, stats.kv_usage = 3, 2, 0.25
    text = generate_latest(WorkerMetrics("tiny-chat", stats, lambda: False).registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = {name: families[name].samples[0].value
              for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")}
    assert values == {"vllm:num_requests_waiting": 3, "vllm:num_requests_running": 2, "vllm:kv_cache_usage_perc": 0.25}
    assert all(families[name].type == "gauge" for name in values)
    (lora,) = families["vllm:lora_requests_info"].samples
    assert lora.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "0"}
    assert families["vllm:lora_requests_info"].type == "gauge" and lora.value > 0
