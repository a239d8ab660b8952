"""The gateway with Kubernetes discovery on the local cluster, with the real operator: models
appear from ModelDeployments, traffic follows the EndpointSlices as replicas come and go, key
Secrets take effect without a restart, and a scaled-to-zero model holds its first request.
Runs on both node kinds: on the real node the workers run from the worker image, the model
mounted from a hostPath (operator_harness.worker_args), four of them on two CPUs."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # operator_harness, beside this file

from operator_harness import WORKER_RESOURCES, GatewayProcess, demo_model_source, operator_namespace  # noqa: E402

from modelfleet.devcluster import wait_for  # noqa: E402

pytestmark = pytest.mark.e2e
# Four workers at once (three replicas and `sleepy`): small requests so that they fit the real
# node's two CPUs beside CoreDNS; memory is a limit there, so room for torch.
class Stack:
    """The gateway as a host process beside the module's operator, both watching one namespace."""

    def __init__(self, cluster, namespace: str, logs: Path, source: str | None = None) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.source = source
        self.gateway = GatewayProcess(namespace, logs / "gateway.log", "--key-namespace", namespace).start()
        self.url = self.gateway.url

    def md(self, name: str, served: str, **spec) -> dict:
        """A ModelDeployment of the module's model copy, served as `served`."""
        return {
            "apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
            "spec": {"model": {"source": self.source, "servedName": served},
                     "resources": WORKER_RESOURCES, **spec},
        }

    def backends(self, model: str) -> int:
        text = httpx.get(self.url + "/metrics").text
        return sum(1 for line in text.splitlines()
                   if line.startswith("modelfleet_gateway_backend_available{") and f'model="{model}"' in line
                   and line.endswith(" 1.0"))

    def chat(self, model: str, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", headers=headers or {}, timeout=timeout,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})

    def stop(self) -> None:
        self.gateway.stop()


@contextmanager
def running_stack(cluster, logs: Path, source: str | None = None, name: str = "") -> Iterator[Stack]:
    """The module's namespace and operator (operator_harness.operator_namespace) and the gateway."""
    with operator_namespace(logs, name=name) as (namespace, _op):
        s = Stack(cluster, namespace, logs, source)
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory) -> Iterator[Stack]:
    with demo_model_source() as source, running_stack(cluster, tmp_path_factory.mktemp("gw-e2e"), source, "gw-") as s:
        yield s


def test_a_model_appears_serves_and_spreads_over_replicas(stack):
    stack.cluster.apply(stack.md("chat", "tiny-chat-e2e", replicas=1), namespace=stack.namespace)
    wait_for(lambda: any(m["id"] == "tiny-chat-e2e" for m in httpx.get(stack.url + "/v1/models").json()["data"]),
             30, what="model listed")
    wait_for(lambda: stack.backends("tiny-chat-e2e") == 1, 180, what="one ready replica")
    assert stack.chat("tiny-chat-e2e").status_code == 200
    stack.cluster.kubectl("scale", "-n", stack.namespace, "md/chat", "--replicas", "3")
    wait_for(lambda: stack.backends("tiny-chat-e2e") == 3, 240, what="three ready replicas")
    seen = set()
    lock = threading.Lock()

    def call() -> None:
        r = stack.chat("tiny-chat-e2e")
        with lock:
            seen.add((r.status_code, r.headers.get("x-modelfleet-backend")))

    threads = [threading.Thread(target=call) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {code for code, _ in seen} == {200}
    assert len({backend for _, backend in seen}) >= 2


def test_prefix_affinity_keeps_a_conversation_on_one_replica(stack):
    wait_for(lambda: stack.backends("tiny-chat-e2e") == 3, 240, what="three ready replicas")
    stack.cluster.kubectl("patch", "md", "chat", "-n", stack.namespace, "--type", "merge",
                          "-p", '{"spec": {"routing": {"strategy": "prefix-affinity"}}}')

    def backend(conversation: str) -> str:
        r = httpx.post(stack.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-chat-e2e", "max_tokens": 2,
            "messages": [{"role": "system", "content": f"Conversation {conversation}."},
                         {"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        return r.headers["x-modelfleet-backend"], r.headers["x-modelfleet-route"]

    wait_for(lambda: backend("probe")[1].startswith("prefix-affinity"), 60, what="routing strategy picked up")
    assert len({backend("alpha")[0] for _ in range(8)}) == 1
    assert len({backend(str(i))[0] for i in range(24)}) >= 2
    stack.cluster.kubectl("patch", "md", "chat", "-n", stack.namespace, "--type", "merge",
                          "-p", '{"spec": {"routing": {"strategy": "least-load"}}}')


@contextmanager
def chat_load(stack, clients: int) -> Iterator[list[int]]:
    """Chat requests from `clients` threads, one after another, while the block runs: the
    statuses they got."""
    codes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            codes.append(stack.chat("tiny-chat-e2e").status_code)

    workers = [threading.Thread(target=load) for _ in range(clients)]
    for t in workers:
        t.start()
    try:
        yield codes
    finally:
        stop.set()
        for t in workers:
            t.join()


def test_deleting_a_pod_under_load_fails_no_request(stack):
    wait_for(lambda: stack.backends("tiny-chat-e2e") == 3, 240, what="three ready replicas")
    with chat_load(stack, clients=4) as codes:
        wait_for(lambda: len(codes) >= 4, 60, what="requests flowing")
        name = stack.cluster.list("pods", stack.namespace, "modelfleet.dev/model=chat")[0]["metadata"]["name"]
        stack.cluster.kubectl("delete", "pod", "-n", stack.namespace, name, "--wait=false")
        wait_for(lambda: stack.cluster.get("pod", name, stack.namespace) is None, 120, what=f"pod {name} gone")
        served = len(codes)
        wait_for(lambda: len(codes) >= served + 8, 60, what="requests served once the pod is gone")
    assert len(codes) > 10
    assert set(codes) == {200}, codes


def test_scale_from_zero_holds_the_first_request(stack):
    md = stack.md("sleepy", "sleepy-e2e", autoscaling={"minReplicas": 0, "maxReplicas": 1,
                                                       "scaleDownDelaySeconds": 600},
                  routing={"holdTimeoutSeconds": 240})
    stack.cluster.apply(md, namespace=stack.namespace)
    wait_for(lambda: any(m["id"] == "sleepy-e2e" for m in httpx.get(stack.url + "/v1/models").json()["data"]),
             30, what="scaled-to-zero model listed")
    assert stack.backends("sleepy-e2e") == 0
    started = time.monotonic()
    r = stack.chat("sleepy-e2e", timeout=300)
    assert r.status_code == 200, r.text
    assert time.monotonic() - started > 1.0  # it really waited for a replica to start
    annotations = stack.cluster.get("md", "sleepy", stack.namespace)["metadata"]["annotations"]
    assert "modelfleet.dev/demand" in annotations
    held = [line for line in httpx.get(stack.url + "/metrics").text.splitlines()
            if line.startswith('modelfleet_gateway_queue_wait_seconds_sum{model="sleepy-e2e"}')]
    assert held and float(held[0].rsplit(" ", 1)[1]) > 1.0, held  # the hold shows as queue wait


def test_an_api_server_restart_drops_no_traffic_and_watches_recover(stack):
    """The gateway routes from what it has seen while the API server is away, and afterwards
    its watches and the operator's pick up changes again (issue 5: survive API server
    restarts without dropping traffic)."""
    wait_for(lambda: stack.backends("tiny-chat-e2e") == 3, 240, what="three ready replicas")
    with chat_load(stack, clients=2) as codes:
        stack.cluster.restart("kube-apiserver")
        served = len(codes)
        wait_for(lambda: len(codes) >= served + 6, 60, what="requests served after the restart")
    assert len(codes) > 5 and set(codes) == {200}, codes
    stack.cluster.kubectl("scale", "-n", stack.namespace, "md/chat", "--replicas", "2")
    wait_for(lambda: stack.backends("tiny-chat-e2e") == 2, 120, what="the scale-down seen through new watches")
    assert stack.chat("tiny-chat-e2e").status_code == 200


def test_key_secrets_take_effect_without_restart(stack):
    def secret(name: str, key: str) -> dict:
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name,
                                                                   "labels": {"modelfleet.dev/api-key": "true"}},
                "stringData": {"key": key, "models": "tiny-chat-e2e", "rpm": "1000"}}

    ns = stack.namespace
    stack.cluster.apply(secret("team-a", "sk-team-a-0123456789"), secret("team-b", "sk-team-b-0123456789"),
                        namespace=ns)
    a = {"authorization": "Bearer sk-team-a-0123456789"}
    b = {"authorization": "Bearer sk-team-b-0123456789"}
    created = time.monotonic()
    wait_for(lambda: stack.chat("tiny-chat-e2e").status_code == 401, 10, what="gateway closed by the first key")
    wait_for(lambda: stack.chat("tiny-chat-e2e", a).status_code == 200, 10, what="team-a key accepted")
    assert time.monotonic() - created < 5.0 + 4.0  # within 5 s, plus the request itself on a loaded machine
    r = stack.chat("tiny-chat-e2e", a)
    assert r.headers["x-ratelimit-limit-requests"] == "1000"
    assert stack.chat("sleepy-e2e", a).status_code == 403
    stack.cluster.kubectl("delete", "secret", "-n", ns, "team-a")
    wait_for(lambda: stack.chat("tiny-chat-e2e", a).status_code == 401, 10, what="team-a key refused")
    assert stack.chat("tiny-chat-e2e", b).status_code == 200
    stack.cluster.kubectl("delete", "secret", "-n", ns, "team-b")
