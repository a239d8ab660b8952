"""Configuration files the cluster's processes read: written only when their content changes.

kube-proxy watches its `--config` file and exits on any write to it, even of the same bytes
("content of the proxy server's configuration file was updated"), so that its supervisor
restarts it with the new configuration, as kubeadm's DaemonSet does when its ConfigMap changes.
The harness is that supervisor: `up` writes every file before the process that reads it
starts, and rewriting an unchanged file (`restart` of another component, `up` on a partial
cluster) must leave the running processes alone, as a configuration manager reports
"unchanged" and restarts nothing.
"""

from __future__ import annotations

from pathlib import Path


def write_if_changed(path: Path, text: str, mode: int | None = None) -> bool:
    """Write `text` to `path` unless it already holds exactly that, and give it `mode` if it
    has another; returns whether the content was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        changed = path.read_text() != text
    except (FileNotFoundError, UnicodeDecodeError):
        changed = True
    if changed:
        path.write_text(text)
    if mode is not None and path.stat().st_mode & 0o7777 != mode:
        path.chmod(mode)
    return changed
