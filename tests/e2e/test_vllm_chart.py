"""ModelDeployments with `engine.kind: vllm` on the local cluster, installed with the chart and
called through the Ingress with the openai SDK, as a platform team would: chat, streamed chat,
completions and (a second model) embeddings on vLLM's own server; `kubectl scale` spreads the
traffic; a pod deleted under load fails no non-streamed request; a key with a token limit is
charged exactly on a vLLM stream; and a vLLM that cannot start says why in the status.

The vLLM pods run `image.vllm`: on the agent's node the chart's default (vLLM's own image, which
the agent runs from the `make vllm` environment); on the real node (`make node-cluster-up`)
the project's vLLM CPU image, set as images/README.md tells a CPU cluster to, copied into
containerd with `make node-load-images NODE_IMAGES=vllm-cpu` and run by the kubelet as its
Dockerfile says (uid 65532). The models come in as hostPaths (`operator.hostPathModels`), from
copies uid 65532 can read, on both. vLLM starts in a minute or two here.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from localkube.testing import LocalCluster

from modelfleet.demo import VLLM_DEMO_SPEC, ensure_demo_model, minilm_path
from modelfleet.devcluster import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent))  # operator_harness, beside this file
from operator_harness import readable_copies, vllm_engine, vllm_image, vllm_resources  # noqa: E402

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelfleet"
RELEASE = "mfv"
CHAT, EMBED = "vllm-chat", "vllm-embed"
KEY = f"sk-vllm-{uuid.uuid4().hex}"
METERED = f"sk-metered-{uuid.uuid4().hex}"
TPM = 1_000_000
READY_TIMEOUT = 900


def vllm_md(name: str, source: str, served: str, resources: dict, max_model_len: int = 1024,
            spec: dict | None = None, **model) -> dict:
    return {
        "apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
        "spec": {**(spec or {}), "model": {"source": source, "servedName": served, **model}, "replicas": 1,
                 "resources": resources,
                 # the image comes from the chart's image.vllm (vllm_image_args)
                 "engine": vllm_engine(max_model_len, max_num_seqs=16)},
    }


class Release:
    def __init__(self, cluster: LocalCluster, namespace: str, models: dict[str, Path], image: str | None) -> None:
        self.cluster, self.namespace, self.models = cluster, namespace, models
        self.host = f"{namespace}.modelfleet.test"
        self.image = image or "vllm/vllm-openai:"  # what the pods run (a prefix)
        self.resources = vllm_resources(image)

    def kubectl(self, *args: str, check: bool = True) -> str:
        return self.cluster.kubectl(*args, "-n", self.namespace, check=check).stdout

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.cluster.ingress_url}/v1", api_key=key, max_retries=0, timeout=120,
                             default_headers={"Host": self.host})

    def md(self, name: str) -> dict:
        """The object, or {} while it cannot be read (a slow API server is not an answer)."""
        import subprocess

        try:
            return self.cluster.get("md", name, self.namespace) or {}
        except subprocess.TimeoutExpired:
            return {}

    def describe(self) -> str:
        out = [self.kubectl("get", "md,deploy,pods,endpointslices", "-o", "wide", check=False)]
        for pod in json.loads(self.kubectl("get", "pods", "-o", "json", check=False) or '{"items": []}')["items"]:
            out.append(f"--- {pod['metadata']['name']}\n{self.kubectl('logs', pod['metadata']['name'], '--tail', '15', check=False)}")
        return "\n".join(out)

    def wait_ready(self, name: str, replicas: int = 1) -> None:
        def ready() -> bool:
            status = self.md(name).get("status") or {}
            return status.get("phase") == "Ready" and status.get("readyReplicas") == replicas
        try:
            wait_for(ready, READY_TIMEOUT, interval=3, what=f"{name} Ready with {replicas} replicas")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None


def vllm_image_args(image: str | None) -> list[str]:
    """The chart's values for this node's vLLM: none on the agent (its default image runs from
    `make vllm`); on the real node the project's image (operator_harness.vllm_image)."""
    if image is None:
        return []
    repository, tag = image.rsplit(":", 1)
    return ["--set", f"image.vllm.repository={repository}", "--set", f"image.vllm.tag={tag}"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """The models where vLLM's user (uid 65532 on the real node) can read them, and a folder with
    no model in it (operator_harness.readable_copies says why copies)."""
    empty = tmp_path_factory.mktemp("not-a-model")
    (empty / "README.md").write_text("no weights here\n")
    with readable_copies({"chat": ensure_demo_model(VLLM_DEMO_SPEC), "embed": minilm_path(), "empty": empty}) as copies:
        yield copies


@pytest.fixture(scope="module")
def release(cluster: LocalCluster, models: dict[str, Path]) -> Iterator[Release]:
    import subprocess

    image = vllm_image()
    image_args = vllm_image_args(image)
    namespace = f"mf-e2e-vllm-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    wait_for(lambda: cluster.get("serviceaccount", "default", namespace), 30, what="default ServiceAccount")
    rel = Release(cluster, namespace, models, image)
    keys = [{"name": "team", "key": KEY}, {"name": "metered", "key": METERED, "tpm": TPM}]
    proc = subprocess.run(
        ["helm", "install", RELEASE, str(CHART), "-n", namespace, "--wait", "--timeout", "300s", *image_args,
         "--set-json", f'operator.watchNamespaces=["{namespace}"]', "--set", "gateway.replicas=1",
         "--set", "operator.hostPathModels=true",
         "--set", "ingress.enabled=true", "--set", "ingress.className=nginx", "--set", f"ingress.host={rel.host}",
         "--set-json", f"apiKeys.keys={json.dumps(keys)}"],
        capture_output=True, text=True, env=cluster.env, timeout=400)
    assert proc.returncode == 0, proc.stderr
    try:
        yield rel
    finally:
        rel.kubectl("delete", "md", "--all", "--wait=false", check=False)
        subprocess.run(["helm", "uninstall", RELEASE, "-n", namespace], capture_output=True, env=cluster.env,
                       timeout=120)
        # kopf's finalizers, in case the operator went before it removed them, so the namespace can go.
        for md in json.loads(rel.kubectl("get", "md", "-o", "json", check=False) or '{"items": []}')["items"]:
            rel.kubectl("patch", "md", md["metadata"]["name"], "--type", "merge",
                        "-p", '{"metadata": {"finalizers": null}}', check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_vllm_model_deployments_become_ready(release: Release) -> None:
    release.cluster.apply(vllm_md(CHAT, f"file://{release.models['chat']}", CHAT, resources=release.resources),
                          vllm_md(EMBED, f"file://{release.models['embed']}", EMBED, max_model_len=256,
                                  resources=release.resources, task="embed"),
                          namespace=release.namespace)
    for name in (CHAT, EMBED):
        release.wait_ready(name)
    pod = json.loads(release.kubectl("get", "pods", "-l", f"modelfleet.dev/model={CHAT}", "-o", "json"))["items"][0]
    container = pod["spec"]["containers"][0]
    assert container["image"].startswith(release.image) and "vllm.entrypoints.openai.api_server" in container["command"]


def test_the_openai_sdk_through_the_ingress(release: Release) -> None:
    client = release.client()
    wait_for(lambda: {m.id for m in client.models.list().data} >= {CHAT, EMBED}, 60, what="both models listed")
    r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    c = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=6)
    assert c.usage.completion_tokens > 0
    e = client.embeddings.create(model=EMBED, input=["a sentence", "another sentence"])
    assert [len(d.embedding) for d in e.data] == [384, 384]


def tokens_charged(release: Release, key_name: str) -> float:
    """The gateway's own count of a key's tokens, read from its pod (one gateway replica)."""
    import httpx

    pods = json.loads(release.kubectl("get", "pods", "-l", "app.kubernetes.io/component=gateway", "-o", "json"))
    ip = next(p["status"]["podIP"] for p in pods["items"] if p["status"].get("podIP"))
    port = pods["items"][0]["spec"]["containers"][0]["ports"][0]["containerPort"]
    for line in httpx.get(f"http://{ip}:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith("modelfleet_gateway_tokens_total{") and f'key="{key_name}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_token_limited_key_is_charged_exactly_on_a_vllm_stream(release: Release) -> None:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "count"}], "max_tokens": 5,
            "extra_body": {"ignore_eos": True}}
    prompt_tokens = release.client().chat.completions.create(**body).usage.prompt_tokens
    before = tokens_charged(release, "metered")
    chunks = list(release.client(METERED).chat.completions.create(**body, stream=True))
    assert all(c.choices for c in chunks) and all(getattr(c, "usage", None) is None for c in chunks)
    wait_for(lambda: tokens_charged(release, "metered") > before, 30, what="the stream charged")
    assert tokens_charged(release, "metered") - before == prompt_tokens + 5


def test_kubectl_scale_spreads_traffic_and_a_pod_deleted_under_load_fails_nothing(release: Release) -> None:
    release.kubectl("scale", "md", CHAT, "--replicas", "2")
    release.wait_ready(CHAT, replicas=2)
    client = release.client()
    backends: set[str] = set()
    for _ in range(16):
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        backends.add(raw.headers["x-modelfleet-backend"])
    assert len(backends) == 2

    failures: list[str] = []
    done = threading.Event()
    answered = [0]

    def load() -> None:
        while not done.is_set() and answered[0] < 400:
            try:
                client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
                answered[0] += 1
            except openai.APIError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: answered[0] >= 8, 120, what="load running")
        pods = json.loads(release.kubectl("get", "pods", "-l", f"modelfleet.dev/model={CHAT}", "-o", "json"))["items"]
        release.kubectl("delete", "pod", pods[0]["metadata"]["name"], "--wait=false")
        start = answered[0]
        wait_for(lambda: answered[0] >= start + 40, 300, what="requests answered after the deletion")
    finally:
        done.set()
        for t in threads:
            t.join(timeout=180)
    assert failures == []


def test_a_vllm_model_scaled_to_zero_holds_its_first_request_until_a_replica_starts(release: Release) -> None:
    md = vllm_md("vllm-lazy", f"file://{release.models['chat']}", "vllm-lazy", resources=release.resources,
                 spec={"autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleDownDelaySeconds": 600},
                       "routing": {"holdTimeoutSeconds": 600}})
    release.cluster.apply(md, namespace=release.namespace)
    client = release.client()
    wait_for(lambda: "vllm-lazy" in {m.id for m in client.models.list().data}, 60, what="listed at zero replicas")
    assert not (release.md("vllm-lazy").get("status") or {}).get("readyReplicas")
    slow = openai.OpenAI(base_url=client.base_url, api_key=KEY, max_retries=0, timeout=700,
                         default_headers={"Host": release.host})
    r = slow.chat.completions.create(model="vllm-lazy", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert r.choices and r.usage.completion_tokens > 0
    # The operator reports the replica in status at its next reconcile, which may come after
    # the gateway (watching the EndpointSlice) has already routed to it.
    wait_for(lambda: (release.md("vllm-lazy").get("status") or {}).get("readyReplicas") == 1, 60,
             what="status.readyReplicas 1 after the held request was served")


def test_a_vllm_that_cannot_start_says_why_in_its_status(release: Release) -> None:
    empty = release.models["empty"]
    release.cluster.apply(vllm_md("vllm-broken", f"file://{empty}", "vllm-broken", resources=release.resources),
                          namespace=release.namespace)

    def reason() -> str | None:
        for cond in (release.md("vllm-broken").get("status") or {}).get("conditions") or []:
            if cond["type"] == "Ready" and "Invalid repository ID or local directory" in cond.get("message", ""):
                return cond["message"]
        return None

    message = wait_for(reason, 600, interval=3, what="the vLLM error in status")
    assert str(empty) in message
    events = release.kubectl("get", "events", "--field-selector", "involvedObject.name=vllm-broken", "-o", "json")
    assert any("Invalid repository ID" in e.get("message", "") for e in json.loads(events)["items"])
