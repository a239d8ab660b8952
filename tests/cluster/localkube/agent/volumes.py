"""Pod volumes as local folders: emptyDir, configMap, secret, downwardAPI, projected
(service-account token + CA + namespace, as the ServiceAccount admission plugin injects)
and hostPath. The pod's containers see them through bind mounts in their mount namespace."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import env as envmod

# (kind, namespace, name) -> {key: bytes} or None when the object does not exist.
Fetch = Callable[[str, str, str], dict[str, bytes] | None]
# (serviceAccountName, audience or None, expirationSeconds) -> a bound token for this pod.
TokenFn = Callable[[str, str | None, int], str]
# (namespace, claim name) -> the host folder of the PersistentVolume bound to the claim.
ClaimFn = Callable[[str, str], str]


class VolumeError(RuntimeError):
    """A volume cannot be made yet (missing ConfigMap/Secret) or at all (unsupported type)."""


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def configmap_bytes(obj: dict) -> dict[str, bytes]:
    out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def secret_bytes(obj: dict) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _keyed(dest: Path, data: dict[str, bytes], items: list[dict] | None, mode: int, what: str) -> None:
    if items:
        for item in items:
            if item["key"] not in data:
                raise VolumeError(f"{what} has no key {item['key']!r}")
            _write(dest / item["path"], data[item["key"]], int(item.get("mode") or mode))
    else:
        for k, v in data.items():
            _write(dest / k, v, mode)


def _object(fetch: Fetch, kind: str, ns: str, name: str, optional: bool) -> dict[str, bytes]:
    data = fetch(kind, ns, name)
    if data is None:
        if optional:
            return {}
        raise VolumeError(f"{kind} {name!r} not found")
    return data


def _downward(dest: Path, pod: dict, items: list[dict], mode: int) -> None:
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    for item in items:
        if "fieldRef" in item:
            value = envmod.field_value(pod, item["fieldRef"]["fieldPath"])
        else:
            ref = item["resourceFieldRef"]
            value = envmod.resource_value(containers[ref.get("containerName") or next(iter(containers))], ref)
        _write(dest / item["path"], value.encode(), int(item.get("mode") or mode))


def _projected(dest: Path, pod: dict, spec: dict, fetch: Fetch, token: TokenFn) -> None:
    ns = pod["metadata"]["namespace"]
    mode = int(spec.get("defaultMode") or 0o644)
    for src in spec.get("sources") or []:
        if "serviceAccountToken" in src:
            t = src["serviceAccountToken"]
            sa = pod["spec"].get("serviceAccountName") or "default"
            _write(dest / t["path"], token(sa, t.get("audience"), int(t.get("expirationSeconds") or 3607)).encode(), 0o600)
        elif "configMap" in src:
            ref = src["configMap"]
            data = _object(fetch, "configmap", ns, ref["name"], bool(ref.get("optional")))
            _keyed(dest, data, ref.get("items"), mode, f"configmap {ref['name']!r}")
        elif "secret" in src:
            ref = src["secret"]
            data = _object(fetch, "secret", ns, ref["name"], bool(ref.get("optional")))
            _keyed(dest, data, ref.get("items"), mode, f"secret {ref['name']!r}")
        elif "downwardAPI" in src:
            _downward(dest, pod, src["downwardAPI"].get("items") or [], mode)


def materialize(pod: dict, root: Path, fetch: Fetch, token: TokenFn, claim: ClaimFn) -> dict[str, str]:
    """Create every volume of the pod under `root`; returns volume name -> host path."""
    ns = pod["metadata"]["namespace"]
    out: dict[str, str] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        dest = root / name
        if "hostPath" in vol:
            hp = vol["hostPath"]
            path = Path(hp["path"])
            if hp.get("type") == "FileOrCreate":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch(exist_ok=True)
            elif not path.exists() and hp.get("type") in (None, "", "DirectoryOrCreate"):
                path.mkdir(parents=True, exist_ok=True)
            out[name] = str(path)
            continue
        if "persistentVolumeClaim" in vol:
            out[name] = claim(ns, vol["persistentVolumeClaim"]["claimName"])
            continue
        dest.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in vol:
            pass
        elif "configMap" in vol:
            ref = vol["configMap"]
            data = _object(fetch, "configmap", ns, ref["name"], bool(ref.get("optional")))
            _keyed(dest, data, ref.get("items"), int(ref.get("defaultMode") or 0o644), f"configmap {ref['name']!r}")
        elif "secret" in vol:
            ref = vol["secret"]
            data = _object(fetch, "secret", ns, ref["secretName"], bool(ref.get("optional")))
            _keyed(dest, data, ref.get("items"), int(ref.get("defaultMode") or 0o644), f"secret {ref['secretName']!r}")
        elif "downwardAPI" in vol:
            _downward(dest, pod, vol["downwardAPI"].get("items") or [], int(vol["downwardAPI"].get("defaultMode") or 0o644))
        elif "projected" in vol:
            _projected(dest, pod, vol["projected"], fetch, token)
        else:
            kind = next((k for k in vol if k != "name"), "unknown")
            raise VolumeError(f"volume {name!r}: type {kind} is not supported by the local node agent")
        out[name] = str(dest)
    return out


def refresh(pod: dict, root: Path, fetch: Fetch) -> None:
    """Rewrite configMap and secret volumes from the current objects, as the kubelet's
    periodic sync does (a directory mount sees the new files; a subPath mount does not)."""
    ns = pod["metadata"]["namespace"]
    for vol in pod["spec"].get("volumes") or []:
        for kind, key in (("configMap", "name"), ("secret", "secretName")):
            if kind in vol:
                ref = vol[kind]
                data = fetch(kind.lower(), ns, ref[key])
                if data is not None:
                    try:
                        _keyed(root / vol["name"], data, ref.get("items"), int(ref.get("defaultMode") or 0o644), kind)
                    except VolumeError:
                        pass


def mounts(container: dict, volume_paths: dict[str, str]) -> list[Mount]:
    """The container's volumeMounts resolved to host paths (subPath included)."""
    out = []
    for vm in container.get("volumeMounts") or []:
        src = volume_paths.get(vm["name"])
        if src is None:
            raise VolumeError(f"volumeMount {vm['name']!r} names no volume")
        if vm.get("subPath"):
            src = os.path.join(src, vm["subPath"])
            if not os.path.exists(src):
                os.makedirs(src, exist_ok=True)
        out.append(Mount(src, vm["mountPath"], bool(vm.get("readOnly"))))
    return out
