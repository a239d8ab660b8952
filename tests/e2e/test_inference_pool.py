"""InferencePools on the local cluster (issue 20): the Gateway API Inference Extension's CRDs
from its Go module (tests/cluster/scripts/inference-extension-crds.sh), the operator as a process
with `--inference-pool-epp`, and real worker pods.

Shown: the API server accepts the rendered pool against the released schema (and fills in the
schema's defaults); the pool selects exactly the ModelDeployment's ready worker pods, the ones
in its Service's EndpointSlice, on the port the EndpointSlice names; a vLLM ModelDeployment
gets its own pool that selects none of the other's pods; deleting a ModelDeployment deletes
its pool. No gateway or endpoint picker runs here (neither is built for this cluster).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # operator_harness, beside this file

from operator_harness import (  # noqa: E402
    REPO,
    OperatorProcess,
    apply,
    demo_model_source,
    describe,
    get,
    items,
    kubectl,
    model_deployment,
    operator_namespace,
    ready_endpoints,
    wait_for,
)

from modelfleet import labels  # noqa: E402

pytestmark = pytest.mark.e2e

CRD_SCRIPT = REPO / "tests" / "cluster" / "scripts" / "inference-extension-crds.sh"
POOL_CRD = "inferencepools.inference.networking.k8s.io"
POOL = "inferencepools.v1.inference.networking.k8s.io"  # as kubectl names the resource
LOAD_TIMEOUT = 150  # a worker pod imports torch and loads the model
SETTLE_TIMEOUT = 45
# A worker that loads the model: its memory is a limit the real kubelet enforces, so room for torch.
LOADING = {"cpu": "100m", "memory": "2Gi"}


@dataclass
class Env:
    namespace: str
    op: OperatorProcess

    def wait(self, fn, timeout: float, what: str):
        return wait_for(fn, timeout, what, explain=self.explain)

    def explain(self) -> str:
        pools = kubectl("get", POOL, "-n", self.namespace, "-o", "yaml", check=False)
        return f"$ kubectl get inferencepools -o yaml\n{pools.stdout[-3000:]}{pools.stderr}\n\n" + describe(
            self.namespace, self.op)

    def pool(self, name: str) -> dict | None:
        return get(POOL, name, self.namespace)


def install_inference_extension_crds() -> None:
    """Fetch (cached) and apply the released CRDs; never deleted: the cluster is shared."""
    proc = subprocess.run(["bash", str(CRD_SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{CRD_SCRIPT.name} failed: {proc.stderr.strip()[-2000:]}"
    crds = proc.stdout.strip().splitlines()[-1]
    kubectl("apply", "--server-side", "--field-manager", "e2e", "-f", crds)
    kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{POOL_CRD}")


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[Env]:  # noqa: ARG001 - cluster sets KUBECONFIG
    install_inference_extension_crds()
    with demo_model_source() as source, \
            operator_namespace(tmp_path_factory.mktemp("operator"), "--inference-pool-epp", "{name}-epp:9002") as (ns, op):
        apply(
            model_deployment("chat", source, replicas=1, resources=LOADING),
            # vLLM's engine; more GPUs than any node has, so its pod stays Pending (never runs vLLM).
            model_deployment("big", source, replicas=1, resources={"gpu": 64, "cpu": "100m"},
                             engine={"kind": "vllm"}),
            namespace=ns,
        )
        yield Env(ns, op)


def selected_pods(pool: dict, namespace: str) -> list[dict]:
    match = pool["spec"]["selector"]["matchLabels"]
    return items("pods", namespace, labels.selector_string(match))


def is_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in (pod.get("status") or {}).get("conditions", []))


def test_pool_is_accepted_with_the_schema_defaults(env: Env) -> None:
    pool = env.wait(lambda: env.pool("chat"), SETTLE_TIMEOUT, "the InferencePool chat")
    spec = pool["spec"]
    assert spec["endpointPickerRef"]["name"] == "chat-epp"
    assert spec["endpointPickerRef"]["port"] == {"number": 9002}
    # Defaults the released CRD's schema fills in: the API server validated it against that schema.
    assert spec["appProtocol"] == "http"
    assert spec["endpointPickerRef"]["failureMode"] == "FailClose"
    owners = pool["metadata"]["ownerReferences"]
    md = get("md", "chat", env.namespace)
    assert [(o["kind"], o["uid"], o["controller"]) for o in owners] == [("ModelDeployment", md["metadata"]["uid"], True)]
    # A pool the schema refuses is refused (the check above is not a schema that takes anything).
    bad = {**pool, "metadata": {"name": "bad"}, "spec": {**spec, "targetPorts": []}}
    proc = kubectl("apply", "--dry-run=server", "-n", env.namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0 and "targetPorts" in proc.stderr, proc.stderr


def test_pool_selects_exactly_the_ready_workers_of_its_model(env: Env) -> None:
    endpoints = env.wait(lambda: ready_endpoints(env.namespace, "chat"), LOAD_TIMEOUT,
                         "a ready endpoint in chat's EndpointSlice")
    pool = env.pool("chat")
    ready = sorted(p["status"]["podIP"] for p in selected_pods(pool, env.namespace) if is_ready(p))
    assert ready == endpoints
    assert all(p["metadata"]["labels"][labels.MODEL] == "chat" for p in selected_pods(pool, env.namespace))
    (slice_,) = items("endpointslices", env.namespace, "kubernetes.io/service-name=chat")
    assert [p["port"] for p in slice_["ports"]] == [t["number"] for t in pool["spec"]["targetPorts"]]


def test_vllm_model_gets_its_own_pool(env: Env) -> None:
    pool = env.wait(lambda: env.pool("big"), SETTLE_TIMEOUT, "the InferencePool big (engine vllm)")
    assert pool["spec"]["endpointPickerRef"]["name"] == "big-epp"
    deployment = get("deploy", "big", env.namespace)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert pool["spec"]["targetPorts"] == [{"number": p["containerPort"]} for p in container["ports"]]
    pods = env.wait(lambda: selected_pods(pool, env.namespace), SETTLE_TIMEOUT, "big's (Pending) pod")
    assert {p["metadata"]["labels"][labels.MODEL] for p in pods} == {"big"}
    assert not any(is_ready(p) for p in pods)  # so the EPP sends it nothing until it serves


def test_deleting_the_model_deletes_its_pool(env: Env) -> None:
    kubectl("delete", "md", "big", "-n", env.namespace, "--wait=true", "--timeout=60s")
    env.wait(lambda: env.pool("big") is None, SETTLE_TIMEOUT, "the garbage collector to delete pool big")
    assert env.pool("chat") is not None
