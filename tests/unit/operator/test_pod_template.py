"""spec.podTemplate and extended resources: what a user adds reaches the pods, merged under
what the operator owns, and what the operator owns cannot be taken (typed models here; the
CRD's CEL rules in test_crd_validation.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from modelfleet import api, labels
from modelfleet.api import ModelDeployment, NameClaim, settle_names
from modelfleet.operator import render
from modelfleet.operator.conditions import compute_status
from modelfleet.operator.config import OperatorConfig
from modelfleet.operator.render import render_deployment

CONFIG = OperatorConfig(default_image="modelfleet:test")
CRD_PATH = Path(__file__).resolve().parents[3] / "crds" / "modeldeployments.modelfleet.dev.yaml"

TEMPLATE = {
    "metadata": {"labels": {"team": "search", "app.kubernetes.io/version": "v2"},
                 "annotations": {"sidecar.istio.io/inject": "false"}},
    "spec": {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "nodeSelector": {"pool": "ml", "zone": "a"},
        "runtimeClassName": "nvidia",
        "priorityClassName": "inference-high",
        "imagePullSecrets": [{"name": "regcred"}],
        "volumes": [{"name": "prompts", "configMap": {"name": "prompts"}}],
        "volumeMounts": [{"name": "prompts", "mountPath": "/etc/prompts", "readOnly": True}],
        "env": [{"name": "EXTRA", "value": "1"}, {"name": "HF_HOME", "value": "/mine"},
                {"name": "A", "value": "template"}],
    },
}


def make(spec: dict[str, Any] | None = None) -> ModelDeployment:
    return ModelDeployment.from_body({
        "metadata": {"name": "tiny-chat", "namespace": "team-a", "uid": "u", "generation": 1},
        "spec": {"model": {"source": "hf://org/tiny"}, **(spec or {})},
    })


def pod(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]


def test_the_template_reaches_the_pod_under_what_the_operator_owns() -> None:
    dep = render_deployment(make({"podTemplate": TEMPLATE, "nodeSelector": {"zone": "b"},
                                  "engine": {"env": [{"name": "A", "value": "engine"}]}}), 1, CONFIG)
    meta, spec = pod(dep)["metadata"], pod(dep)["spec"]
    (c,) = spec["containers"]
    assert meta["labels"] == {"team": "search", "app.kubernetes.io/version": "v2",
                              **labels.worker_labels("tiny-chat")}
    assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert dep["spec"]["selector"]["matchLabels"] == labels.selector_labels("tiny-chat")
    assert spec["nodeSelector"] == {"pool": "ml", "zone": "b"}  # spec.nodeSelector wins a shared key
    assert spec["tolerations"] == TEMPLATE["spec"]["tolerations"]
    assert spec["affinity"] == TEMPLATE["spec"]["affinity"]
    assert (spec["runtimeClassName"], spec["priorityClassName"]) == ("nvidia", "inference-high")
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert [v["name"] for v in spec["volumes"]] == ["cache", "tmp", "prompts"]
    assert c["volumeMounts"][-1] == {"name": "prompts", "mountPath": "/etc/prompts", "readOnly": True}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert len(env) == len(c["env"])  # no name twice: server-side apply would refuse it
    # The operator's HF_HOME and spec.engine.env's A win; the template's own variable is added.
    assert env["EXTRA"] == "1" and env["HF_HOME"] == CONFIG.hf_cache_dir and env["A"] == "engine"
    # Probes and the security context are the operator's whatever the template says.
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["securityContext"]["runAsNonRoot"]


def test_without_a_template_the_pod_is_unchanged() -> None:
    assert render_deployment(make({"podTemplate": {}}), 1, CONFIG) == render_deployment(make(), 1, CONFIG)


def test_a_mount_over_the_models_own_path_is_an_invalid_spec() -> None:
    md = make({"model": {"source": "pvc://models/tiny"}, "podTemplate": {"spec": {
        "volumes": [{"name": "x", "emptyDir": {}}], "volumeMounts": [{"name": "x", "mountPath": "/mnt/models/models"}]}}})
    with pytest.raises(ValueError, match="where the operator mounts one of its own volumes"):
        render_deployment(md, 1, CONFIG)


@pytest.mark.parametrize(("template", "words"), [
    ({"metadata": {"labels": {"modelfleet.dev/model": "other"}}}, "modelfleet.dev/model"),
    ({"metadata": {"labels": {"app.kubernetes.io/instance": "x"}}}, "operator owns"),
    ({"metadata": {"annotations": {"prometheus.io/port": "1"}}}, "operator owns"),
    ({"spec": {"volumes": [{"name": "tmp", "emptyDir": {}}]}}, "the operator's own volumes"),
    ({"spec": {"volumes": [{"emptyDir": {}}]}}, "need a name"),
    ({"spec": {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}}, "unknown: nope"),
    ({"spec": {"volumes": [{"name": "s", "emptyDir": {}}], "volumeMounts": [{"name": "s", "mountPath": "/dev/shm"}]}},
     "/dev/shm"),
])
def test_fields_the_operator_owns_are_refused(template: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words.replace(".", r"\.")):
        make({"podTemplate": template})


def test_any_extended_resource_and_the_gpu_count_still_drives_tensor_parallelism() -> None:
    md = make({"resources": {"gpu": 2, "gpuResource": "amd.com/gpu", "extended": {"rdma/hca": 1}},
               "engine": {"kind": "vllm"}})
    (c,) = pod(render_deployment(md, 1, CONFIG))["spec"]["containers"]
    assert c["resources"]["limits"] == {"amd.com/gpu": "2", "rdma/hca": "1"}
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "2"
    mig = make({"resources": {"gpu": 1, "gpuResource": "nvidia.com/mig-1g.5gb"}})
    (c,) = pod(render_deployment(mig, 1, CONFIG))["spec"]["containers"]
    assert c["resources"]["limits"] == {"nvidia.com/mig-1g.5gb": "1"}
    assert c["command"][c["command"].index("--device") + 1] == "cuda"
    # The existing spelling still means NVIDIA.
    (c,) = pod(render_deployment(make({"resources": {"gpu": 1}}), 1, CONFIG))["spec"]["containers"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "1"}


@pytest.mark.parametrize(("resources", "words"), [
    ({"gpuResource": "gpu"}, "extended resource name"),
    ({"extended": {"cpu": 1}}, "domain-qualified"),
    ({"gpu": 1, "gpuResource": "amd.com/gpu", "extended": {"amd.com/gpu": 1}}, "must not repeat"),
])
def test_bad_resource_names_are_refused(resources: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        make({"resources": resources})


def test_an_unschedulable_pod_names_the_resource_it_asked_for() -> None:
    md = make({"resources": {"gpu": 1, "gpuResource": "amd.com/gpu"}})
    stuck = {"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 Insufficient amd.com/gpu."}]}}
    status = compute_status(md, 1, {"metadata": {"generation": 1}, "status": {}}, [stuck], [], "s", "now")
    assert status.condition("Ready").message.endswith("(each replica asks for 1 amd.com/gpu)")


def claim(name: str, served: str, created: int, weight: int | None = None, aliases=()) -> NameClaim:
    return NameClaim("ns", name, served, tuple(aliases), weight, created)


def test_names_are_settled_oldest_first_and_shared_only_by_weight() -> None:
    v1, v2 = claim("v1", "chat", 1, weight=95), claim("v2", "chat", 2, weight=5)
    assert settle_names([v2, v1]) == {v1.key: None, v2.key: None}
    plain = claim("plain", "chat", 3)
    assert settle_names([v1, v2, plain])[plain.key] == v1
    # Same second: the name breaks the tie, the same way in the operator and the gateway.
    a, b = claim("a", "chat", 5), claim("b", "chat", 5)
    assert settle_names([b, a]) == {a.key: None, b.key: a}
    # An alias counts too, and weights do not make two different served names share.
    aliased = claim("aliased", "other", 0, weight=1, aliases=["chat"])
    assert settle_names([v1, aliased])[v1.key] == aliased


def test_what_the_refusals_protect_is_what_the_operator_renders() -> None:
    """The owned names in modelfleet.api and the CRD's CEL rules follow the renderer: a new
    operator label, annotation or volume must be added to the refusals too."""
    owned_volumes = {render.MODEL_VOLUME, render.CACHE_VOLUME, render.SHM_VOLUME, render.TMP_VOLUME}
    assert set(api.OWNED_VOLUMES) == owned_volumes
    meta = pod(render_deployment(make(), 1, CONFIG))["metadata"]
    assert {k for k in meta["labels"] if not k.startswith(api.OWNED_KEY_PREFIX)} == set(api.OWNED_LABEL_KEYS)
    assert {k for k in meta["annotations"] if not k.startswith(api.OWNED_KEY_PREFIX)} == set(
        api.OWNED_ANNOTATION_KEYS)
    crd = yaml.safe_load(CRD_PATH.read_text())
    template = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "podTemplate"]["properties"]
    rules = {name: " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []))
             for name, node in template["metadata"]["properties"].items()}
    volume_rule = template["spec"]["properties"]["volumes"]["items"]["properties"]["name"][
        "x-kubernetes-validations"][0]["rule"]
    assert all(f"'{k}'" in rules["labels"] for k in api.OWNED_LABEL_KEYS)
    assert all(f"'{k}'" in rules["annotations"] for k in api.OWNED_ANNOTATION_KEYS)
    assert all(f"'{v}'" in volume_rule for v in api.OWNED_VOLUMES)
