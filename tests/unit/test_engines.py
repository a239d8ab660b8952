"""The vLLM command line and the pins that must agree across the project."""

import re
from pathlib import Path

import yaml

from modelfleet.engines import VLLM_VERSION, VllmServer, detect_task
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
