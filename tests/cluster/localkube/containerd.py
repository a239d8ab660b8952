"""containerd for the real node: its configuration and its process.

What containerd keeps while it runs lives under the cluster's state folder (state, socket,
the pods' network namespaces); its persistent store (`root`: images, snapshots, metadata) lives
in the machine's cache, so the images `load-images` copied outlive `down` and a fresh clone,
and a warm run copies only what changed. Podman's storage is never touched. Settings this machine needs, and why:

- cgroupfs, not systemd cgroups: there is no systemd, and cgroups are hybrid v1.
- `restrict_oom_score_adj`: without CAP_SYS_RESOURCE no process may lower its OOM score, and
  the kubelet asks for negative scores (guaranteed pods); containerd clamps them instead of
  failing the container.
- The sandbox (pause) image is the locally made `localkube.dev/pause:local`, and every
  registry resolves to a closed loopback port: no registry is reachable and a pod must pull
  nothing, so an image that was not imported fails fast with ErrImagePull, as a real
  cluster's kubelet reports an image it cannot pull.
- NRI is off: its socket would be machine-wide (/var/run/nri).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from . import cni, images
from .config import Settings
from .controlplane import Component
from .files import write_if_changed

# A port nothing listens on: every image pull is refused at once, without DNS or traffic
# leaving the machine.
NO_REGISTRY = "http://127.0.0.1:1"
RUNC = shutil.which("runc") or "/usr/sbin/runc"


def home(s: Settings) -> Path:
    return s.state / "containerd"


def root(s: Settings) -> Path:
    """containerd's persistent store, in the cache rather than the cluster's folder: copying the
    project's images in is the node's slowest step (the vLLM CPU image 384 s, the worker image
    72-170 s), and each checkout would otherwise pay it again. One real node runs on a machine
    at a time anyway (kube-proxy's chains are machine-wide); a second containerd on this store
    would wait on its metadata lock. `down` removes every pod through the CRI first, so only
    images stay."""
    return s.cache / "node" / "containerd"


def image_layout(s: Settings) -> Path:
    """The OCI layout the project's images pass through on their way from podman (see
    images.copy_from_podman), in the cache beside the store: it keeps the layers of the last
    copy, so the next one writes only the layers rebuilt since."""
    return s.cache / "node" / "oci-layout"


def socket(s: Settings) -> Path:
    return home(s) / "containerd.sock"


def render(s: Settings) -> str:
    """containerd's config.toml (version 3, containerd 2.x)."""
    h = home(s)
    return f"""\
version = 3
root = "{root(s)}"
state = "{h / 'state'}"

[grpc]
  address = "{socket(s)}"

[ttrpc]
  address = "{h / 'containerd.sock.ttrpc'}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{h / 'opt'}"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.transfer.v1.local"]
  config_path = "{h / 'certs.d'}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  # The CRI's own pull path, so the registry settings below are the ones used.
  use_local_image_pull = true
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{images.PAUSE.ref}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{h / 'certs.d'}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  tolerate_missing_hugetlb_controller = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{h / 'runc'}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni.PLUGIN_DIR}"]
    conf_dir = "{cni.conf_dir(s)}"
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def write_config(s: Settings) -> Path:
    h = home(s)
    write_if_changed(h / "certs.d" / "_default" / "hosts.toml", f'server = "{NO_REGISTRY}"\n')
    path = h / "config.toml"
    write_if_changed(path, render(s))
    return path


def _ctr(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(s.k8s_bin / "ctr"), "--address", str(socket(s)), *args],
                          capture_output=True, text=True, timeout=30)


def component(s: Settings) -> Component:
    def healthy() -> bool:
        return socket(s).exists() and _ctr(s, "version").returncode == 0

    return Component("containerd", [str(s.k8s_bin / "containerd"), "--config", str(write_config(s))],
                     (), healthy, timeout=60)


def env(s: Settings) -> dict[str, str]:
    """containerd finds its shim (containerd-shim-runc-v2) on PATH."""
    return {**os.environ, "PATH": f"{s.k8s_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}


def load_images(s: Settings) -> str:
    """Import the node's own images; returns what to tell the user."""
    refs = images.load_all(s.k8s_bin, s.k8s_bin / "ctr", socket(s), home(s) / "images")
    return f"imported {', '.join(refs)}" if refs else "images up to date"


def load_project_images(s: Settings, names: tuple[str, ...] = ()) -> list[str]:
    """Copy the images `make images` built (podman) into this node's containerd: a separate
    step (`localkube load-images`) rather than part of `up`, so a cluster starts without
    podman or the images, and a running one takes a rebuilt image without a restart."""
    if s.node_kind != "kubelet":
        raise images.ImageError("the agent runs modelfleet/... images from the project's Python: nothing to load")
    if not (socket(s).exists() and _ctr(s, "version").returncode == 0):
        raise images.ImageError(f"containerd is not running at {socket(s)} (run `make cluster-up` first)")
    return images.load_project(s.k8s_bin, socket(s), image_layout(s), names,
                               lambda msg: print(f"[load-images] {msg}", flush=True))
