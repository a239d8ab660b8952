"""The operator's failure conditions on the real node (MODELFLEET_CLUSTER_NODE_KIND=kubelet),
from what the real kubelet and scheduler report, not from statuses a harness writes: an image
that is not there (the kubelet's ErrImagePull / ImagePullBackOff), a worker that crashes while
loading (the kubelet's back-off, the container's termination message from its log), and a GPU
request on a node that has none (the scheduler's Unschedulable). The agent-based versions are
in tests/e2e/test_operator.py, and these assert what they do.

The operator runs on the host (as there) and its workers run from the worker image `make
images` built (`localkube load-images`). Skipped on a cluster whose node is the agent.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from localkube.testing import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # operator_harness

from operator_harness import (  # noqa: E402
    WORKER_IMAGE,
    OperatorProcess,
    apply,
    condition,
    describe,
    get,
    kubectl,
    model_deployment,
    operator_namespace,
    real_node,
    wait_for,
)

from modelfleet import labels  # noqa: E402

pytestmark = pytest.mark.e2e

MISSING_IMAGE = "localkube.dev/not-built:1"
# The kubelet's first pull error, then its back-off (10 s doubling), both seen within a minute;
# a crash needs the worker image to start Python and fail (~10-20 s a run on 2 loaded cores).
SETTLE_TIMEOUT = 120


@dataclass
class Env:
    namespace: str
    op: OperatorProcess

    def problem(self, name: str, reasons: set[str]) -> dict:
        """The ModelDeployment once its Ready condition gives one of `reasons`."""
        return self.wait(lambda: (md := get("md", name, self.namespace))
                         and condition(md, "Ready").get("reason") in reasons and md,
                         f"{name} to report Ready=False with a reason in {sorted(reasons)}")

    def wait(self, fn, what: str) -> dict:
        return wait_for(fn, SETTLE_TIMEOUT, what, explain=lambda: describe(self.namespace, self.op))


@pytest.fixture(scope="module")
def env(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:  # noqa: ARG001 - cluster sets KUBECONFIG
    if not real_node():
        pytest.skip("the node is the agent: see tests/e2e/test_operator.py (MODELFLEET_CLUSTER_NODE_KIND=kubelet)")
    source = "file:///nonexistent/modelfleet-e2e/model"  # only `crash` gets as far as reading it
    # The worker image without --host-path-models: the missing model is the worker's own error.
    with operator_namespace(tmp_path_factory.mktemp("operator"), "--default-image", WORKER_IMAGE,
                            workers=False) as (ns, op):
        apply(
            model_deployment("noimage", source, engine={"image": MISSING_IMAGE}),
            model_deployment("crash", source),
            model_deployment("gpu", source, resources={"gpu": 1, "cpu": "100m"}),
            namespace=ns,
        )
        yield Env(ns, op)


def test_missing_image_is_the_kubelets_pull_failure(env: Env) -> None:
    md = env.problem("noimage", {"ErrImagePull", "ImagePullBackOff"})
    ready = condition(md, "Ready")
    assert ready["status"] == "False"
    assert MISSING_IMAGE in ready["message"] and "spec.engine.image" in ready["message"], ready["message"]


def test_crash_while_loading_is_the_kubelets_back_off_with_the_workers_error(env: Env) -> None:
    md = env.wait(lambda: (m := get("md", "crash", env.namespace))
                  and "/nonexistent/modelfleet-e2e/model" in condition(m, "Ready").get("message", "") and m,
                  "the worker's error (model directory missing) in status")
    ready = condition(md, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "CrashLoopBackOff", ready
    assert "does not exist" in ready["message"], ready["message"]
    assert md["status"]["phase"] == "Failed"
    # The worker ran from the image, in containerd, and the kubelet restarted it.
    pods = json.loads(kubectl("get", "pods", "-n", env.namespace, "-l", f"{labels.MODEL}=crash",
                              "-o", "json").stdout)["items"]
    status = pods[0]["status"]["containerStatuses"][0]
    assert status["image"] == WORKER_IMAGE and status["containerID"].startswith("containerd://"), status
    assert status["restartCount"] >= 1 and status["lastState"]["terminated"]["exitCode"] != 0, status


def test_gpu_request_on_a_node_without_gpus_is_unschedulable(env: Env) -> None:
    md = env.problem("gpu", {"Unschedulable"})
    ready = condition(md, "Ready")
    assert ready["status"] == "False"
    # The scheduler's own words, and the operator's hint of what each replica asks for.
    assert "Insufficient nvidia.com/gpu" in ready["message"], ready["message"]
    assert "each replica asks for 1 nvidia.com/gpu" in ready["message"], ready["message"]
    assert md["status"]["phase"] == "Pending"
