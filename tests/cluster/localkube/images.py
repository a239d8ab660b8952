"""The real node's own images: one static binary in an otherwise empty image, written as an
OCI image-layout archive and imported into containerd.

No registry is reachable here and the node must pull nothing, so the pause (sandbox) image
and the test image `nodeprobe` are made from binaries build.sh compiled. Writing the archive
takes a tar and three JSON documents; it needs neither podman nor a base image, and the same
binary always gives the same image digest (fixed mtimes and owners).

The project's own images (`make images`, podman) are copied in by `load_project`: skopeo copies
each into an OCI layout in the cache, layer by layer, and the layers containerd lacks stream
into `ctr images import` (`copy_from_podman`); an image containerd already holds under the same
ID (its config digest, the same in both stores) is skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

REGISTRY = "localkube.dev"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYOUT_FILE = ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')  # an OCI archive's first member


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class BinaryImage:
    """An image of one binary at /<name>, run as `entrypoint` by the given user."""

    name: str
    tag: str = "local"
    user: str = ""

    @property
    def ref(self) -> str:
        return f"{REGISTRY}/{self.name}:{self.tag}"


PAUSE = BinaryImage("pause", user="65535:65535")
NODEPROBE = BinaryImage("nodeprobe")
COREDNS = BinaryImage("coredns", user="65532:65532")
ALL = (PAUSE, NODEPROBE, COREDNS)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(binary: Path, name: str) -> bytes:
    """An uncompressed tar holding the binary at /<name> and an empty /tmp."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(tmp)
        info = tarfile.TarInfo(name)
        data = binary.read_bytes()
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def manifest_digest(tarball: Path) -> str:
    """The digest of the image's manifest, as containerd lists it."""
    with tarfile.open(tarball) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        return json.load(member)["manifests"][0]["digest"]


def archive(image: BinaryImage, binary: Path, out: Path) -> Path:
    """Write `image` as an OCI image-layout tar at `out` (kept, and reused while the binary is
    unchanged); containerd names the image from the `io.containerd.image.name` annotation of
    its index entry."""
    source = out.with_suffix(".source")
    stamp = f"{binary.resolve()} {binary.stat().st_size} {binary.stat().st_mtime_ns}\n"
    if out.exists() and source.exists() and source.read_text() == stamp:
        return out
    layer = _layer(binary, image.name)
    layer_gz = gzip.compress(layer, compresslevel=1, mtime=0)
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": [f"/{image.name}"], "User": image.user, "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": _digest(layer_gz), "size": len(layer_gz)}],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": _digest(manifest), "size": len(manifest),
            "annotations": {"io.containerd.image.name": image.ref, "org.opencontainers.image.ref.name": image.tag},
        }],
    }, sort_keys=True).encode()
    files = dict([OCI_LAYOUT_FILE, ("index.json", index)])
    for blob in (layer_gz, config, manifest):
        files[f"blobs/sha256/{_digest(blob).split(':')[1]}"] = blob
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source.write_text(stamp)
    return out


def present(ctr: Path, address: Path, image: BinaryImage, digest: str) -> bool:
    """containerd already holds `image` at exactly this manifest digest."""
    proc = subprocess.run(
        [str(ctr), "--address", str(address), "--namespace", "k8s.io", "images", "ls", f"name=={image.ref}"],
        capture_output=True, text=True, timeout=60,
    )
    return proc.returncode == 0 and digest in proc.stdout


def load(ctr: Path, address: Path, tarball: Path) -> None:
    """Import an archive into containerd's `k8s.io` namespace (the one the CRI plugin reads),
    unpacked for the overlayfs snapshotter so a pod starts without a pull."""
    proc = subprocess.run(
        [str(ctr), "--address", str(address), "--namespace", "k8s.io", "images", "import",
         "--snapshotter", "overlayfs", str(tarball)],
        capture_output=True, text=True, timeout=180,
    )
    if proc.returncode != 0:
        raise ImageError(f"ctr images import {tarball.name}: {proc.stderr.strip() or proc.stdout.strip()}")


def load_all(bin_dir: Path, ctr: Path, address: Path, work: Path) -> list[str]:
    """Make and import every image whose binary build.sh produced, unless containerd already
    has it (its store outlives `cluster-down`); returns the refs imported now."""
    loaded = []
    for image in ALL:
        binary = bin_dir / image.name
        if binary.exists():
            tarball = archive(image, binary, work / f"{image.name}.tar")
            if not present(ctr, address, image, manifest_digest(tarball)):
                load(ctr, address, tarball)
                loaded.append(image.ref)
    return loaded


# What `make images` tags (images/build.sh): docker.io/modelfleet/<Dockerfile stem>:<appVersion>.
PROJECT_PREFIX = "docker.io/modelfleet/"
REPO = Path(__file__).resolve().parents[3]
PODMAN_CONF = REPO / "images" / "podman" / "containers.conf"


def project_image(name: str) -> str:
    """The reference `make images` gives images/<name>.Dockerfile's image (the chart's appVersion
    as its tag), as the kubelet lists it."""
    chart = yaml.safe_load((REPO / "charts" / "modelfleet" / "Chart.yaml").read_text())
    return f"{PROJECT_PREFIX}{name}:{chart['appVersion']}"


def podman_env() -> dict[str, str]:
    """podman with the settings the images were built with (images/README.md)."""
    return {**os.environ, "CONTAINERS_CONF": str(PODMAN_CONF)} if PODMAN_CONF.exists() else dict(os.environ)


def podman_images(names: tuple[str, ...] = ()) -> dict[str, tuple[str, int]]:
    """The project's images podman holds, {ref: (image ID, size in bytes)}; only `names`
    (Dockerfile stems such as `worker`) when given."""
    proc = subprocess.run(["podman", "images", "--format", "json"], capture_output=True, text=True,
                          env=podman_env(), timeout=60)
    if proc.returncode != 0:
        raise ImageError(f"podman images: {proc.stderr.strip()}")
    found: dict[str, tuple[str, int]] = {}
    for image in json.loads(proc.stdout or "[]"):
        for ref in image.get("Names") or []:
            stem = ref.removeprefix(PROJECT_PREFIX).split(":", 1)[0]
            if ref.startswith(PROJECT_PREFIX) and (not names or stem in names):
                found[ref] = ("sha256:" + image["Id"].removeprefix("sha256:"), int(image.get("Size") or 0))
    return found


def cri_images(crictl: Path, address: Path) -> dict[str, str]:
    """{ref: image ID} as the kubelet sees them through the CRI (the ID is the config digest)."""
    proc = subprocess.run([str(crictl), "--runtime-endpoint", f"unix://{address}", "images", "-o", "json"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ImageError(f"crictl images: {proc.stderr.strip()}")
    return {tag: image["id"] for image in json.loads(proc.stdout)["images"] for tag in image.get("repoTags") or []}


def layout_manifest(layout: Path, ref: str) -> tuple[dict, list[str]]:
    """The index entry of `ref` in the OCI layout at `layout`, and the digests of the blobs its
    image is made of: its manifest, its config, then its layers."""
    index = json.loads((layout / "index.json").read_text())
    entry = next((m for m in index.get("manifests", [])
                  if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref), None)
    if entry is None:
        raise ImageError(f"{ref} is not in the OCI layout at {layout}")
    manifest = json.loads(_blob(layout, entry["digest"]).read_bytes())
    return entry, [entry["digest"], manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def _blob(layout: Path, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algorithm / hexdigest


def prune_layout(layout: Path) -> int:
    """Deletes the blobs no image in the layout's index uses any more (the layers of images
    rebuilt since); returns the bytes freed."""
    index = json.loads((layout / "index.json").read_text())
    refs = [(m.get("annotations") or {}).get("org.opencontainers.image.ref.name") for m in index["manifests"]]
    used = {digest for ref in refs if ref for digest in layout_manifest(layout, ref)[1]}
    freed = 0
    for path in (layout / "blobs" / "sha256").iterdir():
        if f"sha256:{path.name}" not in used:
            freed += path.stat().st_size
            path.unlink()
    return freed


def content_digests(ctr: Path, address: Path) -> set[str]:
    """The digests of every blob containerd's `k8s.io` namespace holds."""
    proc = subprocess.run([str(ctr), "--address", str(address), "--namespace", "k8s.io", "content", "ls", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ImageError(f"ctr content ls: {proc.stderr.strip()}")
    return set(proc.stdout.split())


def write_import(out, layout: Path, ref: str, held: set[str]) -> int:
    """Writes to `out` an OCI archive of `ref` from the layout for `ctr images import`, leaving out
    the layers containerd already `held`: its importer takes the manifest's children from its
    content store, not from the archive. The manifest and the config always go (they are small,
    and containerd must see them to name the image). Returns the bytes of blobs written."""
    entry, digests = layout_manifest(layout, ref)
    entry = {**entry, "annotations": {**entry.get("annotations", {}), "io.containerd.image.name": ref}}
    index = json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()
    written = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (OCI_LAYOUT_FILE, ("index.json", index)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i, digest in enumerate(digests):
            if i >= 2 and digest in held:
                continue
            path = _blob(layout, digest)
            info = tarfile.TarInfo(f"blobs/{digest.replace(':', '/')}")
            info.size = path.stat().st_size
            with path.open("rb") as blob:
                tar.addfile(info, blob)
            written += info.size
    return written


def copy_from_podman(ref: str, size: int, ctr: Path, address: Path, layout: Path,
                     say: Callable[[str], None]) -> None:
    """Copies `ref` from podman's store into containerd, moving only the layers containerd lacks.

    skopeo first brings the image into an OCI layout kept in the machine's cache (`layout`), with
    its layers uncompressed: a layer's digest is then its diffID, which podman's store already
    knows, so skopeo skips the layers the layout holds without reading them. Then an archive of
    the manifest, the config and the layers containerd does not hold streams into `ctr images
    import` (`write_import`). A rebuilt worker image whose only new layer is the project's code
    so moves that layer, where `podman save` wrote all 3.5 GB of it every time (134 s here)."""
    layout.mkdir(parents=True, exist_ok=True)
    phase, start = ["skopeo copying new layers out of podman"], time.monotonic()
    done = threading.Event()
    stream: _Counted | None = None

    def progress() -> None:
        while not done.wait(10):
            sent = f", {stream.count / 1e9:.2f} GB so far" if stream is not None and phase[0].startswith("stream") else ""
            say(f"  {ref}: {phase[0]}{sent} ({time.monotonic() - start:.0f}s)")

    threading.Thread(target=progress, name="image-progress", daemon=True).start()
    try:
        with tempfile.TemporaryFile() as output:
            # skopeo parses `oci:PATH:REF` at the first colon after PATH; REF keeps its own colon
            copy = subprocess.run(["skopeo", "copy", "--quiet", "--dest-oci-accept-uncompressed-layers",
                                   f"containers-storage:{ref}", f"oci:{layout}:{ref}"],
                                  stdout=output, stderr=subprocess.STDOUT, env=podman_env(), timeout=1800)
            if copy.returncode != 0:
                raise ImageError(f"skopeo copy {ref}: {_text(output)}")
        held = content_digests(ctr, address)
        phase[0] = "streaming the layers containerd lacks"
        with tempfile.TemporaryFile() as output:
            load = subprocess.Popen([str(ctr), "--address", str(address), "--namespace", "k8s.io", "images", "import",
                                     "--snapshotter", "overlayfs", "-"], stdin=subprocess.PIPE, stdout=output,
                                    stderr=subprocess.STDOUT)
            assert load.stdin is not None
            stream = _Counted(load.stdin)
            try:
                try:
                    sent = write_import(stream, layout, ref, held)
                    load.stdin.close()
                except BrokenPipeError:
                    sent = 0  # ctr stopped reading: its own error is below
                phase[0] = "containerd unpacking"
                if load.wait(timeout=1800) != 0:
                    raise ImageError(f"ctr images import {ref}: {_text(output)}")
            finally:
                if load.poll() is None:
                    load.kill()
                    load.wait()
        freed = prune_layout(layout)
        say(f"  {ref}: {sent / 1e9:.2f} of {size / 1e9:.2f} GB sent to containerd"
            + (f", {freed / 1e9:.2f} GB of old layers pruned from the layout" if freed else ""))
    finally:
        done.set()


def load_project(bin_dir: Path, address: Path, layout: Path, names: tuple[str, ...],
                 say: Callable[[str], None]) -> list[str]:
    """Copy the project's images from podman into containerd, skipping those it already holds
    under the same ID; returns the refs copied now."""
    wanted = podman_images(names)
    if not wanted:
        raise ImageError(f"podman holds no {PROJECT_PREFIX}{'|'.join(names) or '*'} image (run `make images`)")
    held = cri_images(bin_dir / "crictl", address)
    copied = []
    for ref, (image_id, size) in sorted(wanted.items()):
        if held.get(ref) == image_id:
            say(f"{ref}: up to date ({image_id[:19]})")
            continue
        began = time.monotonic()
        say(f"{ref}: copying from podman ({size / 1e9:.2f} GB)")
        copy_from_podman(ref, size, bin_dir / "ctr", address, layout, say)
        if cri_images(bin_dir / "crictl", address).get(ref) != image_id:
            raise ImageError(f"{ref}: imported, but containerd does not list it as {image_id}")
        say(f"{ref}: imported ({time.monotonic() - began:.0f}s)")
        copied.append(ref)
    return copied


class _Counted:
    """A writable stream that counts the bytes written through it (for progress)."""

    def __init__(self, raw) -> None:
        self.raw, self.count = raw, 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return self.raw.write(data)


def _text(output) -> str:
    output.seek(0)
    return output.read().decode(errors="replace").strip()
