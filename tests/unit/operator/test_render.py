"""Rendering: every spec field lands where it should, and the defaults are the safe ones.

A golden file pins one full Deployment so that any change to the rendered objects shows up in
review; regenerate it with MODELFLEET_UPDATE_GOLDEN=1 after checking the diff is intended.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet import labels
from modelfleet.api import ModelDeployment
from modelfleet.operator.config import OperatorConfig
from modelfleet.operator.render import (
    render_deployment,
    render_pdb,
    render_service,
    worker_model_arg,
)

GOLDEN = Path(__file__).parent / "golden"
CONFIG = OperatorConfig(default_image="modelfleet:test")


def make(spec: dict[str, Any] | None = None, name: str = "tiny-chat") -> ModelDeployment:
    body = {
        "apiVersion": "modelfleet.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "team-a", "uid": "uid-1", "generation": 4},
        "spec": {"model": {"source": "file:///models/tiny-chat"}, **(spec or {})},
    }
    return ModelDeployment.from_body(body)


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def flag(cmd: list[str], name: str) -> str | None:
    """The value after the last `name` in a command line (argparse's last-wins)."""
    values = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == name]
    return values[-1] if values else None


def test_minimal_spec_renders_a_safe_worker() -> None:
    dep = render_deployment(make(), 1, CONFIG)
    c = container(dep)
    pod = dep["spec"]["template"]["spec"]
    assert c["command"][:2] == ["modelfleet", "worker"]
    assert flag(c["command"], "--model") == "/models/tiny-chat"
    assert flag(c["command"], "--served-name") == "tiny-chat"
    assert flag(c["command"], "--host") == "0.0.0.0"
    assert flag(c["command"], "--port") == "8000"
    assert flag(c["command"], "--device") == "cpu"
    assert c["image"] == "modelfleet:test"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    # The startup probe must cover spec.engine.startupTimeoutSeconds (default 1800 s).
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 1800
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(CONFIG.drain_seconds)]
    assert pod["terminationGracePeriodSeconds"] == 120 + CONFIG.drain_seconds
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "resources" not in c and "nodeSelector" not in pod
    # Only scratch space: /tmp on an emptyDir (the root filesystem is read-only).
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["runAsNonRoot"] is True


def test_labels_selector_and_owner() -> None:
    md = make(spec={"model": {"source": "file:///m", "servedName": "org/tiny:1", "aliases": ["a", "b"]}})
    dep = render_deployment(md, 2, CONFIG)
    svc = render_service(md, CONFIG)
    pdb = render_pdb(md, 2)
    assert pdb is not None
    for obj in (dep, svc, pdb):
        meta = obj["metadata"]
        assert meta["namespace"] == "team-a" and meta["name"] == "tiny-chat"
        assert meta["labels"][labels.MODEL] == "tiny-chat"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "modelfleet-operator"
        assert meta["labels"]["app.kubernetes.io/instance"] == "tiny-chat"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "modelfleet.dev/v1alpha1",
                "kind": "ModelDeployment",
                "name": "tiny-chat",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    assert dep["spec"]["selector"] == {"matchLabels": {labels.MODEL: "tiny-chat"}}
    assert svc["spec"]["selector"] == {labels.MODEL: "tiny-chat"}
    assert pdb["spec"]["selector"] == {"matchLabels": {labels.MODEL: "tiny-chat"}}
    template_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert set(dep["spec"]["selector"]["matchLabels"].items()) <= set(template_labels.items())
    cmd = container(dep)["command"]
    served = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--served-name"]
    assert served == ["org/tiny:1", "a", "b"]  # primary first, then the aliases


# (spec fragment, where it must land: a function of the rendered Deployment, expected value)
FIELD_CASES = [
    ({"replicas": 3}, lambda d: d["spec"]["replicas"], 2),  # render takes the decided size
    ({"resources": {"gpu": 1}}, lambda d: container(d)["resources"]["limits"]["nvidia.com/gpu"], "1"),
    ({"resources": {"gpu": 1}}, lambda d: flag(container(d)["command"], "--device"), "cuda"),
    ({"resources": {"cpu": 4}}, lambda d: container(d)["resources"]["requests"]["cpu"], "4"),
    ({"resources": {"cpu": "500m"}}, lambda d: container(d)["resources"].get("limits"), None),
    ({"resources": {"memory": "16Gi"}}, lambda d: container(d)["resources"]["limits"]["memory"], "16Gi"),
    ({"resources": {"memory": "16Gi"}}, lambda d: container(d)["resources"]["requests"]["memory"], "16Gi"),
    ({"engine": {"image": "reg/x:1"}}, lambda d: container(d)["image"], "reg/x:1"),
    ({"engine": {"imagePullPolicy": "Always"}}, lambda d: container(d)["imagePullPolicy"], "Always"),
    ({"engine": {"dtype": "bfloat16"}}, lambda d: flag(container(d)["command"], "--dtype"), "bfloat16"),
    ({"engine": {"maxModelLen": 4096}}, lambda d: flag(container(d)["command"], "--max-model-len"), "4096"),
    ({"engine": {"maxNumSeqs": 32}}, lambda d: flag(container(d)["command"], "--max-num-seqs"), "32"),
    (
        {"engine": {"args": ["--max-num-batched-tokens", "8192"]}},
        lambda d: container(d)["command"][-2:],
        ["--max-num-batched-tokens", "8192"],
    ),
    (
        {"engine": {"args": ["--device", "cpu"]}, "resources": {"gpu": 1}},
        lambda d: flag(container(d)["command"], "--device"),
        "cpu",
    ),
    (
        {"engine": {"env": [{"name": "A", "value": "1"}]}},
        lambda d: container(d)["env"],
        [{"name": "A", "value": "1"}],
    ),
    (
        {"engine": {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}},
        lambda d: container(d)["env"],
        [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
    ),
    (
        {"engine": {"startupTimeoutSeconds": 600}},
        # the probe's whole budget: period x failures
        lambda d: container(d)["startupProbe"]["failureThreshold"] * container(d)["startupProbe"]["periodSeconds"],
        600,
    ),
    ({"engine": {"startupTimeoutSeconds": 600}}, lambda d: d["spec"]["progressDeadlineSeconds"], 900),
    (
        {"nodeSelector": {"gpu": "a100"}},
        lambda d: d["spec"]["template"]["spec"]["nodeSelector"],
        {"gpu": "a100"},
    ),
    (
        {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        lambda d: d["spec"]["template"]["spec"]["tolerations"],
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    ),
    (
        {"terminationGracePeriodSeconds": 600},
        lambda d: d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        605,
    ),
]


@pytest.mark.parametrize(("spec", "where", "expected"), FIELD_CASES)
def test_spec_field_lands_in_the_deployment(spec: dict[str, Any], where: Any, expected: Any) -> None:
    assert where(render_deployment(make(spec), 2, CONFIG)) == expected


@pytest.mark.parametrize(
    ("source", "path", "volume"),
    [
        (
            "pvc://models/llama/8b",
            "/mnt/models/models/llama/8b",
            {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        ),
        (
            "pvc://models",
            "/mnt/models/models",
            {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        ),
        ("hf://org/name@v1", "hf://org/name@v1", {"emptyDir": {}}),
        ("file:///models/tiny-chat/", "/models/tiny-chat", None),
    ],
)
def test_sources_become_a_path_and_a_volume(source: str, path: str, volume: dict[str, Any] | None) -> None:
    dep = render_deployment(make({"model": {"source": source}}), 1, CONFIG)
    c = container(dep)
    assert flag(c["command"], "--model") == path
    volumes = [v for v in dep["spec"]["template"]["spec"].get("volumes", []) if v["name"] != "tmp"]
    mounts = [m for m in c.get("volumeMounts", []) if m["name"] != "tmp"]
    if volume is None:
        assert volumes == [] and mounts == []
        return
    (vol,) = volumes
    assert {k: v for k, v in vol.items() if k != "name"} == volume
    (mount,) = mounts
    assert mount["name"] == vol["name"]
    if "persistentVolumeClaim" in volume:
        assert mount["readOnly"] is True and path.startswith(mount["mountPath"])
    else:
        assert {"name": "HF_HOME", "value": CONFIG.hf_cache_dir} in c["env"]


def test_file_source_mounted_from_the_node_when_configured() -> None:
    config = OperatorConfig(host_path_models=True)
    dep = render_deployment(make(), 1, config)
    vol, _tmp = dep["spec"]["template"]["spec"]["volumes"]
    assert vol["hostPath"] == {"path": "/models/tiny-chat", "type": "Directory"}
    assert container(dep)["volumeMounts"][0] == {
        "name": vol["name"],
        "mountPath": "/models/tiny-chat",
        "readOnly": True,
    }


def test_pvc_sub_path_cannot_escape_its_volume() -> None:
    with pytest.raises(ValueError, match="'..' path segment"):
        worker_model_arg("pvc://models/../../etc", CONFIG)


@pytest.mark.parametrize(("replicas", "has_pdb"), [(0, False), (1, False), (2, True), (5, True)])
def test_pdb_only_above_one_replica(replicas: int, has_pdb: bool) -> None:
    pdb = render_pdb(make(), replicas)
    assert (pdb is not None) == has_pdb
    if pdb is not None:
        assert pdb["spec"]["maxUnavailable"] == 1


def test_service_targets_the_worker_port_by_name() -> None:
    svc = render_service(make(), CONFIG)
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http"
    ports = container(render_deployment(make(), 1, CONFIG))["ports"]
    assert {"name": "http", "containerPort": CONFIG.worker_port, "protocol": "TCP"} in ports


def test_rendering_is_deterministic() -> None:
    """Server-side apply of the same object twice must be a no-op: no timestamps or randomness."""
    md = make({"resources": {"gpu": 1}, "engine": {"env": [{"name": "A", "value": "1"}]}})
    assert render_deployment(md, 2, CONFIG) == render_deployment(md, 2, CONFIG)


def test_golden_deployment() -> None:
    md = make(
        {
            "model": {"source": "pvc://models/tiny-chat", "servedName": "tiny-chat", "aliases": ["tiny"]},
            "resources": {"gpu": 1, "cpu": "4", "memory": "16Gi"},
            "engine": {"maxModelLen": 4096, "env": [{"name": "LOG_LEVEL", "value": "info"}]},
            "nodeSelector": {"accelerator": "nvidia"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    )
    objs = [render_deployment(md, 2, CONFIG), render_service(md, CONFIG), render_pdb(md, 2)]
    text = yaml.safe_dump_all(objs, sort_keys=True)
    path = GOLDEN / "tiny-chat-gpu.yaml"
    if os.environ.get("MODELFLEET_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


def vllm_args(dep: dict[str, Any]) -> list[str]:
    c = container(dep)
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    return c["args"]


def test_vllm_engine_renders_vllms_openai_server_with_the_same_spec_fields() -> None:
    md = make({
        "model": {"source": "hf://org/llama@v2", "servedName": "llama", "aliases": ["l"],
                  "tokenSecretRef": {"name": "hf-token"}},
        "resources": {"gpu": 4, "memory": "64Gi"},
        "engine": {"kind": "vllm", "maxModelLen": 8192, "maxNumSeqs": 128, "dtype": "bfloat16",
                   "args": ["--gpu-memory-utilization=0.85", "--tool-call-parser", "llama3_json"]},
    })
    dep = render_deployment(md, 1, CONFIG)
    c = container(dep)
    args = vllm_args(dep)
    assert c["image"] == CONFIG.vllm_image
    assert flag(args, "--model") == "org/llama" and flag(args, "--revision") == "v2"
    served = args[args.index("--served-model-name") + 1 : args.index("--served-model-name") + 3]
    assert served == ["llama", "l"]
    assert flag(args, "--tensor-parallel-size") == "4"
    assert flag(args, "--max-model-len") == "8192" and flag(args, "--max-num-seqs") == "128"
    assert flag(args, "--dtype") == "bfloat16" and flag(args, "--port") == str(CONFIG.worker_port)
    assert "--enable-prefix-caching" in args and "--enable-auto-tool-choice" in args
    # user args last, where vLLM's argparse lets them win
    assert args[-3:] == ["--gpu-memory-utilization=0.85", "--tool-call-parser", "llama3_json"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"  # vLLM has no /ready
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["HF_HOME"]["value"] == CONFIG.hf_cache_dir
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # a GPU replica
    assert env["VLLM_HOST_IP"]["value"] == "127.0.0.1" and env["VLLM_NO_USAGE_STATS"]["value"] == "1"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_vllm_on_cpu_gets_its_cpu_settings_and_embeddings_the_pooling_runner() -> None:
    md = make({"model": {"source": "pvc://models/minilm", "task": "embed"},
               "engine": {"kind": "vllm", "image": "reg/vllm-cpu:1"}})
    dep = render_deployment(md, 1, CONFIG)
    c = container(dep)
    args = vllm_args(dep)
    assert c["image"] == "reg/vllm-cpu:1"
    assert flag(args, "--model") == "/mnt/models/models/minilm"
    assert flag(args, "--runner") == "pooling"
    assert "--enable-auto-tool-choice" not in args and "--tensor-parallel-size" not in args
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(CONFIG.vllm_cpu_kv_cache_gib)
    assert "HF_TOKEN" not in env


def test_a_kv_cache_size_in_the_engines_args_is_not_overridden_on_cpu() -> None:
    """vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE override --kv-cache-memory-bytes: the
    operator leaves its default out when the user's args size the cache."""
    md = make({"engine": {"kind": "vllm", "args": ["--kv-cache-memory-bytes=268435456"]}})
    dep = render_deployment(md, 1, CONFIG)
    assert "--kv-cache-memory-bytes=268435456" in vllm_args(dep)
    assert "VLLM_CPU_KVCACHE_SPACE" not in {e["name"] for e in container(dep)["env"]}


def test_the_own_engine_gets_the_hf_token_too() -> None:
    md = make({"model": {"source": "hf://org/tiny", "tokenSecretRef": {"name": "s", "key": "hf"}}})
    env = {e["name"]: e for e in container(render_deployment(md, 1, CONFIG))["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "s", "key": "hf"}}


def test_the_users_env_wins_over_the_engines_defaults_without_duplicate_names() -> None:
    md = make({"engine": {"kind": "vllm", "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}]}})
    env = container(render_deployment(md, 1, CONFIG))["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names))  # server-side apply refuses a name twice
    assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"} in env
