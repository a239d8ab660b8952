"""The operator end to end on the local cluster (issue 6): the CRD from crds/, the operator as a
process, real worker pods loading the tiny chat model. On the agent's node the workers are the
project's Python; on the real node (`make test-node`) they run from the worker image `make
images` built, as uid 65532, the model mounted read-only from a hostPath (worker_args()).

One namespace and one operator (watching only that namespace) per module; the tests run in
file order and some build on the previous one (the `chat` ModelDeployment goes Ready, scales,
rolls, is deleted). ModelDeployments that only need time (Unschedulable, the missing model,
scale-to-zero) are applied at the start so they settle while the others run. On a timeout,
the failure message carries `kubectl describe md`, the events and the operator log's tail.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # operator_harness, beside this file

from operator_harness import (  # noqa: E402
    OperatorProcess,
    apply,
    chat,
    condition,
    create_namespace,
    delete_model_deployments,
    delete_namespace,
    demo_model_source,
    describe,
    get,
    install_crds,
    items,
    kubectl,
    model_deployment,
    operator_namespace,
    ready_endpoints,
    real_node,
    wait_for,
    worker_args,
)

from modelfleet import labels  # noqa: E402

pytestmark = pytest.mark.e2e

LOAD_TIMEOUT = 150  # a worker pod imports torch and loads the model: ~25 s on a loaded 2-core box
SETTLE_TIMEOUT = 45  # what needs no model load (status, scheduling, a crash)
# A worker that loads the model: its memory is a limit the real kubelet enforces, so room for torch.
LOADING = {"cpu": "100m", "memory": "2Gi"}


@dataclass
class Env:
    namespace: str
    op: OperatorProcess
    source: str
    real_node: bool

    def explain(self) -> str:
        return describe(self.namespace, self.op)

    def wait(self, fn, timeout: float, what: str, interval: float = 0.5):
        return wait_for(fn, timeout, what, interval=interval, explain=self.explain)

    def md(self, name: str) -> dict | None:
        return get("md", name, self.namespace)


@pytest.fixture(scope="module")
def source() -> Iterator[str]:
    with demo_model_source() as out:
        yield out


@pytest.fixture(scope="module")
def env(cluster, source, tmp_path_factory) -> Iterator[Env]:  # noqa: ARG001 - cluster sets KUBECONFIG
    with operator_namespace(tmp_path_factory.mktemp("operator")) as (ns, op):
        e = Env(ns, op, source, real_node())
        apply(
            model_deployment("chat", source, replicas=1, resources=LOADING),
            # More than one GPU needs vLLM's engine; the pod never gets far enough to run it.
            model_deployment("greedy", source, replicas=1, resources={"gpu": 64, "cpu": "100m"},
                             engine={"kind": "vllm"}),
            model_deployment("missing", "file:///nonexistent/modelfleet-e2e/model", replicas=1),
            model_deployment("zero", source, resources=LOADING, autoscaling={"minReplicas": 0, "maxReplicas": 1,
                                                          "targetInflightPerReplica": 1,
                                                          "scaleDownDelaySeconds": 3},
                             routing={"holdTimeoutSeconds": 5}),
            namespace=ns,
        )
        yield e


def _phase(md: dict | None) -> str:
    return ((md or {}).get("status") or {}).get("phase", "")


def test_invalid_spec_is_rejected_naming_the_field(env: Env) -> None:
    cases = {
        "spec.autoscaling.minReplicas": {"autoscaling": {"minReplicas": 3, "maxReplicas": 1}},
        "spec.model.source": {},  # an s3:// source below
        "spec.replicas": {"replicas": -1},
    }
    for field, spec in cases.items():
        source = "s3://bucket/model" if field == "spec.model.source" else env.source
        doc = json.dumps(model_deployment("bad", source, **spec))
        proc = kubectl("apply", "-n", env.namespace, "-f", "-", input=doc, check=False)
        assert proc.returncode != 0, f"{field}: the API server accepted an invalid spec"
        assert field in proc.stderr, f"the rejection does not name {field}: {proc.stderr}"
    assert env.md("bad") is None


def test_more_gpus_than_any_node_reports_unschedulable(env: Env) -> None:
    md = env.wait(lambda: (m := env.md("greedy")) and condition(m, "Ready").get("reason") == "Unschedulable" and m,
                  SETTLE_TIMEOUT, "greedy to report Ready=False reason Unschedulable")
    ready = condition(md, "Ready")
    assert ready["status"] == "False"
    assert "nvidia.com/gpu" in ready["message"] and "64" in ready["message"], ready["message"]
    assert _phase(md) == "Pending"


def test_missing_model_directory_reports_why(env: Env) -> None:
    def failed() -> dict | None:
        md = env.md("missing")
        return md if "/nonexistent/modelfleet-e2e/model" in condition(md, "Ready").get("message", "") else None

    md = env.wait(failed, SETTLE_TIMEOUT, "the error (model directory missing) in status")
    ready = condition(md, "Ready")
    listed = kubectl("get", "md", "missing", "-n", env.namespace).stdout
    if env.real_node:
        # The model is a hostPath there: the kubelet refuses to mount a missing directory, so the
        # pod never starts and its FailedMount event is the why (the worker's own error for a
        # missing directory, on this node, is tests/cluster/test_node_operator.py's crash test).
        assert ready["status"] == "False" and ready["reason"] == "FailedMount", ready
        assert "not a directory" in ready["message"], ready["message"]
        assert _phase(md) == "Pending"
        assert "/nonexistent/modelfleet-e2e/model" in listed, f"kubectl get md does not say why: {listed}"
        return
    assert ready["status"] == "False" and ready["reason"] in ("CrashLoopBackOff", "Error"), ready
    assert "does not exist" in ready["message"], ready["message"]
    assert _phase(md) == "Failed"
    assert "does not exist" in listed, f"kubectl get md does not say why: {listed}"


def test_ready_and_answers_a_chat_completion(env: Env) -> None:
    md = env.wait(lambda: (m := env.md("chat")) and _phase(m) == "Ready" and m, LOAD_TIMEOUT, "chat to be Ready")
    assert md["status"]["readyReplicas"] == 1
    assert md["status"]["observedGeneration"] == md["metadata"]["generation"]
    addresses = env.wait(lambda: ready_endpoints(env.namespace, "chat"), SETTLE_TIMEOUT,
                         "a ready endpoint in chat's EndpointSlice")
    reply = chat(addresses[0], "chat")
    assert reply["model"] == "chat" and reply["choices"][0]["message"]["role"] == "assistant"
    owners = {r["kind"] for r in get("deploy", "chat", env.namespace)["metadata"]["ownerReferences"]}
    assert owners == {"ModelDeployment"}


def test_kubectl_scale_to_two_gives_two_ready_endpoints(env: Env) -> None:
    kubectl("scale", "md/chat", "--replicas", "2", "-n", env.namespace)
    addresses = env.wait(lambda: len(eps := ready_endpoints(env.namespace, "chat")) == 2 and eps, LOAD_TIMEOUT,
                         "two ready endpoints for chat")
    for address in addresses:
        assert chat(address, "chat")["choices"]
    md = env.wait(lambda: (m := env.md("chat")) and m["status"].get("readyReplicas") == 2 and m, SETTLE_TIMEOUT,
                  "chat status readyReplicas 2")
    assert kubectl("get", "md", "chat", "-n", env.namespace, "-o", "jsonpath={.status.replicas}").stdout == "2"
    assert md["status"]["selector"] == "modelfleet.dev/model=chat"
    assert env.wait(lambda: get("pdb", "chat", env.namespace), SETTLE_TIMEOUT, "chat's PodDisruptionBudget")


class ReadyWatch:
    """Samples readyReplicas of the Deployment (through a watch, so no change is missed) and
    of the ModelDeployment's status while a rollout runs."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name
        self.deployment: list[int] = []
        self.status: list[int] = []
        self._stop = threading.Event()
        self._proc = None
        self._threads = [threading.Thread(target=self._watch, daemon=True),
                         threading.Thread(target=self._poll, daemon=True)]

    def __enter__(self) -> ReadyWatch:
        import subprocess

        self._proc = subprocess.Popen(["kubectl", "get", "deploy", self.name, "-n", self.namespace, "-w",
                                       "-o", "jsonpath={.status.readyReplicas}{\"\\n\"}"],
                                      stdout=subprocess.PIPE, text=True)
        for t in self._threads:
            t.start()
        return self

    def _watch(self) -> None:
        assert self._proc and self._proc.stdout
        for line in self._proc.stdout:
            self.deployment.append(int(line.strip() or 0))

    def _poll(self) -> None:
        while not self._stop.is_set():
            md = get("md", self.name, self.namespace)
            self.status.append(int(((md or {}).get("status") or {}).get("readyReplicas") or 0))
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc:
            self._proc.terminate()
            self._proc.wait()
        for t in self._threads:
            t.join(5)


def test_spec_change_rolls_with_no_moment_of_zero_ready(env: Env) -> None:
    before = {p["metadata"]["name"] for p in items("pods", env.namespace, "modelfleet.dev/model=chat")}
    gen = env.md("chat")["metadata"]["generation"]
    patch = {"spec": {"replicas": 1, "engine": {"env": [{"name": "MF_E2E_ROLL", "value": "1"}]}}}

    def rolled() -> bool:
        md, dep = env.md("chat"), get("deploy", "chat", env.namespace)
        pods = items("pods", env.namespace, "modelfleet.dev/model=chat")
        s = dep["status"] if dep else {}
        return bool(
            md and md["status"].get("observedGeneration", 0) > gen and _phase(md) == "Ready"
            and s.get("observedGeneration") == dep["metadata"]["generation"]
            and s.get("updatedReplicas") == s.get("readyReplicas") == s.get("replicas") == 1
            and len(pods) == 1 and pods[0]["metadata"]["name"] not in before
        )

    with ReadyWatch(env.namespace, "chat") as watch:
        kubectl("patch", "md", "chat", "-n", env.namespace, "--type", "merge", "-p", json.dumps(patch))
        env.wait(rolled, LOAD_TIMEOUT, "the rollout of chat's new spec to finish")
    assert watch.deployment and watch.status, "the watch saw nothing"
    assert min(watch.deployment) >= 1, f"the Deployment had 0 ready replicas during the rollout: {watch.deployment}"
    assert min(watch.status) >= 1, f"status said 0 ready replicas during the rollout: {watch.status}"
    pod = items("pods", env.namespace, "modelfleet.dev/model=chat")[0]
    assert {"name": "MF_E2E_ROLL", "value": "1"} in pod["spec"]["containers"][0]["env"]
    env.wait(lambda: get("pdb", "chat", env.namespace) is None, SETTLE_TIMEOUT, "the PDB to go below 2 replicas")
    assert chat(ready_endpoints(env.namespace, "chat")[0], "chat")["choices"]


def test_delete_removes_every_owned_object(env: Env) -> None:
    selector = "modelfleet.dev/model=chat"
    assert items("deploy", env.namespace, selector) and items("svc", env.namespace, selector)
    kubectl("delete", "md", "chat", "-n", env.namespace, "--wait=false")

    def leftovers() -> list[str]:
        left = []
        for kind in ("deploy", "rs", "pods", "svc", "pdb", "endpointslices"):
            left += [f"{kind}/{o['metadata']['name']}" for o in items(kind, env.namespace, selector)]
        return left

    env.wait(lambda: not leftovers() or None, 60, "every object owned by chat to be deleted", interval=1)
    assert env.md("chat") is None


def test_operator_killed_mid_reconcile_converges_without_duplicates(env: Env) -> None:
    names = [f"restart-{i}" for i in range(6)]
    apply(*[model_deployment(n, env.source, replicas=0) for n in names], namespace=env.namespace)
    # Kill as soon as the first Deployment appears: the operator is then in the middle of the
    # batch (some children applied, statuses not yet written).
    batch = f"{labels.MODEL} in ({','.join(names)})"
    env.wait(lambda: items("deploy", env.namespace, batch), 30, "the operator to start on the batch", interval=0.05)
    env.op.kill()
    written = {m["metadata"]["name"] for m in items("md", env.namespace)
               if m["metadata"]["name"] in names and (m.get("status") or {}).get("observedGeneration")}
    print(f"killed with {len(items('deploy', env.namespace, batch))} Deployments and {len(written)}/{len(names)} "
          "statuses written")
    env.op.start()

    def by_model(kind: str) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {n: [] for n in names}
        for obj in items(kind, env.namespace, labels.MODEL):
            out.setdefault(obj["metadata"]["labels"][labels.MODEL], []).append(obj)
        return out

    def model_events() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {n: [] for n in names}
        for e in items("events", env.namespace):
            ref = e["involvedObject"]
            if ref["kind"] == "ModelDeployment" and ref["name"] in out:
                out[ref["name"]].append(e)
        return out

    def converged() -> bool:
        # Status; kopf's record that the create was handled (after it, only triggers that read
        # the stored object are left, so a duplicate would already be there to see); and the
        # Event, posted after the status write, of each status the new operator wrote (one the
        # killed operator wrote may have lost its Event with the process: status is the record).
        mds = {m["metadata"]["name"]: m for m in items("md", env.namespace)}
        events = model_events()
        return all((mds[n].get("status") or {}).get("observedGeneration") == mds[n]["metadata"]["generation"]
                   and condition(mds[n], "Ready")
                   and any(k.endswith("/last-handled-configuration") for k in
                           (mds[n]["metadata"].get("annotations") or {}))
                   and (n in written or any(e["reason"] == "ScaledToZero" for e in events[n]))
                   for n in names)

    env.wait(converged, SETTLE_TIMEOUT, "every restart-N to have its status, Event and handled create")
    mds = {m["metadata"]["name"]: m for m in items("md", env.namespace)}
    children = {kind: by_model(kind) for kind in ("deploy", "svc", "rs")}
    events = model_events()
    for n in names:
        for kind, found in children.items():
            count = len(found[n])
            assert count <= 1 if kind == "rs" else count == 1, f"{n}: {count} {kind}: {found[n]}"
        assert condition(mds[n], "Ready")["reason"] == "ScaledToZero", mds[n]["status"]
        # A repeat shows as a second Event or, folded, as a count above one.
        posted = [(e["reason"], e.get("count") or 1) for e in events[n]]
        reasons = [reason for reason, _ in posted]
        assert len(reasons) == len(set(reasons)) and all(count == 1 for _, count in posted), (
            f"{n}: duplicate events after the restart: {posted}")
    kubectl("delete", "md", *names, "-n", env.namespace, "--wait=false")


def test_a_deployment_edited_or_deleted_by_hand_comes_back(env: Env) -> None:
    """Drift is applied away (through the Deployment watch, or at the latest the resync), and
    fields the operator does not own are left alone."""
    apply(model_deployment("drift", env.source, replicas=0), namespace=env.namespace)
    deployment = env.wait(lambda: get("deploy", "drift", env.namespace), SETTLE_TIMEOUT, "drift's Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]["name"]
    kubectl("set", "image", "deploy/drift", f"{container}=example.invalid/other:1", "-n", env.namespace)
    kubectl("annotate", "deploy", "drift", "team=ml", "-n", env.namespace)

    def restored() -> dict | None:
        d = get("deploy", "drift", env.namespace)
        return d if d and d["spec"]["template"]["spec"]["containers"][0]["image"] == image else None

    # Waits, not bounds: a reconcile at load 16 can take longer than the 10 s these once had.
    d = env.wait(restored, SETTLE_TIMEOUT, "the hand-edited image to be applied back", interval=0.2)
    assert d["metadata"]["annotations"].get("team") == "ml"  # not the operator's field: kept

    kubectl("delete", "deploy", "drift", "-n", env.namespace)
    first_uid = d["metadata"]["uid"]
    env.wait(lambda: (get("deploy", "drift", env.namespace) or {}).get("metadata", {}).get("uid") not in
             (None, first_uid), SETTLE_TIMEOUT, "the deleted Deployment to be created again", interval=0.2)
    kubectl("delete", "md", "drift", "-n", env.namespace, "--wait=false")


def test_delete_completes_while_no_operator_runs(env: Env) -> None:
    """The operator puts no finalizer on a ModelDeployment (its resync is not a kopf timer), so
    a user can delete one while the operator is down; the garbage collector removes its children."""
    apply(model_deployment("orphaned", env.source, replicas=0), namespace=env.namespace)
    env.wait(lambda: get("deploy", "orphaned", env.namespace), SETTLE_TIMEOUT, "orphaned's Deployment")
    env.wait(lambda: condition(env.md("orphaned"), "Ready"), SETTLE_TIMEOUT, "orphaned's status")
    assert not (env.md("orphaned") or {})["metadata"].get("finalizers")
    env.op.stop()
    try:
        started = time.monotonic()
        kubectl("delete", "md", "orphaned", "-n", env.namespace, "--timeout=20s")
        assert env.md("orphaned") is None
        print(f"deleted with no operator running in {time.monotonic() - started:.1f}s")
        env.wait(lambda: get("deploy", "orphaned", env.namespace) is None or None, 60,
                 "the garbage collector to remove orphaned's Deployment", interval=1)
    finally:
        env.op.start()


def test_scale_to_zero_and_back_on_demand(env: Env) -> None:
    def replicas() -> int:
        dep = get("deploy", "zero", env.namespace)
        return int(((dep or {}).get("spec") or {}).get("replicas", -1))

    env.wait(lambda: replicas() == 0 and condition(env.md("zero"), "Ready").get("reason") == "ScaledToZero",
             SETTLE_TIMEOUT, "zero to sit at 0 replicas (ScaledToZero)")
    demand = labels.Demand(time=datetime.now(UTC), waiting=1).encode()
    # The hold counts from the stamp the annotation carries (to the millisecond; a whole-second
    # stamp once made a scale-down at 29.7 s after the unrounded clock read look early).
    signalled = labels.parse_demand(demand).time
    t0 = time.monotonic()
    kubectl("annotate", "md", "zero", "-n", env.namespace, "--overwrite", f"{labels.DEMAND}={demand}")
    env.wait(lambda: replicas() == 1, SETTLE_TIMEOUT, "the demand signal to scale zero to 1", interval=0.1)
    print(f"demand -> Deployment replicas 1 in {time.monotonic() - t0:.1f}s")
    addresses = env.wait(lambda: ready_endpoints(env.namespace, "zero"), LOAD_TIMEOUT, "zero's replica to be ready")
    assert chat(addresses[0], "zero")["choices"]
    # The signal counts for 30 s (the minimum hold) after its time; then, with nothing in
    # flight for scaleDownDelaySeconds (3), back to zero.
    env.wait(lambda: replicas() == 0, 60, "zero to scale back to 0 once idle", interval=1)
    idle = (datetime.now(UTC) - signalled).total_seconds()
    assert idle >= 30, f"scaled to zero {idle:.0f}s after the demand signal, before it went stale"
    env.wait(lambda: not items("pods", env.namespace, "modelfleet.dev/model=zero"), 60, "zero's pod to stop")
    md = env.md("zero")
    assert condition(md, "Ready")["reason"] == "ScaledToZero" and md["status"]["replicas"] == 0


def test_two_operators_with_peering_only_one_acts(env: Env, tmp_path: Path) -> None:
    install_crds(with_peering=True)
    ns = f"{env.namespace}-peer"
    create_namespace(ns)
    apply({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "modelfleet"}}, namespace=ns)
    high = OperatorProcess([ns], tmp_path / "high.log", "--peering", "modelfleet", "--priority", "200", *worker_args())
    low = OperatorProcess([ns], tmp_path / "low.log", "--peering", "modelfleet", "--priority", "100", *worker_args())
    try:
        high.start()
        low.start()
        apply(model_deployment("peered", env.source, replicas=0), namespace=ns)
        explain = lambda: f"{describe(ns, high)}\n\nlow-priority operator:\n{low.tail()}"  # noqa: E731
        wait_for(lambda: condition(get("md", "peered", ns), "Ready"), SETTLE_TIMEOUT, "status from the leader",
                 explain=explain)
        # The follower must stay idle through resyncs: wait for the leader to have run two
        # more reconciles (each object is resynced at least every 1.5 intervals), not for a time.
        led = wait_for(high.reconciles, SETTLE_TIMEOUT, "the leader's reconcile count", explain=explain)
        wait_for(lambda: high.reconciles() >= led + 2, SETTLE_TIMEOUT, "two resyncs by the leader",
                 explain=explain)
        assert low.reconciles() == 0, f"the lower-priority operator acted too:\n{low.tail()}"
        high.stop()  # graceful: it leaves the peering, so the follower takes over at once
        kubectl("patch", "md", "peered", "-n", ns, "--type", "merge", "-p", '{"spec":{"replicas":1}}')
        wait_for(lambda: low.reconciles() > 0 and (get("deploy", "peered", ns) or {}).get("spec", {}).get("replicas") == 1,
                 SETTLE_TIMEOUT, "the follower to take over after the leader stopped", explain=explain)
    finally:
        high.stop()
        delete_model_deployments(ns)
        low.stop()
        delete_namespace(ns)
