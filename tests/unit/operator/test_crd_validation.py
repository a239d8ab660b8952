"""Invalid ModelDeployments are rejected, by the CRD's rules and by the typed models alike.

The CRD's CEL rules are evaluated here with cel-python after applying the schema's defaults,
the way the API server does (defaulting, then OpenAPI checks, then CEL), so a wrong rule fails
in a unit test instead of on a cluster. The same table runs through modelfleet.api, which the
operator uses for objects that reached it under an older CRD.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from modelfleet.api import ModelDeployment

celpy = pytest.importorskip("celpy")

CRD_PATH = Path(__file__).resolve().parents[3] / "crds" / "modeldeployments.modelfleet.dev.yaml"
SCHEMA = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
CEL = celpy.Environment()


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting: fill absent properties that have a default, recursively."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(out[name], sub)
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


def _openapi_errors(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: Unsupported value: {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: should be greater than or equal to {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: should be less than or equal to {schema['maximum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: should match {schema['pattern']!r}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: Too long")
    if isinstance(value, list) and "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{path}: Too many")
    if isinstance(value, dict):
        errors += [f"{path}.{r}: Required value" for r in schema.get("required", []) if r not in value]
    return errors


def validate(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Error messages the API server would return for `obj` (an update of `old` if given)."""
    obj = apply_defaults(obj, SCHEMA)
    old = apply_defaults(old, SCHEMA) if old is not None else None
    return _validate(obj, old, SCHEMA, "")


def _validate(value: Any, old: Any, schema: dict[str, Any], path: str) -> list[str]:
    errors = _openapi_errors(value, schema, path or "<root>")
    # CEL rules of a node run only once its own schema checks pass (a rule may read a
    # required field), as the API server does.
    for rule in [] if errors else schema.get("x-kubernetes-validations", []):
        uses_old = "oldSelf" in rule["rule"]
        if uses_old and old is None:
            continue  # transition rules only run on updates where the old value exists
        activation = {"self": celpy.json_to_cel(value)}
        if uses_old:
            activation["oldSelf"] = celpy.json_to_cel(old)
        result = CEL.program(CEL.compile(rule["rule"])).evaluate(activation)
        if not isinstance(result, celpy.celtypes.BoolType):
            raise AssertionError(f"rule {rule['rule']!r} at {path} did not evaluate: {result!r}")
        if not result:
            errors.append(f"{path or '<root>'}: Invalid value: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                sub_old = old.get(name) if isinstance(old, dict) else None
                errors += _validate(value[name], sub_old, sub, f"{path}.{name}".lstrip("."))
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _validate(item, None, schema["items"], f"{path}[{i}]")
    return errors


def md(spec: dict[str, Any], name: str = "tiny-chat") -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


SOURCE = {"source": "file:///models/tiny-chat"}

VALID = [
    md({"model": SOURCE}),
    md({"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"}}),
    md({"model": {"source": "hf://gpt2"}}),
    md(
        {
            "model": {
                "source": "pvc://models/llama/8b",
                "servedName": "meta-llama/Llama-3-8B",
                "aliases": ["llama3:8b"],
            }
        }
    ),
    md(
        {
            "model": {"source": "file:///models/tiny-chat", "servedName": "tiny-chat", "aliases": ["tiny"]},
            "replicas": 2,
            "autoscaling": {
                "minReplicas": 0,
                "maxReplicas": 4,
                "targetInflightPerReplica": 8,
                "scaleDownDelaySeconds": 300,
            },
            "resources": {"gpu": 1, "cpu": "4", "memory": "16Gi"},
            "engine": {
                "image": "modelfleet:0.1",
                "args": ["--max-num-batched-tokens=8192"],
                "env": [
                    {"name": "A", "value": "1"},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                ],
                "maxModelLen": 4096,
                "dtype": "bfloat16",
            },
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "routing": {"strategy": "prefix-affinity", "prefixLength": 512, "loadFactor": 1.5},
        }
    ),
    md(
        {
            "model": {"source": "hf://org/big@main", "tokenSecretRef": {"name": "hf"}, "task": "generate"},
            "resources": {"gpu": 4},
            "engine": {"kind": "vllm", "args": ["--gpu-memory-utilization=0.85"]},
        }
    ),
    md(
        {
            "model": {"source": "hf://org/big@main", "servedName": "big"},
            "resources": {"gpu": 2, "gpuResource": "amd.com/gpu", "extended": {"rdma/hca": 1}},
            "engine": {"kind": "vllm"},
            "routing": {"weight": 5},
            "podTemplate": {
                "metadata": {"labels": {"app.kubernetes.io/version": "v2"}, "annotations": {"a.example/b": "c"}},
                "spec": {
                    "affinity": {"podAntiAffinity": {}},
                    "runtimeClassName": "nvidia",
                    "priorityClassName": "high",
                    "imagePullSecrets": [{"name": "regcred"}],
                    "volumes": [{"name": "prompts", "configMap": {"name": "prompts"}}],
                    "volumeMounts": [{"name": "prompts", "mountPath": "/etc/prompts"}],
                    "env": [{"name": "EXTRA", "value": "1"}],
                },
            },
        }
    ),
    md({"model": {"source": "hf://org/cached@v1", "cache": {"size": "20Gi", "storageClassName": "fast",
                                                            "accessMode": "ReadWriteMany", "keep": True}}}),
    md({"model": {"source": "file:///models/tiny-chat", "cache": {"claimName": "weights"}}}),
]

INVALID = [
    # (object, the field the message must name, words of the message)
    (md({"model": {"source": "s3://bucket/model"}}), "spec.model.source", "must be file:///"),
    (md({"model": {"source": "/models/tiny-chat"}}), "spec.model.source", "must be file:///"),
    (md({"model": {"source": "pvc://Bad_Claim/x"}}), "spec.model.source", "must be file:///"),
    (md({"model": {**SOURCE, "servedName": "tiny chat"}}), "spec.model.servedName", "letters, digits"),
    (md({"model": {**SOURCE, "servedName": "-tiny"}}), "spec.model.servedName", "letters, digits"),
    (md({"model": {**SOURCE, "aliases": ["ok", "bad alias"]}}), "spec.model.aliases", "letters, digits"),
    (md({"model": {**SOURCE, "servedName": "t", "aliases": ["t"]}}), "spec.model.aliases", "must not repeat"),
    (md({"model": SOURCE, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}}), "minReplicas", "<="),
    (md({"model": SOURCE, "autoscaling": {"minReplicas": 0}}), "maxReplicas", ""),
    (md({"model": SOURCE, "replicas": -1}), "replicas", ""),
    (md({"model": SOURCE, "engine": {"args": ["--port=9000"]}}), "spec.engine.args", "--port"),
    (md({"model": SOURCE, "engine": {"args": ["--model", "x"]}}), "spec.engine.args", "--model"),
    (md({"model": SOURCE, "engine": {"dtype": "fp8"}}), "dtype", ""),
    (md({"model": SOURCE, "resources": {"gpu": 2}}), "spec.resources.gpu", "needs spec.engine.kind: vllm"),
    (md({"model": SOURCE, "resources": {"gpu": 2}, "engine": {"kind": "modelfleet"}}), "spec.resources.gpu",
     "vllm"),
    (md({"model": SOURCE, "engine": {"kind": "tgi"}}), "kind", ""),
    (md({"model": SOURCE, "engine": {"kind": "vllm", "args": ["--served-model-name=x"]}}), "spec.engine.args",
     "--served-model-name"),
    (md({"model": {**SOURCE, "task": "rerank"}}), "task", ""),
    (
        md(
            {"model": SOURCE, "engine": {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {}}}]}}
        ),
        "spec.engine.env",
        "not both",
    ),
    (
        md({"model": SOURCE, "tolerations": [{"operator": "Exists", "value": "x"}]}),
        "tolerations",
        "must not set value",
    ),
    (md({"model": SOURCE, "resources": {"cpu": "four"}}), "cpu", ""),
    (md({"model": SOURCE, "routing": {"strategy": "random"}}), "strategy", ""),
    (md({"model": SOURCE, "routing": {"loadFactor": 0.5}}), "loadFactor", ""),
    (md({"model": SOURCE, "routing": {"weight": 101}}), "weight", ""),
    (md({"model": SOURCE, "resources": {"gpuResource": "gpu"}}), "spec.resources.gpuResource", "extended resource"),
    (md({"model": SOURCE, "resources": {"extended": {"cpu": 2}}}), "spec.resources.extended", "domain-qualified"),
    (md({"model": SOURCE, "resources": {"gpuResource": "amd.com/gpu", "extended": {"amd.com/gpu": 1}}}),
     "spec.resources.extended", "must not repeat spec.resources.gpuResource"),
    (md({"model": SOURCE, "podTemplate": {"metadata": {"labels": {"modelfleet.dev/model": "x"}}}}),
     "spec.podTemplate.metadata.labels", "the operator owns them"),
    (md({"model": SOURCE, "podTemplate": {"metadata": {"labels": {"app.kubernetes.io/managed-by": "me"}}}}),
     "spec.podTemplate.metadata.labels", "the operator owns them"),
    (md({"model": SOURCE, "podTemplate": {"metadata": {"annotations": {"modelfleet.dev/served-name": "x"}}}}),
     "spec.podTemplate.metadata.annotations", "the operator owns them"),
    (md({"model": SOURCE, "podTemplate": {"spec": {"volumes": [{"name": "model", "emptyDir": {}}]}}}),
     "spec.podTemplate.spec.volumes", "the operator's own volumes"),
    (md({"model": SOURCE, "podTemplate": {"spec": {"volumeMounts": [{"name": "v", "mountPath": "/x"}]}}}),
     "spec.podTemplate.spec.volumeMounts", "must name volumes"),
    (md({"model": SOURCE, "podTemplate": {"spec": {"volumes": [{"name": "v", "emptyDir": {}}],
                                                   "volumeMounts": [{"name": "v", "mountPath": "/tmp"}]}}}),
     "spec.podTemplate.spec.volumeMounts", "/tmp"),
    # spec.model.cache (the weight cache): a size or an existing claim, one of them; not for pvc://.
    (md({"model": {"source": "hf://org/m", "cache": {"size": "1Gi", "claimName": "c"}}}), "spec.model.cache",
     "not both"),
    (md({"model": {"source": "hf://org/m", "cache": {"storageClassName": "fast"}}}), "spec.model.cache",
     "not both"),
    (md({"model": {"source": "hf://org/m", "cache": {"claimName": "c", "storageClassName": "fast"}}}),
     "spec.model.cache", "are its own"),
    (md({"model": {"source": "pvc://models/m", "cache": {"size": "1Gi"}}}), "spec.model.cache", "a pvc:// source"),
    (md({"model": {"source": "hf://org/m", "cache": {"size": "lots"}}}), "size", ""),
    (md({"model": {"source": "hf://org/m", "cache": {"size": "1Gi", "accessMode": "Shared"}}}), "accessMode", ""),
]


@pytest.mark.parametrize("obj", VALID, ids=lambda o: o["spec"]["model"]["source"])
def test_valid_objects_pass_both_checks(obj: dict[str, Any]) -> None:
    assert validate(obj) == []
    ModelDeployment.from_body(obj)


@pytest.mark.parametrize(("obj", "field", "words"), INVALID, ids=[f"{f}:{w}" for _, f, w in INVALID])
def test_invalid_objects_are_rejected_naming_the_field(obj: dict[str, Any], field: str, words: str) -> None:
    errors = validate(obj)
    assert errors, "the API server would accept this"
    assert any(field in e and words in e for e in errors), errors
    with pytest.raises(ValidationError) as info:
        ModelDeployment.from_body(apply_defaults(obj, SCHEMA))
    assert field.split(".")[-1].lower() in str(info.value).lower()


def test_metadata_name_must_be_a_dns_label() -> None:
    errors = validate(md({"model": SOURCE}, name="Tiny.Chat"))
    assert any("metadata.name must be a DNS-1035 label" in e for e in errors)
    with pytest.raises(ValidationError, match="metadata.name"):
        ModelDeployment.from_body(md({"model": SOURCE}, name="Tiny.Chat"))


def test_served_name_is_immutable_but_other_fields_are_not() -> None:
    old = md({"model": {**SOURCE, "servedName": "tiny"}})
    renamed = md({"model": {**SOURCE, "servedName": "tiny-2"}})
    assert any("servedName is immutable" in e for e in validate(renamed, old=old))
    scaled = md({"model": {**SOURCE, "servedName": "tiny"}, "replicas": 3, "resources": {"gpu": 1}})
    assert validate(scaled, old=old) == []


def test_defaults_fill_routing_for_the_gateway() -> None:
    """The gateway reads spec.routing from the stored object: defaults must be there."""
    stored = apply_defaults(md({"model": SOURCE}), SCHEMA)
    assert stored["spec"]["routing"] == {
        "strategy": "least-load",
        "prefixLength": 256,
        "loadFactor": 1.25,
        "maxQueue": 100,
        "holdTimeoutSeconds": 60,
    }
    assert stored["spec"]["replicas"] == 1
    parsed = ModelDeployment.from_body(stored)
    assert parsed.spec.routing.to_wire() == stored["spec"]["routing"]
