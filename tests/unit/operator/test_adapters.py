"""LoRA adapters on the operator's side: the pod template carries LoRA's start-up flags but never
the adapter list (so adding or removing one restarts nothing), the plan of loads and unloads
per pod is pure, and reconcile converges each ready pod and reports per-adapter readiness."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from modelfleet.api import ModelDeployment, NameClaim, settle_names
from modelfleet.operator.adapters import (
    RECHECK_SECONDS,
    AdapterError,
    AdapterSync,
    PodPlan,
    adapter_path,
    held_adapters,
    plan,
)
from modelfleet.operator.conditions import name_conflict
from modelfleet.operator.config import OperatorConfig
from modelfleet.operator.reconcile import reconcile

from .test_reconcile import NOW, FakeKube, body, ready_pod, unknown_load

CONFIG = OperatorConfig(default_image="modelfleet:test")
HOST_PATHS = OperatorConfig(default_image="modelfleet:test", host_path_models=True)
ONE = [{"name": "sql", "source": "file:///adapters/sql"}]
TWO = [*ONE, {"name": "poet", "source": "file:///adapters/poet"}]


def make(spec: dict[str, Any] | None = None) -> ModelDeployment:
    return ModelDeployment.from_body(body(spec))


def template(md: ModelDeployment, config: OperatorConfig = CONFIG) -> dict[str, Any]:
    from modelfleet.operator.render import render_deployment

    return render_deployment(md, 1, config)["spec"]["template"]


def container(md: ModelDeployment) -> dict[str, Any]:
    (c,) = template(md)["spec"]["containers"]
    return c


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


# -- rendering ---------------------------------------------------------------------------------


def test_modelfleet_worker_gets_lora_slots_but_not_the_adapter_list() -> None:
    c = container(make({"adapters": ONE, "lora": {"maxLoras": 2, "maxLoraRank": 32}}))
    cmd = c["command"]
    assert cmd[cmd.index("--max-loras") + 1] == "2"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32"
    assert "--lora-modules" not in cmd and "--enable-lora" not in cmd
    c = container(make({"adapters": ONE}))
    assert env(c)["HF_HOME"] == CONFIG.hf_cache_dir  # hf:// adapters download here
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env(c)


def test_vllm_gets_enable_lora_and_runtime_updating() -> None:
    c = container(make({"adapters": ONE, "engine": {"kind": "vllm"}, "lora": {"maxLoras": 2, "maxLoraRank": 8}}))
    args = c["args"]
    assert "--enable-lora" in args
    assert args[args.index("--max-loras") + 1] == "2"
    assert args[args.index("--max-lora-rank") + 1] == "8"
    assert "--lora-modules" not in args
    assert env(c)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_without_adapters_nothing_changes() -> None:
    for engine in ("modelfleet", "vllm"):
        c = container(make({"engine": {"kind": engine}}))
        line = c.get("args", c["command"])
        assert "--max-loras" not in line and "--enable-lora" not in line
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env(c) and "HF_HOME" not in env(c)


@pytest.mark.parametrize("engine", ["modelfleet", "vllm"])
def test_adding_or_removing_adapters_keeps_the_pod_template(engine: str) -> None:
    """The point of loading through the API: a template change would roll every pod."""
    one = template(make({"adapters": ONE, "engine": {"kind": engine}}))
    two = template(make({"adapters": TWO, "engine": {"kind": engine}}))
    third = {"name": "hub", "source": "hf://org/lora" if engine == "vllm" else "file:///adapters/hub"}
    hub = template(make({"adapters": [*TWO, third], "engine": {"kind": engine}}))
    assert one == two == hub
    # spec.lora turns LoRA on before the first adapter, so that adding it restarts nothing either.
    assert template(make({"lora": {}, "engine": {"kind": engine}})) == one


def test_pvc_adapters_mount_their_claim_once_and_reuse_the_models() -> None:
    md = make({"model": {"source": "pvc://weights/base"},
               "adapters": [{"name": "a", "source": "pvc://weights/loras/a"},
                            {"name": "b", "source": "pvc://loras/b"},
                            {"name": "c", "source": "pvc://loras/c"}]})
    pod = template(md)["spec"]
    (c,) = pod["containers"]
    claims = sorted(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claims == ["loras", "weights"]
    assert {"name": "lora-loras", "mountPath": "/mnt/models/loras", "readOnly": True} in c["volumeMounts"]
    assert adapter_path("pvc://loras/b", CONFIG) == "/mnt/models/loras/b"
    assert adapter_path("hf://org/lora", CONFIG) == "org/lora"


# -- the spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("adapters", "message"), [
    ([{"name": "sql", "source": "file:///a"}, {"name": "sql", "source": "file:///b"}], "must not repeat a name"),
    ([{"name": "tiny-chat", "source": "file:///a"}], "repeat the model's served name"),
    ([{"name": "x", "source": "hf://org/lora@v2"}], "no @revision"),
    ([{"name": "x", "source": "s3://bucket/lora"}], "spec.adapters source must be"),
    ([{"name": "-x", "source": "file:///a"}], "not a valid model name"),
])
def test_invalid_adapters_are_refused(adapters: list[dict[str, str]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make({"adapters": adapters})


def test_an_adapter_named_like_another_models_name_is_a_name_conflict() -> None:
    older = NameClaim("default", "sql-model", "sql", created=1)
    md = make({"adapters": ONE})
    mine = NameClaim.of(md, created=2)
    holder = settle_names([older, mine])[mine.key]
    assert holder == older
    assert "the model name sql is already served by ModelDeployment default/sql-model" in name_conflict(md, holder)
    assert "spec.adapters name" in name_conflict(md, holder)


# -- the plan ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("desired", "held", "expected"), [
    ({}, {}, PodPlan()),
    ({"a": "/a"}, {}, PodPlan(load=(("a", "/a"),))),
    ({"a": "/a"}, {"a": "/a"}, PodPlan()),
    ({}, {"a": "/a"}, PodPlan(unload=("a",))),
    ({"a": "/a2"}, {"a": "/a"}, PodPlan(load=(("a", "/a2"),), unload=("a",))),  # source changed: reload
    ({"a": "/a", "b": "/b"}, {"b": "/b", "c": "/c"}, PodPlan(load=(("a", "/a"),), unload=("c",))),
])
def test_plan(desired: dict[str, str], held: dict[str, str], expected: PodPlan) -> None:
    assert plan(desired, held) == expected


def test_held_adapters_are_the_cards_with_a_parent_that_are_not_the_models_own_names() -> None:
    cards = [
        {"id": "tiny-chat", "root": "/models/tiny-chat", "parent": None},
        {"id": "chat", "root": "tiny-chat", "parent": "tiny-chat"},  # modelfleet's worker lists aliases so
        {"id": "sql", "root": "/adapters/sql", "parent": "tiny-chat"},
    ]
    assert held_adapters(cards, ["tiny-chat", "chat"]) == {"sql": "/adapters/sql"}


# -- converging pods ---------------------------------------------------------------------------


class FakePods:
    """Pods by URL, each a {name: path} of loaded adapters, answering as vLLM does."""

    def __init__(self, **held: dict[str, str]) -> None:
        self.held = {f"http://{ip}:8000": dict(v) for ip, v in held.items()}
        self.calls: list[tuple[str, str, str]] = []
        self.listed = 0
        self.refuse: dict[str, str] = {}
        self.down: set[str] = set()

    def models(self, url: str) -> list[dict[str, Any]]:
        self.listed += 1
        if url in self.down:
            import httpx

            raise httpx.ConnectError("refused")
        base = [{"id": "tiny-chat", "root": "/models/tiny-chat", "parent": None}]
        return base + [{"id": n, "root": p, "parent": "tiny-chat"} for n, p in self.held[url].items()]

    def load(self, url: str, name: str, path: str) -> None:
        self.calls.append(("load", url, name))
        if name in self.refuse:
            raise AdapterError(self.refuse[name])
        self.held[url][name] = path

    def unload(self, url: str, name: str) -> None:
        self.calls.append(("unload", url, name))
        self.held[url].pop(name)


def pods(*ips: str, unready: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    out = [ready_pod(ip) for ip in ips]
    for ip in unready:
        pod = ready_pod(ip)
        pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
        out.append(pod)
    return out


def test_converge_loads_what_is_missing_unloads_what_was_removed_and_skips_unready_pods() -> None:
    fake = FakePods(**{"10.0.0.1": {"old": "/adapters/old"}, "10.0.0.2": {"sql": "/adapters/sql"},
                       "10.0.0.3": {}})
    statuses = AdapterSync(fake).converge(make({"adapters": TWO}), pods("10.0.0.1", "10.0.0.2", unready=("10.0.0.3",)),
                                          CONFIG)
    assert fake.held["http://10.0.0.1:8000"] == {"sql": "/adapters/sql", "poet": "/adapters/poet"}
    assert fake.held["http://10.0.0.2:8000"] == {"sql": "/adapters/sql", "poet": "/adapters/poet"}
    assert fake.held["http://10.0.0.3:8000"] == {}  # loaded once it is ready (next reconcile)
    assert [(s.name, s.ready_replicas, s.message) for s in statuses] == [("sql", 2, None), ("poet", 2, None)]
    assert ("unload", "http://10.0.0.1:8000", "old") in fake.calls
    # A second run finds nothing to do.
    fake.calls.clear()
    AdapterSync(fake).converge(make({"adapters": TWO}), pods("10.0.0.1", "10.0.0.2"), CONFIG)
    assert fake.calls == []


def test_settled_pods_are_asked_again_only_when_the_spec_or_the_pods_change_or_a_while_passed() -> None:
    """Reconciles run on every child event: pods found holding every adapter are not listed
    again until something that could change what they hold has changed."""
    fake, now = FakePods(**{"10.0.0.1": {}, "10.0.0.2": {}}), [0.0]
    sync = AdapterSync(fake, clock=lambda: now[0])
    md, ready = make({"adapters": TWO}), pods("10.0.0.1", "10.0.0.2")
    first = sync.converge(md, ready, CONFIG)
    listed = fake.listed
    assert sync.converge(md, ready, CONFIG) == first and fake.listed == listed  # nothing changed
    restarted = copy.deepcopy(ready)
    restarted[0]["status"]["containerStatuses"][0]["restartCount"] = 1
    fake.held["http://10.0.0.1:8000"].clear()  # a restarted container lost its adapters
    sync.converge(md, restarted, CONFIG)
    assert fake.held["http://10.0.0.1:8000"] == {"sql": "/adapters/sql", "poet": "/adapters/poet"}
    listed = fake.listed
    sync.converge(make({"adapters": TWO[:1]}), restarted, CONFIG)  # the spec changed
    assert ("unload", "http://10.0.0.2:8000", "poet") in fake.calls
    listed, now[0] = fake.listed, RECHECK_SECONDS + 1
    sync.converge(make({"adapters": TWO[:1]}), restarted, CONFIG)  # a while later: asked again
    assert fake.listed == listed + 2


def test_a_refused_load_is_reported_and_an_unreachable_pod_counts_for_nothing() -> None:
    fake = FakePods(**{"10.0.0.1": {}, "10.0.0.2": {}})
    fake.refuse["poet"] = "400 rank 64 is above --max-lora-rank 16"
    fake.down.add("http://10.0.0.2:8000")
    statuses = AdapterSync(fake).converge(make({"adapters": TWO}), pods("10.0.0.1", "10.0.0.2"), CONFIG)
    assert [(s.name, s.ready_replicas) for s in statuses] == [("sql", 1), ("poet", 0)]
    assert statuses[1].message == "pod tiny-chat-10.0.0.1: 400 rank 64 is above --max-lora-rank 16"


def reconcile_with(kube: FakeKube, b: dict[str, Any], sync: AdapterSync) -> dict[str, Any]:
    kube.md = b
    reconcile(b, kube, CONFIG, unknown_load, NOW, adapters=sync)
    for patch in kube.status_patches:
        b["status"] = {k: v for k, v in {**b["status"], **patch}.items() if v is not None}
    kube.status_patches.clear()
    return b["status"]


def test_reconcile_reports_each_adapters_readiness_and_a_condition() -> None:
    kube = FakeKube()
    kube.pods = pods("10.0.0.1")
    fake = FakePods(**{"10.0.0.1": {}})
    fake.refuse["poet"] = "404 no adapter_config.json in /adapters/poet"
    b = body({"adapters": TWO})
    status = reconcile_with(kube, b, AdapterSync(fake))
    assert status["adapters"] == [{"name": "sql", "readyReplicas": 1},
                                  {"name": "poet", "readyReplicas": 0,
                                   "message": "pod tiny-chat-10.0.0.1: 404 no adapter_config.json in /adapters/poet"}]
    cond = next(c for c in status["conditions"] if c["type"] == "AdaptersReady")
    assert (cond["status"], cond["reason"]) == ("False", "LoadFailed")
    # The user fixes the source: loaded at the next reconcile, and the condition turns True.
    fixed = copy.deepcopy(b)
    fixed["spec"]["adapters"] = ONE
    status = reconcile_with(kube, fixed, AdapterSync(fake))
    assert status["adapters"] == [{"name": "sql", "readyReplicas": 1}]
    cond = next(c for c in status["conditions"] if c["type"] == "AdaptersReady")
    assert (cond["status"], cond["reason"]) == ("True", "Loaded")


def test_reconcile_without_lora_writes_no_adapter_status() -> None:
    kube = FakeKube()
    kube.pods = pods("10.0.0.1")
    fake = FakePods(**{"10.0.0.1": {}})
    status = reconcile_with(kube, body(), AdapterSync(fake))
    assert "adapters" not in status
    assert all(c["type"] != "AdaptersReady" for c in status["conditions"])
    assert fake.calls == []


# -- the CRD's own rules (CEL, as the API server runs them) -------------------------------------


@pytest.mark.parametrize(("spec", "words"), [
    ({"adapters": [{"name": "x", "source": "hf://org/lora@v2"}], "engine": {"kind": "vllm"}}, "no @revision"),
    ({"adapters": [{"name": "x", "source": "hf://org/lora"}]}, "hf:// sources need spec.engine.kind: vllm"),
    ({"adapters": [{"name": "x", "source": "s3://b/lora"}]}, "spec.adapters source must be"),
    ({"adapters": [{"name": "-x", "source": "file:///a"}]}, "spec.adapters name must be"),
])
def test_the_crd_refuses_what_the_typed_model_refuses(spec: dict[str, Any], words: str) -> None:
    from .test_crd_validation import md as crd_object
    from .test_crd_validation import validate

    obj = crd_object({"model": {"source": "file:///m"}, **spec})
    assert any(words in e for e in validate(obj)), validate(obj)
    with pytest.raises(ValidationError):
        ModelDeployment.from_body({**obj, "metadata": {"name": "tiny-chat"}})


def test_the_crd_accepts_adapters_and_fills_lora_defaults() -> None:
    from .test_crd_validation import apply_defaults, validate
    from .test_crd_validation import md as crd_object

    obj = crd_object({"model": {"source": "file:///m"}, "lora": {},
                      "adapters": [{"name": "org/sql:v1", "source": "pvc://loras/sql"},
                                   {"name": "hub", "source": "hf://org/lora"}], "engine": {"kind": "vllm"}})
    assert validate(obj) == []
    from .test_crd_validation import SCHEMA

    assert apply_defaults(obj, SCHEMA)["spec"]["lora"] == {"maxLoras": 4, "maxLoraRank": 16}


def test_file_adapters_side_by_side_share_their_folders_mount_so_adding_one_rolls_nothing() -> None:
    """With --host-path-models a file:// adapter is mounted by the folder holding it, as a pvc://
    one by its claim: a second adapter beside the first keeps the pod template."""
    base = {"model": {"source": "file:///models/base"}}
    one = make({**base, "adapters": [{"name": "a", "source": "file:///srv/loras/a"}]})
    two = make({**base, "adapters": [{"name": "a", "source": "file:///srv/loras/a"},
                                     {"name": "b", "source": "file:///srv/loras/b/"}]})
    assert template(one, HOST_PATHS) == template(two, HOST_PATHS)
    pod = template(two, HOST_PATHS)["spec"]
    assert [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v] == ["/models/base", "/srv/loras"]
    mounts = {m["mountPath"]: m.get("readOnly") for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/srv/loras"] is True and "/srv/loras/a" not in mounts


@pytest.mark.parametrize("source", ["file:///lora", "file:///tmp/lora"])
def test_a_file_adapter_under_the_root_or_the_pods_own_tmp_is_mounted_by_itself(source: str) -> None:
    md = make({"model": {"source": "file:///models/base"}, "adapters": [{"name": "a", "source": source}]})
    pod = template(md, HOST_PATHS)["spec"]
    (c,) = pod["containers"]
    paths = [m["mountPath"] for m in c["volumeMounts"]]
    assert source.removeprefix("file://") in paths and len(paths) == len(set(paths))
