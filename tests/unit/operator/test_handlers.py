"""Handlers: error -> retry policy, metrics, registration on a registry passed in; the command
line and kopf settings; reading in-flight load from worker metrics."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import kopf
import pytest

from modelfleet import labels
from modelfleet.operator.config import OperatorConfig
from modelfleet.operator.handlers import Deps, classify, make_runner, owner_stub, register
from modelfleet.operator.load import inflight_from_metrics, is_ready
from modelfleet.operator.main import build_parser, build_registry, config_from_args, kopf_settings
from modelfleet.operator.metrics import OperatorMetrics
from modelfleet.operator.reconcile import InvalidSpec


class Status(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status = status


@pytest.mark.parametrize(
    ("exc", "kind", "delay"),
    [
        (InvalidSpec("bad"), kopf.PermanentError, None),
        (Status(409), kopf.TemporaryError, 1.0),
        (Status(410), kopf.TemporaryError, 1.0),
        (Status(429), kopf.TemporaryError, 5.0),
        (Status(503), kopf.TemporaryError, 5.0),
        (Status(403), kopf.TemporaryError, 30.0),
        (ConnectionRefusedError("refused"), kopf.TemporaryError, 5.0),
    ],
)
def test_classify(exc: Exception, kind: type, delay: float | None) -> None:
    out = classify(exc)
    assert isinstance(out, kind)
    if delay is not None:
        assert out.delay == delay  # type: ignore[attr-defined]


def test_bugs_are_not_disguised() -> None:
    bug = KeyError("x")
    assert classify(bug) is bug
    not_found = Status(404)  # the object vanished mid-reconcile: kopf's default handling
    assert classify(not_found) is not_found


class FailingKube:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def get(self, *a, **k):
        raise self.exc


def deps(kube, metrics: OperatorMetrics) -> Deps:
    return Deps(
        kube=kube,
        config=OperatorConfig(),
        probe=lambda pods: None,
        metrics=metrics,
        clock=lambda: datetime(2025, 1, 1, tzinfo=UTC),
    )


BODY = {
    "metadata": {"name": "m", "namespace": "default", "uid": "u"},
    "spec": {"model": {"source": "hf://gpt2"}},
}


def _value(metrics: OperatorMetrics, name: str, **want: str) -> float:
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                return s.value
    return 0.0


def test_runner_translates_errors_and_counts_them() -> None:
    metrics = OperatorMetrics()
    run = make_runner(deps(FailingKube(Status(409)), metrics))
    with pytest.raises(kopf.TemporaryError):
        run(BODY, "timer")
    assert _value(metrics, "modelfleet_operator_reconcile_errors_total", kind="temporary") == 1
    assert (
        _value(metrics, "modelfleet_operator_reconciles_total", trigger="timer", result="TemporaryError") == 1
    )
    assert _value(metrics, "modelfleet_operator_reconcile_duration_seconds_count", trigger="timer") == 1


class BlockingKube:
    """get() blocks until released and then reports the object gone; counts its calls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0

    def get(self, *a, **k):
        self.calls += 1
        self.entered.release()
        self.release.wait(5)
        return None


def test_triggers_coalesce_while_one_reconcile_waits() -> None:
    metrics, kube = OperatorMetrics(), BlockingKube()
    run = make_runner(deps(kube, metrics))
    first = threading.Thread(target=run, args=(BODY, "create"))
    first.start()
    assert kube.entered.acquire(timeout=5)  # the first run is inside reconcile
    # Two more triggers arrive while it runs: one waits its turn, the other has nothing to add
    # and is skipped at once (which of the two is skipped depends on which enters first).
    later = [threading.Thread(target=run, args=(BODY, trigger)) for trigger in ("child", "timer")]
    for thread in later:
        thread.start()

    def coalesced() -> float:
        return sum(_value(metrics, "modelfleet_operator_reconciles_coalesced_total", trigger=t)
                   for t in ("child", "timer"))

    deadline = time.monotonic() + 5
    while coalesced() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert coalesced() == 1
    assert kube.calls == 1  # the waiting one has not started: the first still runs
    kube.release.set()
    for thread in (first, *later):
        thread.join(5)
    assert kube.calls == 2  # the first and the one that waited; never the coalesced one
    assert coalesced() == 1


def test_an_object_gone_mid_reconcile_is_forgotten(monkeypatch) -> None:
    """Nothing is kept for a deleted object: the next trigger for its uid starts afresh (a
    create's `fresh` is honoured again, as for an object never seen)."""
    import modelfleet.operator.handlers as handlers
    from modelfleet.operator.reconcile import Gone

    seen = []

    def gone(body, *a, **kw):
        seen.append(kw["fresh"])
        raise Gone("deleted meanwhile")

    monkeypatch.setattr(handlers, "reconcile", gone)
    run = make_runner(deps(FailingKube(Status(500)), OperatorMetrics()))
    assert run(BODY, "create", fresh=True) is None
    assert run(BODY, "create", fresh=True) is None
    assert seen == [True, True]


def test_child_event_that_changes_nothing_status_reads_is_skipped(monkeypatch) -> None:
    import modelfleet.operator.handlers as handlers
    from modelfleet.api import ModelDeploymentStatus
    from modelfleet.operator.conditions import deployment_facts
    from modelfleet.operator.reconcile import Outcome

    applied = {"metadata": {"generation": 1, "resourceVersion": "7"}, "status": {}}
    calls = []

    def fake_reconcile(body, *a, **kw):
        calls.append(body["metadata"]["name"])
        return Outcome(0, ModelDeploymentStatus(), False, deployment_facts=deployment_facts(applied))

    monkeypatch.setattr(handlers, "reconcile", fake_reconcile)
    metrics = OperatorMetrics()
    run = make_runner(deps(FailingKube(Status(500)), metrics))
    run(BODY, "create")
    run(BODY, "child", deployment=applied)  # the echo of our own apply
    # a new resourceVersion whose changes status does not read (e.g. a condition's timestamp)
    run(BODY, "child", deployment={**applied, "metadata": {"generation": 1, "resourceVersion": "8"}})
    assert calls == ["m"]
    seen = {**applied, "status": {"observedGeneration": 1}}  # the controller saw the spec
    run(BODY, "child", deployment=seen)
    run(BODY, "child")  # a deletion: always reconciled
    assert calls == ["m", "m", "m"]
    assert _value(metrics, "modelfleet_operator_reconciles_coalesced_total", trigger="child") == 2


def test_a_child_event_hands_reconcile_its_deployment_and_what_was_last_applied(monkeypatch) -> None:
    """The wiring of the status-only reconcile: reconcile() decides, the runner must remember
    Outcome.applied per object and pass it back with the child's Deployment."""
    import modelfleet.operator.handlers as handlers
    from modelfleet.api import ModelDeploymentStatus
    from modelfleet.operator.conditions import deployment_facts
    from modelfleet.operator.reconcile import Outcome

    seen = []

    def fake_reconcile(body, *a, **kw):
        seen.append({k: kw[k] for k in ("child", "applied", "fresh")})
        child = kw["child"] or {"metadata": {"generation": 1}}
        return Outcome(0, ModelDeploymentStatus(), False, deployment_facts=deployment_facts(child), applied=(1, 1))

    monkeypatch.setattr(handlers, "reconcile", fake_reconcile)
    run = make_runner(deps(FailingKube(Status(500)), OperatorMetrics()))
    run(BODY, "create", fresh=True)
    controller_saw = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "replicas": 1}}
    run(BODY, "child", deployment=controller_saw)
    assert seen[0] == {"child": None, "applied": None, "fresh": True}
    assert seen[1] == {"child": controller_saw, "applied": (1, 1), "fresh": False}


def test_resync_skips_an_object_reconciled_within_half_an_interval(monkeypatch) -> None:
    import modelfleet.operator.handlers as handlers
    from modelfleet.api import ModelDeploymentStatus
    from modelfleet.operator.reconcile import Outcome

    calls, now = [], [100.0]
    monkeypatch.setattr(handlers, "reconcile", lambda body, *a, **kw: calls.append(1) or Outcome(0, ModelDeploymentStatus(), False))
    run = make_runner(deps(FailingKube(Status(500)), OperatorMetrics()), monotonic=lambda: now[0])  # resync 10 s
    run(BODY, "create")
    now[0] += 4
    run(BODY, "timer")  # 4 s after the create: nothing to catch up on
    run(BODY, "update")  # other triggers always run
    now[0] += 6
    run(BODY, "timer")  # 6 s after the update
    assert len(calls) == 3


def test_register_uses_the_registry_given() -> None:
    registry = kopf.OperatorRegistry()
    register(registry, deps(FailingKube(Status(500)), OperatorMetrics()))
    changing = {h.id for h in registry._changing.get_all_handlers()}
    assert {"reconcile-create", "reconcile-update", "reconcile-resume"} <= changing
    assert {h.id for h in registry._watching.get_all_handlers()} == {"child", "cache-fill"}  # Deployments, fill Jobs
    assert {h.id for h in registry._indexing.get_all_handlers()} == {"modeldeployments"}
    assert {"start-resync", "stop-resync"} <= {h.id for h in registry._activities.get_all_handlers()}
    # No timers, daemons or deletion handlers: kopf adds its finalizer for those, and deleting a
    # ModelDeployment would then hang while no operator runs.
    assert not registry._spawning.get_all_handlers()
    assert not [h for h in registry._changing.get_all_handlers() if "DELETE" in str(h.reason)]
    # Nothing leaked into kopf's process-wide default registry.
    default = kopf.get_default_registry()
    assert not any(h.id == "modeldeployments" for h in default._indexing.get_all_handlers())


def test_owner_stub_follows_the_controller_reference() -> None:
    child = {
        "metadata": {
            "namespace": "ns",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Other", "name": "x", "controller": False},
                {
                    "apiVersion": "modelfleet.dev/v1alpha1",
                    "kind": "ModelDeployment",
                    "name": "m",
                    "uid": "u",
                    "controller": True,
                },
            ],
        }
    }
    assert owner_stub(child) == {"metadata": {"name": "m", "namespace": "ns", "uid": "u"}}
    assert owner_stub({"metadata": {"namespace": "ns"}}) is None


def test_operator_registry_can_log_in() -> None:
    registry = build_registry(deps(FailingKube(Status(500)), OperatorMetrics()))
    assert {"login", "start-resync"} <= {h.id for h in registry._activities.get_all_handlers()}


def test_cli_options_become_settings() -> None:
    args = build_parser().parse_args(
        [
            "-n",
            "team-a",
            "-n",
            "team-b",
            "--default-image",
            "reg/w:1",
            "--resync-seconds",
            "3",
            "--standalone",
        ]
    )
    assert args.namespace == ["team-a", "team-b"] and args.standalone
    config = config_from_args(args)
    assert config.default_image == "reg/w:1" and config.resync_seconds == 3
    settings = kopf_settings(args)
    assert settings.persistence.progress_storage.prefix == labels.KOPF_PREFIX
    assert settings.persistence.diffbase_storage.prefix == labels.KOPF_PREFIX
    assert settings.posting.reporting_component == "modelfleet-operator"


def test_namespace_and_all_namespaces_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-n", "a", "-A"])


def test_kopf_prefix_keeps_the_demand_annotation_in_kopfs_diff() -> None:
    """kopf drops annotations under its storage prefix from the diff it reacts to."""
    assert not labels.DEMAND.startswith(labels.KOPF_PREFIX + "/")
    assert labels.KOPF_PREFIX.endswith("." + labels.PREFIX)


METRICS = """\
# HELP vllm:num_requests_running Requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="tiny"} 3.0
# HELP vllm:num_requests_waiting Requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="tiny"} 2.0
# HELP other_total x
# TYPE other_total counter
other_total 99.0
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [(METRICS, 5), ("other_total 1\n", None), ("", None), ("garbage{{{ 1\n", None)],
)
def test_inflight_from_metrics(text: str, expected: int | None) -> None:
    assert inflight_from_metrics(text) == expected


def test_is_ready_reads_the_ready_condition() -> None:
    assert is_ready({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    assert not is_ready({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    assert not is_ready({"status": {}})


def test_liveness_port_in_use_is_caught_before_kopf_starts() -> None:
    import socket

    from modelfleet.operator.main import _check_bindable

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            _check_bindable(f"http://127.0.0.1:{port}/healthz")
    with pytest.raises(ValueError):
        _check_bindable("tcp://nowhere")
