"""The user's path on the local cluster (issue 8): `helm install` the chart, create an API-key
Secret, `kubectl apply` the example ModelDeployments, and call them with the `openai` SDK
through the Ingress; then `helm upgrade` and `helm uninstall`, which leaves only the CRD.

The operator and gateway run as pods of the chart: on the agent's node images named
modelfleet/... run the project's Python; on the real node (`make test-node`) they are the images
`make images` built, loaded into containerd by `localkube load-images`, run with the chart's
securityContext, probes and volumes by a real kubelet. The models reach the workers as the
chart offers for file:// sources (`operator.hostPathModels`: a read-only hostPath each), which
works on both. The release watches only its own namespace, so operators that other tests run
on the same cluster never see these ModelDeployments, nor this operator theirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml
from localkube.testing import LocalCluster

from modelfleet.demo import ensure_demo_model, minilm_path
from modelfleet.devcluster import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent))  # operator_harness, beside this file
from operator_harness import readable_copies  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelfleet"
EXAMPLES = REPO / "examples" / "kubernetes"
RELEASE = "mf"
CHAT, EMBED = "tiny-chat", "all-MiniLM-L6-v2"
KEY = f"sk-e2e-{uuid.uuid4().hex}"
CHAT_ONLY_KEY = f"sk-chat-only-{uuid.uuid4().hex}"
READY_TIMEOUT = 300
# Each model's CPU request: the real node has the machine's 2 CPUs, which the examples' 1 CPU
# each, the chart's pods and CoreDNS would overcommit (the agent's node counts 8).
MODEL_CPU = "500m"


def gateway_kubernetes_mode_missing() -> str | None:
    """The reason to skip if this checkout's gateway has no Kubernetes discovery yet."""
    proc = subprocess.run([sys.executable, "-m", "modelfleet", "gateway", "--discovery", "kubernetes",
                           "--port", "1"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": "/nonexistent"})
    if "not implemented" in proc.stderr:
        return "`modelfleet gateway --discovery kubernetes` is not implemented in this checkout"
    return None


@dataclass
class Release:
    cluster: LocalCluster
    namespace: str
    host: str

    def helm(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["helm", *args, "-n", self.namespace], capture_output=True, text=True,
                              env=self.cluster.env, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}\n{self.describe()}")
        return proc

    def kubectl(self, *args: str, check: bool = True) -> str:
        return self.cluster.kubectl(*args, "-n", self.namespace, check=check).stdout

    def client(self, key: str = KEY) -> openai.OpenAI:
        # The release's Ingress matches its own host, so parallel tests cannot take its requests.
        return openai.OpenAI(base_url=f"{self.cluster.ingress_url}/v1", api_key=key, max_retries=0,
                             timeout=60, default_headers={"Host": self.host})

    def describe(self) -> str:
        out = [self.kubectl("get", "md,deploy,pods,svc,ingress,endpointslices", "-o", "wide", check=False)]
        for pod in json.loads(self.kubectl("get", "pods", "-o", "json", check=False) or '{"items": []}')["items"]:
            name = pod["metadata"]["name"]
            logs = self.kubectl("logs", name, "--tail", "25", check=False)
            out.append(f"--- {name}\n{logs}")
        return "\n".join(out)


def example(name: str, source: Path) -> dict:
    """An example ModelDeployment with its file:// source pointed at this machine's model."""
    md = yaml.safe_load((EXAMPLES / name).read_text())
    md["spec"]["model"]["source"] = f"file://{source}"
    md["spec"]["resources"]["cpu"] = MODEL_CPU
    return md


@pytest.fixture(scope="module")
def models() -> Iterator[dict[str, Path]]:
    """Both models where the worker's user (uid 65532 on the real node) can read them."""
    with readable_copies({"tiny-chat": ensure_demo_model(), "minilm": minilm_path()}) as copies:
        yield copies


def api_key_secret(name: str, key: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name,
                                                               "labels": {"modelfleet.dev/api-key": "true"}},
            "stringData": {"key": key}}


@pytest.fixture(scope="module")
def release(cluster: LocalCluster) -> Iterator[Release]:
    reason = gateway_kubernetes_mode_missing()
    if reason:
        pytest.skip(reason)
    namespace = f"mf-e2e-chart-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    wait_for(lambda: cluster.get("serviceaccount", "default", namespace), 30, what="default ServiceAccount")
    rel = Release(cluster, namespace, host=f"{namespace}.modelfleet.test")
    try:
        yield rel
    finally:
        # ModelDeployments carry kopf's finalizer: drop it in case the operator is gone, so the
        # namespace can go.
        for md in json.loads(rel.kubectl("get", "md", "-o", "json", check=False) or '{"items": []}')["items"]:
            rel.kubectl("patch", "md", md["metadata"]["name"], "--type", "merge",
                        "-p", '{"metadata": {"finalizers": null}}', check=False)
        subprocess.run(["helm", "uninstall", RELEASE, "-n", namespace], capture_output=True, env=cluster.env,
                       timeout=120)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def ready(rel: Release, name: str) -> dict | None:
    md = rel.cluster.get("md", name, rel.namespace)
    return md if md and (md.get("status") or {}).get("phase") == "Ready" else None


def test_install(release: Release) -> None:
    ns = release.namespace
    release.helm("install", RELEASE, str(CHART), "--wait", "--timeout", "300s",
                 "--set-json", f'operator.watchNamespaces=["{ns}"]',
                 "--set", "operator.hostPathModels=true",
                 "--set", "ingress.enabled=true", "--set", "ingress.className=nginx",
                 "--set", f"ingress.host={release.host}",
                 "--set-json", f'apiKeys.keys=[{{"name": "chat-only", "key": "{CHAT_ONLY_KEY}", "models": ["{CHAT}"]}}]')
    gateway = release.cluster.get("deployment", f"{RELEASE}-modelfleet-gateway", ns)
    assert gateway["status"]["readyReplicas"] == 2
    assert release.cluster.get("deployment", f"{RELEASE}-modelfleet-operator", ns)["status"]["readyReplicas"] == 1


def test_models_become_ready(release: Release, models: dict[str, Path]) -> None:
    release.cluster.apply(api_key_secret("e2e-key", KEY), namespace=release.namespace)
    release.cluster.apply(example("tiny-chat.yaml", models["tiny-chat"]), example("minilm.yaml", models["minilm"]),
                          namespace=release.namespace)
    for name in ("tiny-chat", "minilm"):
        try:
            wait_for(lambda n=name: ready(release, n), READY_TIMEOUT, interval=2, what=f"ModelDeployment {name} Ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{release.describe()}") from None
    table = release.kubectl("get", "md")
    print(f"\n$ kubectl get md\n{table}")
    assert "Ready" in table
    # Its RBAC is enough: kopf logs every 403 it retries (start-up included).
    log = release.kubectl("logs", f"deploy/{RELEASE}-modelfleet-operator")
    assert "Forbidden" not in log, log[-3000:]


def test_openai_sdk_through_the_ingress(release: Release) -> None:
    client = release.client()
    # The gateway follows EndpointSlices: wait until it routes both models.
    wait_for(lambda: {m.id for m in client.models.list().data} >= {CHAT, EMBED}, 60, what="both models listed")

    def chat_works() -> bool:
        try:
            return bool(client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4).choices)
        except openai.APIStatusError:
            return False

    wait_for(chat_works, 60, what="first chat completion")
    r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens > 0

    stream = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=8, stream=True)
    chunks = list(stream)
    assert len(chunks) >= 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)

    c = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=6)
    assert c.choices[0].text and c.usage.completion_tokens > 0

    e = client.embeddings.create(model=EMBED, input=["a sentence", "another sentence"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 384


def test_keys(release: Release) -> None:
    with pytest.raises(openai.AuthenticationError):
        release.client("sk-wrong").models.list()
    limited = release.client(CHAT_ONLY_KEY)
    assert {m.id for m in limited.models.list().data} == {CHAT}
    assert limited.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=2).choices
    with pytest.raises(openai.PermissionDeniedError):
        limited.embeddings.create(model=EMBED, input=["not for this key"])


def test_upgrade_changes_a_value(release: Release) -> None:
    release.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "gateway.replicas=3",
                 "--wait", "--timeout", "300s")
    dep = release.cluster.get("deployment", f"{RELEASE}-modelfleet-gateway", release.namespace)
    assert dep["spec"]["replicas"] == 3 and dep["status"]["readyReplicas"] == 3
    assert release.helm("history", RELEASE, "-o", "json").stdout.count('"revision"') == 2
    # Still serving, through the new replicas too.
    client = release.client()
    for _ in range(6):
        assert client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2).choices


CHART_KINDS = "deployments,services,serviceaccounts,roles,rolebindings,secrets,configmaps,ingresses," \
              "poddisruptionbudgets,kopfpeerings.kopf.dev"


def test_uninstall_leaves_only_the_crd(release: Release) -> None:
    # The platform team's order: remove the models while the operator runs, then the platform.
    release.kubectl("delete", "md", "--all", "--timeout", "120s")
    release.helm("uninstall", RELEASE, "--wait", "--timeout", "120s")
    selector = f"app.kubernetes.io/instance={RELEASE}"
    wait_for(lambda: not release.kubectl("get", CHART_KINDS, "-l", selector, "-o", "name").strip() or None,
                    60, what="the release's objects to go")
    # The workers' Deployments and Services go with their ModelDeployments through Kubernetes'
    # garbage collector, which works in the background (seconds on a loaded API server).
    wait_for(lambda: not release.kubectl("get", "deployments,services", "-l", "modelfleet.dev/model", "-o",
                                         "name").strip() or None, 120, what="the workers' objects to go")
    wait_for(lambda: not release.kubectl("get", "pods", "-o", "name").strip() or None, 120, what="pods to stop")
    cluster_wide = release.cluster.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name").stdout
    assert release.namespace not in cluster_wide
    release.cluster.kubectl("get", "crd", "modeldeployments.modelfleet.dev")
    # A Secret the user created stays theirs.
    assert release.cluster.get("secret", "e2e-key", release.namespace)
