"""The CRD YAML and modelfleet/api.py describe the same object, field for field.

Fails when a field, type, enum, default or required marker is added on one side only, when a
field lacks a description (kubectl explain md.spec would be empty there), or when a CEL regex
and the pydantic validator's regex disagree.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from modelfleet import api

CRD_PATH = Path(__file__).resolve().parents[3] / "crds" / "modeldeployments.modelfleet.dev.yaml"


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def root_schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return tuple(args)
    return tp


def _check_type(path: str, tp: Any, schema: dict[str, Any], errors: list[str]) -> None:
    """Compare one annotation with one schema node, recursing into models, lists and maps."""
    tp = _unwrap_optional(tp)
    if isinstance(tp, tuple):  # int | str -> int-or-string
        if set(tp) != {int, str} or not schema.get("x-kubernetes-int-or-string"):
            errors.append(f"{path}: {tp} needs x-kubernetes-int-or-string")
        return
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if schema.get("type") != "object":
            errors.append(f"{path}: model but schema type {schema.get('type')}")
            return
        _check_model(path, tp, schema, errors)
        return
    origin = get_origin(tp)
    if origin is Literal:
        if schema.get("type") != "string" or sorted(schema.get("enum", [])) != sorted(get_args(tp)):
            errors.append(f"{path}: enum {sorted(get_args(tp))} != {schema.get('enum')}")
        return
    if origin is list:
        if schema.get("type") != "array":
            errors.append(f"{path}: list but schema type {schema.get('type')}")
            return
        _check_type(path + "[]", get_args(tp)[0], schema.get("items", {}), errors)
        return
    if origin is dict:
        value_tp = get_args(tp)[1]
        if value_tp is Any:
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}: free-form dict needs x-kubernetes-preserve-unknown-fields")
        elif schema.get("type") != "object" or "additionalProperties" not in schema:
            errors.append(f"{path}: map needs additionalProperties")
        else:
            _check_type(path + "{}", value_tp, schema["additionalProperties"], errors)
        return
    expected = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp)
    if expected is None or schema.get("type") != expected:
        errors.append(f"{path}: {tp} vs schema type {schema.get('type')}")


def _check_model(path: str, model: type[BaseModel], schema: dict[str, Any], errors: list[str]) -> None:
    props = schema.get("properties", {})
    fields = {(f.alias or name): (name, f) for name, f in model.model_fields.items()}
    for alias in sorted(set(fields) - set(props)):
        errors.append(f"{path}.{alias}: in {model.__name__} but not in the CRD")
    for prop in sorted(set(props) - set(fields)):
        errors.append(f"{path}.{prop}: in the CRD but not in {model.__name__}")
    required = set(schema.get("required", []))
    for alias, (_, field) in fields.items():
        if alias not in props:
            continue
        sub = f"{path}.{alias}"
        if field.is_required() != (alias in required):
            errors.append(f"{sub}: required in model={field.is_required()}, in CRD={alias in required}")
        _check_type(sub, field.annotation, props[alias], errors)


def _spec_defaults(model: type[BaseModel], schema: dict[str, Any], path: str, errors: list[str]) -> None:
    """Every spec default in pydantic equals the CRD's (objects defaulted to {} included)."""
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        node = props.get(alias, {})
        sub = f"{path}.{alias}"
        if field.is_required():
            continue
        py_default = field.get_default(call_default_factory=True)
        tp = _unwrap_optional(field.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if py_default is not None and node.get("default") != {}:
                errors.append(
                    f"{sub}: model defaults to {tp.__name__}() but CRD default is {node.get('default')}"
                )
            if py_default is None and "default" in node:
                errors.append(f"{sub}: model default None but CRD has a default")
            _spec_defaults(tp, node, sub, errors)
            continue
        if py_default in (None, [], {}):
            if "default" in node:
                errors.append(f"{sub}: CRD default {node['default']!r} but model has none")
        elif node.get("default") != py_default:
            errors.append(f"{sub}: default model={py_default!r} CRD={node.get('default')!r}")


def test_status_and_spec_fields_match_the_typed_models() -> None:
    errors: list[str] = []
    props = root_schema()["properties"]
    _check_model("spec", api.ModelDeploymentSpec, props["spec"], errors)
    _check_model("status", api.ModelDeploymentStatus, props["status"], errors)
    assert errors == []


def test_spec_defaults_match_the_typed_models() -> None:
    errors: list[str] = []
    _spec_defaults(api.ModelDeploymentSpec, root_schema()["properties"]["spec"], "spec", errors)
    assert errors == []


def test_drift_check_catches_a_missing_field() -> None:
    """The checker itself: a schema without a field the model has must be reported."""
    schema = root_schema()["properties"]["spec"]
    del schema["properties"]["routing"]["properties"]["loadFactor"]
    schema["properties"]["routing"]["properties"]["extra"] = {"type": "string"}
    errors: list[str] = []
    _check_model("spec", api.ModelDeploymentSpec, schema, errors)
    assert any("loadFactor" in e for e in errors) and any("extra" in e for e in errors)


def _walk(node: dict[str, Any], path: str):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_every_field_has_a_description() -> None:
    missing = [p for p, node in _walk(root_schema(), "") if p != ".metadata" and not node.get("description")]
    assert missing == []


def test_names_subresources_and_columns() -> None:
    crd = load_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == api.CRD_NAME
    assert spec["group"] == api.GROUP and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == api.KIND and spec["names"]["plural"] == api.PLURAL
    assert spec["names"]["shortNames"] == list(api.SHORT_NAMES)
    assert spec["names"]["categories"] == [api.CATEGORY]
    (version,) = spec["versions"]
    assert version["name"] == api.VERSION and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    shown = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert shown[:5] == ["Model", "Replicas", "Ready", "Phase", "Age"]
    assert "Message" in shown  # `kubectl get md` says why a model is not ready


def _rules(node: dict[str, Any]) -> list[str]:
    return [v["rule"] for v in node.get("x-kubernetes-validations", [])]


@pytest.mark.parametrize(
    ("path", "regex"),
    [
        (("spec", "model", "source"), api.SOURCE_RE),
        (("spec", "model", "servedName"), api.MODEL_NAME_RE),
    ],
)
def test_cel_regexes_equal_the_validators(path: tuple[str, ...], regex: str) -> None:
    node = root_schema()
    for key in path:
        node = node["properties"][key]
    assert any(rule == f"self.matches('{regex}')" or rule.startswith(f"self.matches('{regex}') && ")
               for rule in _rules(node))


def test_the_source_rule_refuses_climbing_as_the_validator_does() -> None:
    source = root_schema()["properties"]["spec"]["properties"]["model"]["properties"]["source"]
    assert any(f"!self.matches('{api.CLIMB_RE}')" in rule for rule in _rules(source))


def test_alias_and_name_regexes_equal_the_validators() -> None:
    root = root_schema()
    aliases = root["properties"]["spec"]["properties"]["model"]["properties"]["aliases"]
    assert any(f"a.matches('{api.MODEL_NAME_RE}')" in rule for rule in _rules(aliases))
    assert any(f"matches('{api.OBJECT_NAME_RE}')" in rule for rule in _rules(root))


def test_quantity_pattern_equals_the_validator() -> None:
    resources = root_schema()["properties"]["spec"]["properties"]["resources"]["properties"]
    assert resources["cpu"]["pattern"] == api.QUANTITY_RE
    assert resources["memory"]["pattern"] == api.QUANTITY_RE
