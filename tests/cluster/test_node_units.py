"""The real node's pure parts: the image archives it makes, the CNI, kubelet and
containerd configurations it writes (no cluster needed)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import tarfile
import tomllib
from pathlib import Path

from localkube import cni, containerd, images, kubelet, kubeproxy
from localkube.config import Network, Settings


def _settings(tmp_path: Path) -> Settings:
    net = Network(bridge="mfkt0", cidr=ipaddress.IPv4Network("10.250.0.0/16"), service_cidr="10.150.0.0/16")
    return Settings(state=tmp_path / "state", network=net, node_kind="kubelet")


def test_image_archive_is_an_oci_layout_named_for_containerd(tmp_path: Path) -> None:
    binary = tmp_path / "prog"
    binary.write_bytes(b"\x7fELF not really")
    out = images.archive(images.NODEPROBE, binary, tmp_path / "a.tar")
    with tarfile.open(out) as tar:
        index = json.load(tar.extractfile("index.json"))
        entry = index["manifests"][0]
        assert entry["annotations"]["io.containerd.image.name"] == "localkube.dev/nodeprobe:local"
        manifest = json.load(tar.extractfile(f"blobs/sha256/{entry['digest'].split(':')[1]}"))
        config = json.load(tar.extractfile(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"))
        assert config["config"]["Entrypoint"] == ["/nodeprobe"]
    # Same binary, same image: a re-import is a no-op for containerd.
    again = images.archive(images.NODEPROBE, binary, tmp_path / "b.tar")
    assert out.read_bytes() == again.read_bytes()


def _layout_image(layout: Path, ref: str, layers: list[bytes]) -> list[str]:
    """Writes an image into an OCI layout as skopeo does (index entry named by
    org.opencontainers.image.ref.name, replacing one of the same name); returns its blobs'
    digests: manifest, config, layers."""
    def put(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = layout / "blobs" / "sha256" / digest.split(":")[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return digest

    layer_digests = [put(data) for data in layers]
    config = put(json.dumps({"rootfs": {"diff_ids": layer_digests}}).encode())
    manifest = put(json.dumps({"config": {"digest": config}, "layers": [{"digest": d} for d in layer_digests]}).encode())
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] != ref]
    index["manifests"].append({"digest": manifest, "annotations": {"org.opencontainers.image.ref.name": ref}})
    index_path.write_text(json.dumps(index))
    return [manifest, config, *layer_digests]


def test_image_import_sends_only_the_layers_containerd_lacks(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    ref = "docker.io/modelfleet/worker:1"
    base, deps, code = b"base" * 1000, b"deps" * 1000, b"code v2"
    manifest, config, *layers = _layout_image(layout, ref, [base, deps, code])
    out = tmp_path / "import.tar"
    with out.open("wb") as f:  # containerd holds the base and deps layers from an earlier copy
        sent = images.write_import(f, layout, ref, held={layers[0], layers[1], config})
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        index = json.load(tar.extractfile("index.json"))
    blob = lambda d: f"blobs/{d.replace(':', '/')}"  # noqa: E731
    assert names == {"oci-layout", "index.json", blob(manifest), blob(config), blob(layers[2])}
    assert sent == len(code) + (layout / blob(manifest)).stat().st_size + (layout / blob(config)).stat().st_size
    (entry,) = index["manifests"]
    assert entry["digest"] == manifest and entry["annotations"]["io.containerd.image.name"] == ref


def test_image_layout_prunes_the_layers_of_rebuilt_images_only(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    old = _layout_image(layout, "docker.io/modelfleet/worker:1", [b"base", b"code v1"])
    kept = _layout_image(layout, "docker.io/modelfleet/control-plane:1", [b"base", b"gateway"])
    new = _layout_image(layout, "docker.io/modelfleet/worker:1", [b"base", b"code v2"])  # rebuilt
    stale = set(old) - set(new) - set(kept)  # the old code layer, manifest and config
    assert len(stale) == 3
    freed = sum((layout / "blobs" / "sha256" / d.split(":")[1]).stat().st_size for d in stale)
    assert images.prune_layout(layout) == freed
    left = {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()}
    assert left == set(new) | set(kept)
    assert images.layout_manifest(layout, "docker.io/modelfleet/worker:1")[1] == new


def test_cni_gives_pods_the_node_range_and_only_the_service_route(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    plugin = cni.render(s)["plugins"][0]
    assert plugin["bridge"] == "mfkt0" and plugin["isGateway"] and not plugin["ipMasq"]
    rng = plugin["ipam"]["ranges"][0][0]
    assert (rng["subnet"], rng["gateway"], rng["rangeStart"]) == ("10.250.0.0/16", "10.250.0.1", "10.250.1.2")
    assert plugin["ipam"]["routes"] == [{"dst": "10.150.0.0/16"}]
    assert plugin["ipam"]["dataDir"].startswith(str(s.state))


def test_kubelet_and_kube_proxy_configs_fit_this_machine(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    cfg = kubelet.render(s)
    assert cfg["failCgroupV1"] is False and cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["clusterDNS"] == ["10.150.0.10"] and cfg["address"] == "10.250.0.1"
    assert cfg["containerRuntimeEndpoint"] == f"unix://{containerd.socket(s)}"
    proxy = kubeproxy.render(s)
    assert proxy["nodePortAddresses"] == ["127.0.0.1/32", "10.250.0.1/32"]
    assert s.apiserver_url == f"https://10.250.0.1:{s.ports.apiserver}"


def test_containerd_config_is_valid_toml_with_the_settings_that_matter(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    cfg = tomllib.loads(containerd.render(s))
    runtime = cfg["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert cfg["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == images.PAUSE.ref
    assert cfg["grpc"]["address"].startswith(str(s.state)) and cfg["state"].startswith(str(s.state))
    # The image store outlives the cluster's folder, so a fresh checkout copies no image twice.
    assert cfg["root"].startswith(str(s.cache)) and not cfg["root"].startswith(str(s.state))


def test_real_node_runs_ingress_and_storage_on_the_host_after_the_node(tmp_path: Path) -> None:
    from localkube import cluster, hostcontrollers

    s = _settings(tmp_path)
    # Started after kube-proxy, stopped first by `down` (which walks the order backwards).
    assert cluster.order(s)[-3:] == ("kube-proxy", "nginx", hostcontrollers.NAME)
    assert hostcontrollers.argv(s)[1:] == ["-m", "localkube.hostcontrollers"]
    nginx = cluster._nginx(s)
    assert nginx.ports == (s.ports.ingress,)
    conf = (s.state / "nginx" / "nginx.conf").read_text()
    assert f"listen 127.0.0.1:{s.ports.ingress} default_server;" in conf
