"""The vLLM command line and the pins that must agree across the project."""

import re
from pathlib import Path

import pytest
import yaml

from modelfleet.engines import VLLM_VERSION, VllmServer, detect_task, vllm_tracing
from modelfleet.sources import parse_model_source

ROOT = Path(__file__).resolve().parents[2]


def test_the_vllm_version_is_pinned_once_in_meaning():
    script = (ROOT / "scripts" / "vllm-env.sh").read_text()
    assert re.search(r"^VLLM_VERSION=(\S+)", script, re.M).group(1) == VLLM_VERSION
    values = yaml.safe_load((ROOT / "charts" / "modelfleet" / "values.yaml").read_text())
    assert values["image"]["vllm"]["tag"] == f"v{VLLM_VERSION}"


def test_user_args_come_last_and_embedding_models_get_the_pooling_runner():
    chat = VllmServer(model="/m", served_names=["a", "b"], port=9, extra_args=["--tool-call-parser", "mistral"])
    args = chat.args()
    assert args[args.index("--served-model-name") + 1 : args.index("--served-model-name") + 3] == ["a", "b"]
    assert args[-2:] == ["--tool-call-parser", "mistral"]
    assert "--tensor-parallel-size" not in args
    embed = VllmServer(model="/m", served_names=["e"], port=9, task="embed", tensor_parallel_size=2).args()
    assert embed[embed.index("--runner") + 1] == "pooling" and "--enable-auto-tool-choice" not in embed
    assert "--enable-prefix-caching" in args and "--enable-prefix-caching" not in embed  # vLLM refuses it there
    assert embed[embed.index("--tensor-parallel-size") + 1] == "2"


def test_sources_and_tasks():
    hf = parse_model_source("hf://org/name@rev")
    assert (hf.repo, hf.revision) == ("org/name", "rev")
    hf = parse_model_source("hf://name")
    assert (hf.repo, hf.revision) == ("name", None)
    from modelfleet.demo import minilm_path

    assert detect_task(str(minilm_path())) == "embed"


BASE = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}


@pytest.mark.parametrize(("environ", "endpoint", "env"), [
    ({}, None, {}),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, None, {}),
    ({**BASE, "OTEL_SDK_DISABLED": "true"}, None, {}),  # how one image without OpenTelemetry opts out
    ({**BASE, "OTEL_TRACES_EXPORTER": "none"}, None, {}),
    # vLLM takes the flag as the exporter's full URL, and exports over gRPC unless told otherwise
    (BASE, "http://collector:4318/v1/traces",
     {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "vllm"}),
    ({**BASE, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/custom", "OTEL_SERVICE_NAME": "chat-a"},
     "http://traces:4318/custom", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
     "http://collector:4317", {"OTEL_SERVICE_NAME": "vllm"}),
])
def test_vllm_traces_where_the_otel_environment_says(environ, endpoint, env):
    assert vllm_tracing(environ) == (endpoint, env)


def test_the_traces_endpoint_reaches_vllms_command_line_only_when_set():
    traced = VllmServer(model="/m", served_names=["a"], port=9, otlp_traces_endpoint="http://c:4318/v1/traces",
                        extra_args=["--max-num-seqs", "4"]).args()
    assert traced[traced.index("--otlp-traces-endpoint") + 1] == "http://c:4318/v1/traces"
    assert traced[-2:] == ["--max-num-seqs", "4"]
    assert "--otlp-traces-endpoint" not in VllmServer(model="/m", served_names=["a"], port=9).args()
