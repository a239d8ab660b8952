"""A container's environment as the kubelet builds it: env and envFrom (values, ConfigMaps,
Secrets, the downward API), $(VAR) expansion, and the in-cluster API server variables."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

# (kind, namespace, name) -> data dict (Secret values already decoded), or None if missing.
Lookup = Callable[[str, str, str], dict[str, str] | None]

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class EnvError(ValueError):
    """A referenced ConfigMap, Secret or key is missing: CreateContainerConfigError."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: unknown references stay as written, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def field_value(pod: dict, path: str) -> str:
    """The downward API's fieldRef paths."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"), "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(p["ip"] for p in status.get("podIPs") or []),
        "status.hostIPs": ",".join(p["ip"] for p in status.get("hostIPs") or []),
        "metadata.labels": "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("labels") or {}).items())),
        "metadata.annotations": "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("annotations") or {}).items())),
    }
    if path not in simple:
        raise EnvError(f"unsupported fieldRef {path}")
    return str(simple[path] or "")


_DIVISORS = {"": 1, "1": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "m": 1e-3}


def _quantity(q: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    if not m:
        raise EnvError(f"bad quantity {q}")
    return float(m.group(1)) * _DIVISORS.get(m.group(2), 1)


def resource_value(container: dict, ref: dict) -> str:
    """resourceFieldRef: limits/requests of this container, rounded up as the kubelet does."""
    import math

    section, _, name = ref["resource"].partition(".")
    value = ((container.get("resources") or {}).get(section) or {}).get(name)
    if value is None:
        return "0"
    divisor = _quantity(ref.get("divisor") or "1")
    return str(max(1, math.ceil(_quantity(value) / divisor)))


def _ref(lookup: Lookup, kind: str, ns: str, ref: dict) -> str | None:
    data = lookup(kind, ns, ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise EnvError(f"{kind} {ref['name']!r}" + ("" if data is None else f" has no key {ref['key']!r}"))
    return data[ref["key"]]


def service_links(services: list[dict], namespace: str) -> dict[str, str]:
    """The Docker-links-style variables the kubelet adds for each Service with a ClusterIP in
    the pod's namespace (enableServiceLinks, on by default): a Service named like one of the
    app's own variables shadows it in a real cluster, and so it does here."""
    env: dict[str, str] = {}
    for svc in services:
        ip, ports = svc["spec"].get("clusterIP"), svc["spec"].get("ports") or []
        if svc["metadata"].get("namespace") != namespace or ip in (None, "", "None") or not ports:
            continue
        name = svc["metadata"]["name"].upper().replace("-", "_")
        first = ports[0]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(first["port"])
        env[f"{name}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"
        for p in ports:
            proto = p.get("protocol", "TCP")
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            prefix = f"{name}_PORT_{p['port']}_{proto}"
            env[prefix] = f"{proto.lower()}://{ip}:{p['port']}"
            env[f"{prefix}_PROTO"] = proto.lower()
            env[f"{prefix}_PORT"] = str(p["port"])
            env[f"{prefix}_ADDR"] = ip
    return env


def build(pod: dict, container: dict, base: dict[str, str], lookup: Lookup) -> dict[str, str]:
    """`base` (PATH, HOME, KUBERNETES_SERVICE_*) overlaid by envFrom, then env, in order."""
    ns = pod["metadata"]["namespace"]
    env = dict(base)
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        kind, ref = ("configmap", src["configMapRef"]) if "configMapRef" in src else ("secret", src.get("secretRef"))
        if not ref:
            continue
        data = lookup(kind, ns, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise EnvError(f"{kind} {ref['name']!r} not found")
        env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        name, vf = var["name"], var.get("valueFrom")
        if vf is None:
            env[name] = expand(var.get("value", ""), env)
        elif "fieldRef" in vf:
            env[name] = field_value(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            env[name] = resource_value(container, vf["resourceFieldRef"])
        elif "configMapKeyRef" in vf:
            value = _ref(lookup, "configmap", ns, vf["configMapKeyRef"])
            if value is not None:
                env[name] = value
        elif "secretKeyRef" in vf:
            value = _ref(lookup, "secret", ns, vf["secretKeyRef"])
            if value is not None:
                env[name] = value
    return env


def decode_secret(data: dict[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in (data or {}).items()}
