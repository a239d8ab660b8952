"""The real node's own images: one static binary in an otherwise empty image, written as an
OCI image-layout archive and imported into containerd.

No registry is reachable here and the node must pull nothing, so the pause (sandbox) image
and the test image `nodeprobe` are made from binaries build.sh compiled. Writing the archive
takes a tar and three JSON documents; it needs neither podman nor a base image, and the same
binary always gives the same image digest (fixed mtimes and owners).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

REGISTRY = "localkube.dev"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


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
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
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
