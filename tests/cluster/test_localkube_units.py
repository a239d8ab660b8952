"""Unit tests of the harness's pure parts (no cluster needed): pod status rules, env
expansion, EndpointSlice reading, the nginx configuration, config files written only when they
change (and `restart` touching only its component's) and the env file `up` leaves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from localkube import cluster, nginxconf
from localkube.agent import endpoints, env, ingress, status
from localkube.agent.container import Container, Terminated, is_local_image, message_from_log
from localkube.config import Network, Settings
from localkube.testing import read_env

POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"}},
       "spec": {"nodeName": "localkube-0", "containers": [{"name": "c", "image": "modelfleet/x"}]},
       "status": {"podIP": "10.244.1.2"}}


def facts(**kw) -> status.PodFacts:
    base = dict(pod_ip="10.244.1.2", host_ip="10.244.0.1", start_time="t", sandbox_ready=True,
                init_done=True, init_failed=False)
    return status.PodFacts(**{**base, **kw})


def test_phase_follows_the_kubelet_rules() -> None:
    c = Container({"name": "c", "image": "modelfleet/x"})
    assert status.phase("Always", facts(), [c]) == "Pending"  # never started
    c.runs = 1
    assert status.phase("Always", facts(), [c]) == "Running"
    c.terminated = Terminated(0, "Completed", "a", "b")
    assert status.phase("Never", facts(), [c]) == "Succeeded"
    c.terminated = Terminated(1, "Error", "a", "b")
    assert status.phase("Never", facts(), [c]) == "Failed"
    assert status.phase("Never", facts(init_done=False), [c]) == "Pending"


def test_waiting_container_status_nulls_other_states() -> None:
    c = Container({"name": "c", "image": "nginx"})
    c.waiting = ("ErrImagePull", "nope")
    st = status.container_status(c, "u")
    assert st["state"] == {"waiting": {"reason": "ErrImagePull", "message": "nope"}, "running": None, "terminated": None}
    assert st["ready"] is False and st["restartCount"] == 0


def test_env_expansion_and_downward_api() -> None:
    container = {"env": [{"name": "A", "value": "x"}, {"name": "B", "value": "$(A)-$(MISSING)-$$(A)"},
                         {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                         {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}
    out = env.build(POD, container, {"BASE": "1"}, lambda *a: None)
    assert out == {"BASE": "1", "A": "x", "B": "x-$(MISSING)-$(A)", "N": "x", "IP": "10.244.1.2"}


def test_only_project_images_run_locally() -> None:
    assert is_local_image("modelfleet/worker:dev")
    assert is_local_image("ghcr.io/acme/modelfleet-gateway:1.0")
    assert not is_local_image("nginx:1.27")
    assert not is_local_image("registry/x:modelfleet")


def test_vllm_images_run_from_the_vllm_environment_or_wait_with_the_command_that_installs_it(
        tmp_path, monkeypatch) -> None:
    from localkube.agent.container import image_bin

    monkeypatch.setenv("MODELFLEET_CACHE", str(tmp_path))  # no vLLM environment there
    bin_dir, why = image_bin("vllm/vllm-openai:v0.32.0")
    assert bin_dir is None and "make vllm" in why
    bin_dir, why = image_bin("nginx:1.27")
    assert bin_dir is None and "not built from this project" in why
    assert image_bin("modelfleet/worker:dev")[0] is not None


def test_endpoints_skip_unready_and_other_ports() -> None:
    slices = [{"metadata": {"namespace": "ns", "labels": {"kubernetes.io/service-name": "s"}},
               "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}],
               "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": True}},
                             {"addresses": ["10.244.1.3"], "conditions": {"ready": False}},
                             {"addresses": ["10.244.1.4"], "conditions": {}}]}]
    assert endpoints.ready(slices, "ns", "s", "http") == [("10.244.1.2", 8080), ("10.244.1.4", 8080)]
    assert endpoints.ready(slices, "other", "s", "http") == []


def test_nginx_config_streams_and_routes_prefixes(tmp_path: Path) -> None:
    routes = [nginxconf.Route("a.test", "/api", "Prefix", "ns_s_80", ("10.244.1.2:8080",)),
              nginxconf.Route("", "/", "Prefix", "ns_t_80", ()),
              nginxconf.Route("", "/bad;path", "Prefix", "ns_u_80", ("10.244.1.9:1",))]
    conf = nginxconf.render(routes, 8480, tmp_path, tmp_path, as_root=False)
    assert "proxy_buffering off;" in conf and "listen 127.0.0.1:8480 default_server;" in conf
    assert "location = /api { proxy_pass http://ns_s_80; }" in conf
    assert "location /api/ { proxy_pass http://ns_s_80; }" in conf
    assert "location / { return 503; }" in conf  # no ready endpoints
    assert "bad;path" not in conf


def test_ingress_rules_resolve_service_ports_by_name_and_number() -> None:
    svc = {"metadata": {"namespace": "ns", "name": "s"}, "spec": {"ports": [{"name": "web", "port": 80}]}}
    slices = [{"metadata": {"namespace": "ns", "labels": {"kubernetes.io/service-name": "s"}},
               "ports": [{"name": "web", "port": 8080}], "endpoints": [{"addresses": ["10.244.1.2"]}]}]
    ing = {"metadata": {"namespace": "ns", "name": "i"}, "spec": {"rules": [{"http": {"paths": [
        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "s", "port": {"name": "web"}}}}]}}]}}
    [route] = ingress.routes([ing], [svc], slices)
    assert route.backends == ("10.244.1.2:8080",) and route.host == ""


def test_node_cidrs_stay_inside_the_pod_network() -> None:
    net = Network()
    assert str(net.gateway) == "10.244.0.1"
    assert str(net.node_cidr(0)) == "10.244.1.0/24" and net.node_cidr(1).subnet_of(net.cidr)


def test_service_links_follow_the_kubelet_naming() -> None:
    svc = {"metadata": {"namespace": "ns", "name": "tiny-chat"},
           "spec": {"clusterIP": "10.96.0.9", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
    headless = {"metadata": {"namespace": "ns", "name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}
    out = env.service_links([svc, headless], "ns")
    assert out["TINY_CHAT_SERVICE_HOST"] == "10.96.0.9" and out["TINY_CHAT_SERVICE_PORT"] == "80"
    assert out["TINY_CHAT_SERVICE_PORT_HTTP"] == "80" and out["TINY_CHAT_PORT"] == "tcp://10.96.0.9:80"
    assert out["TINY_CHAT_PORT_80_TCP_ADDR"] == "10.96.0.9"
    assert not any(k.startswith("H_") for k in out)
    assert env.service_links([svc], "other") == {}


def test_fallback_to_logs_message_is_the_last_runs_tail(tmp_path: Path) -> None:
    log = b"==== t start #1: a\nold failure\n==== t start #2: a\nloading\nerror: no such dir /m\n"
    assert message_from_log(log) == "loading\nerror: no such dir /m"
    assert message_from_log(b"==== t start #1: a\n") is None
    assert message_from_log(b"x\n" * 100 + b"last\n", max_lines=2) == "x\nlast"
    assert message_from_log(b"abcdef\n", max_bytes=3) == "def"

    spec = {"name": "c", "image": "modelfleet/x", "terminationMessagePolicy": "FallbackToLogsOnError"}
    c = Container(spec)
    c.log_file = tmp_path / "c.log"
    c.log_file.write_bytes(log)
    assert c._message(1) == "loading\nerror: no such dir /m"
    assert c._message(0) is None  # only on error
    assert Container({"name": "c", "image": "x"})._message(1) is None  # policy File: no fallback
    c.started_at = "a"
    assert status.container_status(c, "u")["lastState"]["terminated"] is None
    c.last = Terminated(1, "Error", "a", "b", message=c._message(1))
    assert status.container_status(c, "u")["lastState"]["terminated"]["message"].endswith("/m")


def test_a_config_file_is_written_only_when_its_content_changes(tmp_path: Path) -> None:
    """kube-proxy exits on any write to its config file, even of the same bytes."""
    from localkube.files import write_if_changed

    path = tmp_path / "sub" / "kube-proxy.yaml"
    assert write_if_changed(path, "a: 1\n", 0o600) is True
    assert path.read_text() == "a: 1\n" and path.stat().st_mode & 0o777 == 0o600
    os.utime(path, ns=(0, 0))
    assert write_if_changed(path, "a: 1\n", 0o600) is False
    assert path.stat().st_mtime_ns == 0  # not opened for writing at all
    assert write_if_changed(path, "a: 2\n") is True and path.read_text() == "a: 2\n"


def _real_node_settings(tmp_path: Path) -> Settings:
    """A real node's settings with the certificates its component builders read (fakes, but a
    CA bundle the API server's health check can load)."""
    import certifi

    s = Settings(state=tmp_path, node_kind="kubelet")
    s.pki.mkdir(parents=True)
    shutil.copy(certifi.where(), s.pki / "ca.crt")
    for stem in ("kube-proxy", "kubelet-client"):
        (s.pki / f"{stem}.crt").write_text("cert")
        (s.pki / f"{stem}.key").write_text("key")
    return s


def test_restarting_the_api_server_leaves_kube_proxy_and_its_config_alone(tmp_path: Path, monkeypatch) -> None:
    s = _real_node_settings(tmp_path)
    cluster._builders(s)["kube-proxy"]()  # as `up` wrote it
    config = s.state / "kube-proxy.yaml"
    os.utime(config, ns=(0, 0))
    restarted: list[str] = []
    monkeypatch.setattr(cluster, "healthy", lambda _s: True)
    monkeypatch.setattr(cluster, "_wait", lambda *a, **k: None)
    monkeypatch.setattr(cluster.procs, "stop", lambda run, name, grace: restarted.append(f"stop {name}"))
    monkeypatch.setattr(cluster.procs, "start", lambda run, logs, name, argv, env: restarted.append(f"start {name}"))
    cluster.restart(s, "kube-apiserver")
    assert restarted == ["stop kube-apiserver", "start kube-apiserver"]
    assert config.stat().st_mtime_ns == 0
    cluster._builders(s)["kube-proxy"]()  # restarting kube-proxy itself: same settings, same file
    assert config.stat().st_mtime_ns == 0


def test_every_component_has_a_builder_in_start_order(tmp_path: Path) -> None:
    for kind in ("agent", "kubelet"):
        s = Settings(state=tmp_path, node_kind=kind)
        assert tuple(cluster._builders(s)) == cluster.order(s)


def test_sourcing_the_env_file_alone_points_at_the_cluster_it_describes(tmp_path: Path, monkeypatch) -> None:
    s = Settings(state=tmp_path / ".cluster-node", node_kind="kubelet")
    started_with = {"MODELFLEET_CLUSTER_NODE_KIND": "kubelet", "MODELFLEET_CLUSTER_APISERVER_PORT": "16443",
                    "MODELFLEET_CLUSTER_NODE_LABELS": "a=b c", "HOME": "/elsewhere"}
    (tmp_path / "env").write_text(cluster.env_text(s, started_with))
    env = read_env(tmp_path / "env")
    assert env["MODELFLEET_CLUSTER_DIR"] == str(s.state.resolve())
    assert env["MODELFLEET_CLUSTER_NODE_LABELS"] == "a=b c" and env["HOME"] != "/elsewhere"
    assert env["KUBECONFIG"] == str(s.kubeconfig) and env["CONTAINERD_NAMESPACE"] == "k8s.io"
    for key in ("MODELFLEET_CLUSTER_DIR", "MODELFLEET_CLUSTER_NODE_KIND", "MODELFLEET_CLUSTER_APISERVER_PORT"):
        monkeypatch.setenv(key, env[key])
    again = Settings()
    assert (again.state, again.node_kind, again.ports.apiserver) == (s.state.resolve(), "kubelet", 16443)
    agent = cluster.env_text(Settings(state=tmp_path / ".cluster", node_kind="agent"), {})
    assert f"export MODELFLEET_CLUSTER_DIR={tmp_path / '.cluster'}\n" in agent and "CONTAINERD" not in agent
