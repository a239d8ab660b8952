"""Status from sample Deployment and Pod objects, shaped as the API server returns them."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet.api import AutoscalerStatus, ModelDeployment, ModelDeploymentStatus
from modelfleet.operator.conditions import compute_status, last_line, transition_events

T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:05:00Z"
SELECTOR = "modelfleet.dev/model=tiny-chat"


def make_md(gpu: int = 0, memory: str | None = None, status: dict[str, Any] | None = None) -> ModelDeployment:
    resources: dict[str, Any] = {"gpu": gpu}
    if memory:
        resources["memory"] = memory
    return ModelDeployment.from_body(
        {
            "metadata": {"name": "tiny-chat", "namespace": "default", "uid": "u", "generation": 3},
            "spec": {"model": {"source": "file:///models/tiny-chat"}, "resources": resources,
                     # several GPUs per replica is for vLLM only
                     "engine": {"kind": "vllm" if gpu > 1 else "modelfleet"}},
            "status": status or {},
        }
    )


def deployment(
    replicas: int, ready: int, updated: int | None = None, conditions: list[dict] | None = None
) -> dict:
    return {
        "metadata": {"name": "tiny-chat", "generation": 2},
        "status": {
            "observedGeneration": 2,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
            "conditions": conditions or [],
        },
    }


def pod(
    name: str = "tiny-chat-1",
    phase: str = "Running",
    container: dict | None = None,
    conditions: list | None = None,
) -> dict:
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if container is not None:
        status["containerStatuses"] = [{"name": "worker", "image": "modelfleet:1", **container}]
    return {"metadata": {"name": name}, "status": status}


READY_POD = pod(container={"ready": True, "started": True, "state": {"running": {"startedAt": T0}}})
LOADING_POD = pod(container={"ready": False, "started": False, "state": {"running": {"startedAt": T0}}})
UNSCHEDULABLE_POD = pod(
    phase="Pending",
    conditions=[
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available.",
        }
    ],
)
IMAGE_POD = pod(
    phase="Pending",
    container={
        "ready": False,
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "nope:1"'}},
    },
)
CRASH_POD = pod(
    container={
        "ready": False,
        "restartCount": 4,
        "state": {
            "waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}
        },
        "lastState": {
            "terminated": {
                "exitCode": 2,
                "reason": "Error",
                "message": "loading...\nTraceback (most recent call last):\nerror: model directory not found: /models/tiny-chat\n",
            }
        },
    }
)
OOM_POD = pod(
    container={
        "ready": False,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
    }
)
RESTARTED_POD = pod(
    container={
        "ready": False,
        "restartCount": 2,
        "state": {"running": {"startedAt": T0}},
        "lastState": {
            "terminated": {
                "exitCode": 1,
                "reason": "Error",
                "message": "error: model directory /m does not exist",
            }
        },
    }
)
CREATING_POD = pod(
    phase="Pending",
    container={"ready": False, "state": {"waiting": {"reason": "ContainerCreating"}}},
    conditions=[{"type": "PodScheduled", "status": "True"}],
)


def status_of(
    md: ModelDeployment,
    desired: int,
    dep: dict | None,
    pods: list[dict],
    events: list[dict] = (),
    now: str = T0,
) -> ModelDeploymentStatus:  # type: ignore[assignment]
    return compute_status(md, desired, dep, pods, list(events), SELECTOR, now)


def cond(status: ModelDeploymentStatus, type_: str) -> tuple[str, str]:
    c = status.condition(type_)
    assert c is not None
    return c.status, c.reason


# (desired, deployment, pods, phase, Ready (status, reason), Degraded status, words in Ready's message)
CASES = [
    (
        "all ready",
        2,
        deployment(2, 2),
        [READY_POD, READY_POD],
        "Ready",
        ("True", "ReplicasReady"),
        "False",
        "2/2",
    ),
    (
        "loading",
        1,
        deployment(1, 0),
        [LOADING_POD],
        "Loading",
        ("False", "Loading"),
        "False",
        "loading the model",
    ),
    (
        "scaling up, one loads",
        2,
        deployment(2, 1),
        [READY_POD, LOADING_POD],
        "Ready",
        ("True", "ReplicasReady"),
        "False",
        "1/2",
    ),
    (
        "no gpu anywhere",
        1,
        deployment(1, 0),
        [UNSCHEDULABLE_POD],
        "Pending",
        ("False", "Unschedulable"),
        "True",
        "Insufficient nvidia.com/gpu",
    ),
    (
        "image does not pull",
        1,
        deployment(1, 0),
        [IMAGE_POD],
        "Failed",
        ("False", "ImagePullBackOff"),
        "True",
        "spec.engine.image",
    ),
    (
        "model fails to load",
        1,
        deployment(1, 0),
        [CRASH_POD],
        "Failed",
        ("False", "CrashLoopBackOff"),
        "True",
        "model directory not found: /models/tiny-chat",
    ),
    (
        "one of two crashes",
        2,
        deployment(2, 1),
        [READY_POD, CRASH_POD],
        "Degraded",
        ("True", "PartiallyReady"),
        "True",
        "CrashLoopBackOff",
    ),
    (
        "out of memory",
        1,
        deployment(1, 0),
        [OOM_POD],
        "Failed",
        ("False", "CrashLoopBackOff"),
        "True",
        "spec.resources.memory is 8Gi",
    ),
    (
        "container creating",
        1,
        deployment(1, 0),
        [CREATING_POD],
        "Pending",
        ("False", "ContainerCreating"),
        "False",
        "starting",
    ),
    ("no deployment yet", 1, None, [], "Pending", ("False", "Creating"), "False", "creating"),
    (
        "scaled to zero",
        0,
        deployment(0, 0),
        [],
        "Pending",
        ("False", "ScaledToZero"),
        "False",
        "scaled to zero",
    ),
    (
        "scaling to zero",
        0,
        deployment(1, 1),
        [READY_POD],
        "Pending",
        ("False", "ScalingDown"),
        "False",
        "still stopping",
    ),
    (
        "quota blocks pods",
        1,
        deployment(
            0,
            0,
            conditions=[
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": 'pods "x" is forbidden: exceeded quota: gpu',
                }
            ],
        ),
        [],
        "Failed",
        ("False", "FailedCreate"),
        "True",
        "exceeded quota",
    ),
]


@pytest.mark.parametrize(
    ("name", "desired", "dep", "pods", "phase", "ready", "degraded", "words"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_status_from_cluster_facts(name, desired, dep, pods, phase, ready, degraded, words) -> None:
    status = status_of(make_md(gpu=1, memory="8Gi"), desired, dep, pods)
    assert status.phase == phase
    assert cond(status, "Ready") == ready
    assert cond(status, "Degraded")[0] == degraded
    message = status.condition("Ready").message  # type: ignore[union-attr]
    assert words in message
    assert status.desired_replicas == desired and status.selector == SELECTOR
    assert status.observed_generation == 3
    assert status.served_name == "tiny-chat"


def test_counts_come_from_the_deployment() -> None:
    status = status_of(
        make_md(), 3, deployment(4, 2, updated=2), [READY_POD, READY_POD, LOADING_POD, LOADING_POD]
    )
    assert (status.replicas, status.ready_replicas, status.updated_replicas) == (4, 2, 2)
    assert cond(status, "Progressing") == ("True", "RollingUpdate")


@pytest.mark.parametrize(
    ("desired", "dep", "progressing"),
    [
        (2, deployment(2, 2), ("False", "RolloutComplete")),
        (3, deployment(2, 2), ("True", "ScalingUp")),
        (1, deployment(2, 2), ("True", "ScalingDown")),
        (2, deployment(3, 2, updated=1), ("True", "RollingUpdate")),
        (
            1,
            deployment(
                1,
                0,
                conditions=[
                    {
                        "type": "Progressing",
                        "status": "False",
                        "reason": "ProgressDeadlineExceeded",
                        "message": "timed out",
                    }
                ],
            ),
            ("False", "ProgressDeadlineExceeded"),
        ),
    ],
)
def test_progressing(desired: int, dep: dict, progressing: tuple[str, str]) -> None:
    assert cond(status_of(make_md(), desired, dep, [READY_POD]), "Progressing") == progressing


def test_unschedulable_message_says_what_the_pod_asks_for() -> None:
    status = status_of(make_md(gpu=4), 1, deployment(1, 0), [UNSCHEDULABLE_POD])
    message = status.condition("Ready").message  # type: ignore[union-attr]
    assert message.startswith("0/1 nodes are available: 1 Insufficient nvidia.com/gpu")
    assert "each replica asks for 4 nvidia.com/gpu" in message


def test_failed_mount_event_explains_a_stuck_pod() -> None:
    events = [
        {
            "type": "Warning",
            "reason": "FailedMount",
            "message": 'MountVolume.SetUp failed for volume "model": not found',
            "involvedObject": {"kind": "Pod", "name": "tiny-chat-1"},
        }
    ]
    status = status_of(make_md(), 1, deployment(1, 0), [CREATING_POD], events)
    assert cond(status, "Ready") == ("False", "FailedMount")
    assert status.phase == "Pending"


def test_terminating_pods_do_not_count_as_problems() -> None:
    going = {**CRASH_POD, "metadata": {"name": "old", "deletionTimestamp": T0}}
    status = status_of(make_md(), 1, deployment(1, 1), [READY_POD, going])
    assert status.phase == "Ready" and cond(status, "Degraded") == ("False", "AsExpected")


def test_last_transition_time_kept_while_status_unchanged() -> None:
    first = status_of(make_md(), 1, deployment(1, 0), [LOADING_POD], now=T0)
    md = make_md(status=first.to_wire())
    # Same Ready status (False), different reason: time stays; Ready flips: time moves.
    still_down = status_of(md, 1, deployment(1, 0), [CRASH_POD], now=T1)
    assert still_down.condition("Ready").last_transition_time == T0  # type: ignore[union-attr]
    assert still_down.condition("Degraded").last_transition_time == T1  # type: ignore[union-attr]
    up = status_of(md, 1, deployment(1, 1), [READY_POD], now=T1)
    assert up.condition("Ready").last_transition_time == T1  # type: ignore[union-attr]


def test_autoscaler_memory_is_placed_as_given_never_carried_over() -> None:
    """reconcile.py is the one writer of status.autoscaler: compute_status only places it."""
    md = make_md(status={"autoscaler": {"desiredReplicas": 2, "lastActiveTime": T0}})
    status = status_of(md, 2, deployment(2, 2), [READY_POD, READY_POD])
    assert status.autoscaler is None
    given = AutoscalerStatus(desired_replicas=3, last_active_time=T1)
    placed = compute_status(md, 2, deployment(2, 2), [READY_POD], [], SELECTOR, T1, autoscaler=given)
    assert placed.autoscaler == given


def test_events_on_transitions_only() -> None:
    loading = status_of(make_md(), 1, deployment(1, 0), [LOADING_POD])
    crashed = status_of(make_md(status=loading.to_wire()), 1, deployment(1, 0), [CRASH_POD])
    (event,) = transition_events(loading, crashed)
    assert event.type == "Warning" and event.reason == "CrashLoopBackOff"
    assert "Loading -> Failed" in event.message and "model directory not found" in event.message
    again = status_of(make_md(status=crashed.to_wire()), 1, deployment(1, 0), [CRASH_POD], now=T1)
    assert transition_events(crashed, again) == []
    ready = status_of(make_md(status=crashed.to_wire()), 1, deployment(1, 1), [READY_POD])
    (event,) = transition_events(crashed, ready)
    assert event.type == "Normal" and event.reason == "ReplicasReady"


VLLM_START_FAILURE = """\
(APIServer pid=632) INFO 11-30 19:49:11 [api_utils.py:286] non-default args: {'model': '/tmp/notamodel'}
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, Invalid repository ID or local directory specified: '/tmp/notamodel'.
For Hugging Face models: ensure the presence of a 'config.json'.
 [type=value_error, input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
"""


def test_a_crash_shows_the_line_that_names_the_error_not_the_noise_after_it() -> None:
    from modelfleet.operator.conditions import error_line

    assert error_line(VLLM_START_FAILURE) == (
        "Value error, Invalid repository ID or local directory specified: '/tmp/notamodel'.")
    assert error_line("loading\nmodelfleet worker: error: no such model directory /m\n") == (
        "modelfleet worker: error: no such model directory /m")
    assert error_line("killed\n") == "killed"


def test_last_line_takes_the_error_and_bounds_it() -> None:
    assert last_line("a\n\nTraceback\nValueError: bad\n\n") == "ValueError: bad"
    assert last_line(None) == ""
    assert len(last_line("x" * 5000)) <= 515


def test_a_refused_apply_is_not_ready_and_fails_only_when_nothing_serves() -> None:
    refused = "the API server refused the worker Deployment: duplicate entries for key [name=\"X\"]"
    new = compute_status(make_md(), 1, None, [], [], SELECTOR, T0, apply_error=refused)
    assert new.phase == "Failed"
    assert cond(new, "Ready") == ("False", "ApplyFailed") and cond(new, "Degraded") == ("True", "ApplyFailed")
    assert new.condition("Ready").message == refused  # type: ignore[union-attr]
    # A spec change refused while the previous spec's replicas serve: they keep serving.
    old = compute_status(make_md(), 1, deployment(1, 1), [READY_POD], [], SELECTOR, T0, apply_error=refused)
    assert old.phase == "Degraded" and old.ready_replicas == 1
    assert cond(old, "Ready") == ("False", "ApplyFailed") and cond(old, "Progressing") == ("False", "ApplyFailed")
    (event,) = transition_events(ModelDeploymentStatus(), new)
    assert event.type == "Warning" and event.reason == "ApplyFailed" and refused in event.message
    long = compute_status(make_md(), 1, None, [], [], SELECTOR, T0, apply_error="x" * 5000)
    assert len(long.condition("Ready").message) <= 515  # type: ignore[union-attr]


def test_a_replica_killed_by_a_signal_is_not_reported_as_a_failed_model_load() -> None:
    """Found by tests/e2e/test_faults.py: after a SIGKILL the log tail is a line from long after
    the model loaded, and status said "CrashLoopBackOff: the model failed to load: ... serving"."""
    killed = {"exitCode": 137, "reason": "Error", "message": "INFO modelfleet.worker: serving faults on :8000\n"}
    restarting = pod(name="tiny-chat-2", container={"ready": False, "restartCount": 1,
                                                    "state": {"running": {"startedAt": T0}},
                                                    "lastState": {"terminated": killed}})
    status = status_of(make_md(), 2, deployment(2, 1), [READY_POD, restarting])
    ready = status.condition("Ready")
    assert status.phase == "Degraded" and ready is not None and ready.reason == "PartiallyReady"
    assert "killed by signal 9 (exit code 137); it is starting again" in ready.message
    assert "failed to load" not in ready.message
    # Killed again and again: back-off, still said as a kill, not as a load failure.
    looping = pod(container={"ready": False, "restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                             "lastState": {"terminated": killed}})
    status = status_of(make_md(), 1, deployment(1, 0), [looping])
    assert cond(status, "Ready") == ("False", "CrashLoopBackOff") and status.phase == "Failed"
    assert "killed by signal 9" in status.condition("Ready").message  # type: ignore[union-attr]
    # A signal exit whose log names an error still shows the error.
    errored = {**killed, "message": "RuntimeError: CUDA out of memory\n"}
    crashed = pod(container={"ready": False, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                             "lastState": {"terminated": errored}})
    assert "CUDA out of memory" in status_of(make_md(), 1, deployment(1, 0), [crashed]).condition("Ready").message  # type: ignore[union-attr]
