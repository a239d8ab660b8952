"""Kubeconfig files for the user (admin) and for each component's own identity."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

from .files import write_if_changed

CONTEXT = "modelfleet-local"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def render(server: str, pki: Path, stem: str) -> dict:
    """A kubeconfig with the CA and the `stem` client certificate embedded, so it can be
    copied or mounted anywhere without the pki folder."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": server, "certificate-authority-data": _b64(pki / "ca.crt")}}],
        "users": [
            {
                "name": stem,
                "user": {
                    "client-certificate-data": _b64(pki / f"{stem}.crt"),
                    "client-key-data": _b64(pki / f"{stem}.key"),
                },
            }
        ],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": stem, "namespace": "default"}}],
        "current-context": CONTEXT,
    }


def write(path: Path, server: str, pki: Path, stem: str) -> Path:
    write_if_changed(path, yaml.safe_dump(render(server, pki, stem), sort_keys=False), 0o600)
    return path
