"""The weight cache (operator/cache.py, worker/fetch.py): identity, the claim and fill Job as
rendered, the Deployment both engines get once filled, progress lines, status, and sync_cache
and reconcile() against an in-memory namespace (create, fill, finish, join, keep, release)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from modelfleet import labels
from modelfleet.api import ModelDeployment, ModelDeploymentStatus
from modelfleet.operator.cache import (
    CACHE_READY,
    FILL_FAILED,
    FILLED,
    FILLING,
    CacheState,
    cache_ref,
    fill_error,
    render_claim,
    render_fill_job,
    serving_model,
    sync_cache,
    with_cache,
)
from modelfleet.operator.conditions import compute_status
from modelfleet.operator.config import OperatorConfig
from modelfleet.operator.kube import DEPLOYMENT, JOB, PVC
from modelfleet.operator.reconcile import InvalidSpec, reconcile
from modelfleet.operator.render import render_deployment
from modelfleet.sources import ModelSourceError
from modelfleet.worker.fetch import MARKER, Progress, fetch, parse_progress, unfetchable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_reconcile's in-memory namespace
from test_reconcile import ApiError, FakeKube  # noqa: E402

CONFIG = OperatorConfig(default_image="modelfleet:test")
NOW = "2025-01-01T12:00:00Z"
MIRROR = {"name": "HF_ENDPOINT", "value": "http://10.244.0.1:9999"}


def make(name: str = "chat", uid: str = "uid-chat", source: str = "hf://org/chat@v1", cache: Any = None,
         **spec: Any) -> ModelDeployment:
    model = {"source": source, "cache": {"size": "2Gi"} if cache is None else cache}
    body = {"metadata": {"name": name, "namespace": "ns", "uid": uid, "generation": 1},
            "spec": {"model": model, **spec}}
    return ModelDeployment.from_body(body)


# --- identity and rendering ------------------------------------------------------------------


def test_one_claim_per_source_and_storage_class_whoever_asks() -> None:
    a, b = cache_ref(make("a", "u1")), cache_ref(make("b", "u2"))
    assert a is not None and b is not None
    assert a.claim == b.claim and a.directory == b.directory and a.job == b.job
    assert a.claim.startswith("modelfleet-cache-") and len(a.claim) <= 63 and len(a.job) <= 63
    other_class = cache_ref(make(cache={"size": "2Gi", "storageClassName": "fast"}))
    other_source = cache_ref(make(source="hf://org/chat@v2"))
    assert other_class is not None and other_source is not None
    assert len({a.claim, other_class.claim, other_source.claim}) == 3
    assert cache_ref(make(cache=None).model_copy(update={"spec": make().spec.model_copy(update={
        "model": make().spec.model.model_copy(update={"cache": None})})})) is None


def test_an_existing_claim_holds_each_source_in_its_own_directory() -> None:
    a = cache_ref(make(cache={"claimName": "weights"}))
    b = cache_ref(make(source="hf://org/other", cache={"claimName": "weights"}))
    assert a is not None and b is not None
    assert a.claim == b.claim == "weights" and a.directory != b.directory
    assert not a.owned and a.keep and a.job != b.job


def test_the_claim_is_owned_by_its_user_without_being_controlled() -> None:
    md = make(cache={"size": "5Gi", "storageClassName": "fast"})
    claim = render_claim(md, cache_ref(md))
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}},
                             "storageClassName": "fast"}
    # Applied without owners: each user, the first too, adds its own by a merging patch.
    assert "ownerReferences" not in claim["metadata"]
    kube = FakeKube()
    sync_cache(md, kube, CONFIG, NOW)
    claim = stored(kube, PVC, cache_ref(md).claim)
    (ref,) = claim["metadata"]["ownerReferences"]
    assert ref["uid"] == "uid-chat" and ref["kind"] == "ModelDeployment"
    assert ref["controller"] is False and ref["blockOwnerDeletion"] is False  # several owners; GC needs no block
    assert claim["metadata"]["labels"][labels.CACHE] == cache_ref(md).digest
    assert labels.MODEL not in claim["metadata"]["labels"]
    assert claim["metadata"]["annotations"][labels.CACHE_SOURCE] == "hf://org/chat@v1"


def test_a_kept_claim_has_no_owner() -> None:
    md = make(cache={"size": "5Gi", "keep": True, "accessMode": "ReadWriteMany"})
    claim = render_claim(md, cache_ref(md))
    assert "ownerReferences" not in claim["metadata"]
    assert claim["metadata"]["labels"][labels.CACHE_KEEP] == "true"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_fill_job_runs_modelfleet_fetch_into_the_claim() -> None:
    md = make(engine={"kind": "vllm"}, model={"source": "hf://org/chat@v1", "cache": {"size": "2Gi"},
                                               "tokenSecretRef": {"name": "hf"}},
              podTemplate={"spec": {"env": [MIRROR], "imagePullSecrets": [{"name": "regcred"}]}})
    ref = cache_ref(md)
    job = render_fill_job(md, ref, CONFIG)
    assert job["metadata"]["name"] == ref.job
    assert job["metadata"]["ownerReferences"][0]["controller"] is True
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    # The worker selects its pods by modelfleet.dev/model: a fill pod must never look like a replica.
    assert labels.MODEL not in spec["template"]["metadata"]["labels"]
    assert pod["restartPolicy"] == "Never" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    (c,) = pod["containers"]
    assert c["image"] == "modelfleet:test"  # the worker image, whatever the engine
    assert c["command"] == ["modelfleet", "fetch", "hf://org/chat@v1", f"/cache/{ref.directory}"]
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_ENDPOINT"]["value"] == MIRROR["value"]
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["HF_HOME"]["value"].startswith("/tmp")
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": ref.claim}} in pod["volumes"]
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["fsGroup"] == 65532
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


SCHEDULING = ("nodeSelector", "tolerations", "affinity", "runtimeClassName", "priorityClassName", "imagePullSecrets")


def test_the_fill_pod_is_scheduled_as_the_replicas_are() -> None:
    """A ReadWriteOnce claim binds where the fill runs, and some clusters let the workload use
    only some nodes: the fill takes the replicas' scheduling, spec's and spec.podTemplate's."""
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    pool = {"key": "pool", "operator": "Equal", "value": "models", "effect": "NoSchedule"}
    zone = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}}
    md = make(nodeSelector={"pool": "models"}, tolerations=[gpu],
              podTemplate={"spec": {"nodeSelector": {"pool": "ignored", "disk": "ssd"}, "tolerations": [pool],
                                    "affinity": zone, "runtimeClassName": "gvisor",
                                    "priorityClassName": "inference", "imagePullSecrets": [{"name": "regcred"}]}})
    fill = render_fill_job(md, cache_ref(md), CONFIG)["spec"]["template"]["spec"]
    assert {key: fill[key] for key in SCHEDULING} == {
        "nodeSelector": {"pool": "models", "disk": "ssd"},  # spec.nodeSelector wins on a shared key
        "tolerations": [gpu, pool],
        "affinity": zone,
        "runtimeClassName": "gvisor",
        "priorityClassName": "inference",
        "imagePullSecrets": [{"name": "regcred"}],
    }
    replica = render_deployment(serving_model(md, cache_ref(md)), 1, CONFIG)["spec"]["template"]["spec"]
    assert {key: replica[key] for key in SCHEDULING} == {key: fill[key] for key in SCHEDULING}


def test_the_fill_pod_takes_only_the_node_affinity() -> None:
    """Replicas kept together (or apart) by pod affinity: a fill pod, running before any replica
    and labelled otherwise, could never meet those terms and would never run."""
    zone = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}
    together = {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"modelfleet.dev/model": "chat"}}, "topologyKey": "kubernetes.io/hostname"}]}
    md = make(podTemplate={"spec": {"affinity": {"nodeAffinity": zone, "podAffinity": together}}})
    assert render_fill_job(md, cache_ref(md), CONFIG)["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": zone}
    only_pods = make(podTemplate={"spec": {"affinity": {"podAntiAffinity": together}}})
    assert "affinity" not in render_fill_job(only_pods, cache_ref(only_pods), CONFIG)["spec"]["template"]["spec"]


def test_a_fill_pod_without_scheduling_fields_has_none() -> None:
    fill = render_fill_job(make(), cache_ref(make()), CONFIG)["spec"]["template"]["spec"]
    assert not set(SCHEDULING) & set(fill)


def test_file_sources_are_mounted_into_the_fill_pod_from_the_node_with_host_path_models() -> None:
    md = make(source="file:///models/tiny")
    job = render_fill_job(md, cache_ref(md), OperatorConfig(host_path_models=True))
    pod = job["spec"]["template"]["spec"]
    assert {"name": "source", "hostPath": {"path": "/models/tiny", "type": "Directory"}} in pod["volumes"]
    assert {"name": "source", "mountPath": "/models/tiny", "readOnly": True} in pod["containers"][0]["volumeMounts"]


@pytest.mark.parametrize("engine", ["modelfleet", "vllm"])
def test_both_engines_load_the_cached_directory_read_only(engine: str) -> None:
    md = make(engine={"kind": engine})
    ref = cache_ref(md)
    dep = render_deployment(serving_model(md, ref), 1, CONFIG)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    path = f"{CONFIG.pvc_mount_root}/{ref.claim}/{ref.directory}"
    args = c["args"] if engine == "vllm" else c["command"]
    assert args[args.index("--model") + 1] == path
    assert "hf://" not in " ".join(args)  # nothing left to download
    assert {"name": "model", "persistentVolumeClaim": {"claimName": ref.claim, "readOnly": True}} in pod["volumes"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True and path.startswith(mount["mountPath"])
    assert not any(v.get("emptyDir") is not None and v["name"] == "cache" for v in pod["volumes"])


# --- progress lines --------------------------------------------------------------------------


def test_progress_lines_round_trip() -> None:
    for p in (Progress(0, 100), Progress(50, 200), Progress(7, None), Progress(200, 200)):
        assert parse_progress("noise\n" + p.line() + "\n") == p
    assert Progress(99, 100).percent == 99 and Progress(100, 100).percent == 100
    assert Progress(150, 100).percent == 100 and Progress(0, 0).percent is None
    log = f"{Progress(1, 10).line()}\n{Progress(5, 10).line()}\nsome library warning\n"
    assert parse_progress(log) == Progress(5, 10)  # the last one
    assert parse_progress("") is None and parse_progress(None) is None


def test_fetch_copies_a_directory_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"x" * 1000)
    out = io.StringIO()
    done = fetch(f"file://{src}", tmp_path / "dest" / "m", out=out, interval=0.01)
    assert done == Progress(1002, 1002)
    assert parse_progress(out.getvalue()) == done and (tmp_path / "dest" / "m" / MARKER).is_file()
    (src / "model.safetensors").write_bytes(b"y")  # a second run does not copy again
    again = io.StringIO()
    assert fetch(f"file://{src}", tmp_path / "dest" / "m", out=again) == done
    assert "already fetched" in again.getvalue()
    assert (tmp_path / "dest" / "m" / "model.safetensors").read_bytes() == b"x" * 1000


def hub_error(name: str) -> Exception:
    """One of huggingface_hub's errors, made without the HTTP response its constructor wants."""
    import huggingface_hub.errors

    cls = getattr(huggingface_hub.errors, name)
    return cls.__new__(cls)


def wrapped(cause: Exception | None) -> ModelSourceError:
    """The error `fetch` raises for `cause`, as download_hf raises it."""
    try:
        raise ModelSourceError("could not download") from cause
    except ModelSourceError as exc:
        return exc


@pytest.mark.parametrize(("error", "final"), [
    (wrapped(hub_error("RepositoryNotFoundError")), True),
    (wrapped(hub_error("GatedRepoError")), True),  # a RepositoryNotFoundError: no access without a token
    (wrapped(hub_error("RevisionNotFoundError")), True),
    (wrapped(hub_error("RemoteEntryNotFoundError")), True),
    (wrapped(hub_error("LocalEntryNotFoundError")), False),  # the hub out of reach: worth a retry
    (wrapped(ConnectionError("reset")), False),
    (wrapped(None), True),  # our own: no such directory, a pvc:// source
    (OSError("No space left on device"), False),
])
def test_only_a_source_no_retry_can_fetch_is_unfetchable(error: Exception, final: bool) -> None:
    assert unfetchable(error) is final


def test_the_fill_job_stops_retrying_on_the_exit_status_modelfleet_fetch_gives_an_unfetchable_source(
        tmp_path: Path) -> None:
    md = make(model={"source": "hf://org/chat@v1", "cache": {"size": "2Gi"}})
    job = render_fill_job(md, cache_ref(md), CONFIG)
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["containerName"] == container["name"]
    fetched = subprocess.run([sys.executable, "-m", "modelfleet.cli", "fetch", f"file://{tmp_path}/none", str(tmp_path / "d")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert fetched.returncode in rule["onExitCodes"]["values"], fetched
    assert fetched.stderr.strip() == f"modelfleet fetch: error: file://{tmp_path}/none: no such directory"


# --- status ----------------------------------------------------------------------------------


def base_status(md: ModelDeployment) -> ModelDeploymentStatus:
    deployment = {"metadata": {"generation": 1}, "spec": {"replicas": 0},
                  "status": {"observedGeneration": 1, "replicas": 0}}
    return compute_status(md, 1, deployment, [], [], "sel", NOW)


def test_while_filling_the_model_is_pending_with_progress() -> None:
    md = make()
    state = CacheState(cache_ref(md), progress=Progress(512 * 1024, 2 * 1024 * 1024))
    status = with_cache(base_status(md), state, md.status, NOW, 1)
    ready, cache = status.condition("Ready"), status.condition(CACHE_READY)
    assert status.phase == "Pending"
    assert ready.status == "False" and ready.reason == FILLING and "512.0 KiB of 2.0 MiB (25%)" in ready.message
    assert cache.status == "False" and cache.reason == FILLING
    assert status.condition("Progressing").status == "True" and status.condition("Degraded").status == "False"
    assert status.cache.bytes == 512 * 1024 and status.cache.total_bytes == 2 * 1024 * 1024
    assert status.cache.percent == 25 and status.cache.claim_name == cache_ref(md).claim


def test_a_failed_fill_says_why_and_how_to_retry() -> None:
    md = make()
    state = CacheState(cache_ref(md), error="cannot fetch hf://org/chat@v1: RepositoryNotFoundError: 404",
                       job_failed=True)
    status = with_cache(base_status(md), state, md.status, NOW, 1)
    ready = status.condition("Ready")
    assert status.phase == "Failed" and ready.reason == FILL_FAILED
    assert "RepositoryNotFoundError: 404" in ready.message and cache_ref(md).job in ready.message
    assert status.condition("Degraded").status == "True"


def test_once_filled_the_replicas_speak_for_themselves() -> None:
    md = make()
    before = base_status(md)
    status = with_cache(before, CacheState(cache_ref(md), ready=True, progress=Progress(10, 10)), md.status, NOW, 1)
    assert status.condition("Ready") == before.condition("Ready") and status.phase == before.phase
    cache = status.condition(CACHE_READY)
    assert cache.status == "True" and cache.reason == FILLED and status.cache.percent == 100


def test_a_name_conflict_outranks_the_cache() -> None:
    md = make()
    deployment = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}
    conflicted = compute_status(md, 1, deployment, [], [], "sel", NOW, conflict="the model name chat is taken")
    status = with_cache(conflicted, CacheState(cache_ref(md)), md.status, NOW, 1)
    assert status.condition("Ready").reason == "NameConflict"
    assert status.condition(CACHE_READY).reason == FILLING


def test_the_fill_error_is_the_pods_last_error_line() -> None:
    pod = {"metadata": {"creationTimestamp": "2025-01-01T00:00:01Z"}, "status": {"phase": "Failed",
           "containerStatuses": [{"state": {"terminated": {"exitCode": 1, "message":
                "modelfleet fetch: 10/20 bytes (50%)\nmodelfleet fetch: error: cannot fetch hf://a/b: OSError: "
                "No space left on device\n"}}}]}}
    assert fill_error({}, [pod]) == "modelfleet fetch: error: cannot fetch hf://a/b: OSError: No space left on device"
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                      "message": "Job has reached the specified backoff limit"}]}}
    assert fill_error(job, []) == "Job has reached the specified backoff limit"


# --- against an in-memory namespace ----------------------------------------------------------


def stored(kube: FakeKube, kind: tuple[str, str], name: str) -> dict[str, Any]:
    """An object of the test namespace as the fake API server holds it."""
    return kube.objects[(*kind, "ns", name)]


def fill_pod(kube: FakeKube, ref: Any, phase: str, log: str = "", **status: Any) -> None:
    """The fill Job's one pod, in `phase`, with `log` as its output so far."""
    job = stored(kube, JOB, ref.job)
    job["metadata"]["uid"] = "job-uid"
    kube.pods = [{"metadata": {"name": f"{ref.job}-x", "creationTimestamp": NOW,
                               "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
                               "ownerReferences": [{"uid": "job-uid"}]},
                  "status": {"phase": phase, **status}}]
    kube.logs[f"{ref.job}-x"] = log


def test_the_first_user_makes_the_claim_and_starts_the_fill() -> None:
    kube, md = FakeKube(), make()
    ref = cache_ref(md)
    state = sync_cache(md, kube, CONFIG, NOW)
    assert state is not None and not state.ready and state.waiting == "starting the fill Job"
    assert (*PVC, "ns", ref.claim) in kube.objects and (*JOB, "ns", ref.job) in kube.objects
    fill_pod(kube, ref, "Running", log="modelfleet fetch: 0/400 bytes (0%)\nmodelfleet fetch: 100/400 bytes (25%)\n")
    kube.calls.clear()
    state = sync_cache(md, kube, CONFIG, NOW)
    assert state.progress == Progress(100, 400) and not state.ready
    assert kube.calls == [("get", "PersistentVolumeClaim"), ("get", "Job"), ("list", "Pod"), ("get", "pods/log")]


def test_a_finished_fill_is_recorded_on_the_claim_and_its_job_deleted_with_its_pods() -> None:
    kube, md = FakeKube(), make()
    ref = cache_ref(md)
    sync_cache(md, kube, CONFIG, NOW)
    stored(kube, JOB, ref.job)["status"] = {"succeeded": 1,
                                               "conditions": [{"type": "Complete", "status": "True"}]}
    fill_pod(kube, ref, "Succeeded", log="modelfleet fetch: 400/400 bytes (100%); done\n")
    state = sync_cache(md, kube, CONFIG, NOW)
    assert state.ready and state.progress == Progress(400, 400)
    record = json.loads(stored(kube, PVC, ref.claim)["metadata"]["annotations"][ref.filled_key])
    assert record == {"bytes": 400, "time": NOW}
    assert ("Job", ref.job, "Background") in kube.deleted
    kube.calls.clear()
    assert sync_cache(make("late", "uid-late"), kube, CONFIG, NOW).ready  # a later user: no fill at all
    assert ("patch", "Job") not in kube.calls  # no Job applied


def test_a_second_user_joins_as_an_owner_and_keep_strips_every_owner() -> None:
    kube = FakeKube()
    ref = cache_ref(make())
    sync_cache(make("a", "u1"), kube, CONFIG, NOW)
    sync_cache(make("b", "u2"), kube, CONFIG, NOW)
    claim = stored(kube, PVC, ref.claim)
    assert [r["uid"] for r in claim["metadata"]["ownerReferences"]] == ["u1", "u2"]
    kube.calls.clear()
    sync_cache(make("b", "u2"), kube, CONFIG, NOW)  # already an owner: no patch
    assert ("patch", "PersistentVolumeClaim") not in kube.calls
    sync_cache(make("c", "u3", cache={"size": "2Gi", "keep": True}), kube, CONFIG, NOW)
    assert "ownerReferences" not in claim["metadata"] and claim["metadata"]["labels"][labels.CACHE_KEEP] == "true"
    sync_cache(make("d", "u4"), kube, CONFIG, NOW)  # a kept claim gets no new owner
    assert "ownerReferences" not in claim["metadata"]


def test_a_changed_source_lets_go_of_the_old_claim() -> None:
    kube = FakeKube()
    a, b = make("a", "u1"), make("b", "u2")
    old = cache_ref(a)
    sync_cache(a, kube, CONFIG, NOW)
    sync_cache(b, kube, CONFIG, NOW)
    moved = make("b", "u2", source="hf://org/chat@v2").model_copy(
        update={"status": ModelDeploymentStatus.model_validate({"cache": {"claimName": old.claim}})})
    sync_cache(moved, kube, CONFIG, NOW)
    assert [r["uid"] for r in stored(kube, PVC, old.claim)["metadata"]["ownerReferences"]] == \
        ["u1"]
    assert (*JOB, "ns", old.job) in kube.objects  # the fill goes on for the user still waiting on it
    gone = a.model_copy(update={"spec": a.spec.model_copy(update={"model": a.spec.model.model_copy(
        update={"cache": None})}), "status": ModelDeploymentStatus.model_validate({"cache": {"claimName": old.claim}})})
    assert sync_cache(gone, kube, CONFIG, NOW) is None
    assert (*PVC, "ns", old.claim) not in kube.objects  # its last owner let go
    assert (*JOB, "ns", old.job) not in kube.objects  # and its fill with it


def test_a_missing_existing_claim_is_reported() -> None:
    kube, md = FakeKube(), make(cache={"claimName": "weights"})
    state = sync_cache(md, kube, CONFIG, NOW)
    assert state.error is not None and "weights" in state.error and not state.job_failed
    assert kube.objects == {}  # the operator never makes a user's claim


def test_reconcile_starts_no_replica_until_the_cache_is_filled() -> None:
    kube = FakeKube()
    md = make(replicas=2)
    ref = cache_ref(md)
    kube.md = {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment",
               "metadata": {"name": "chat", "namespace": "ns", "uid": "uid-chat", "generation": 1},
               "spec": md.spec.to_wire()}
    now = datetime(2025, 1, 1, 12, tzinfo=UTC)
    out = reconcile(kube.md, kube, CONFIG, lambda pods: 0, now)
    assert stored(kube, DEPLOYMENT, "chat")["spec"]["replicas"] == 0
    assert out.status.condition("Ready").reason == FILLING and out.status.desired_replicas == 2
    assert out.status.condition(CACHE_READY).status == "False"
    stored(kube, JOB, ref.job)["status"] = {"succeeded": 1}
    fill_pod(kube, ref, "Succeeded", log="modelfleet fetch: 9/9 bytes (100%); done\n")
    out = reconcile(kube.md, kube, CONFIG, lambda pods: 0, now)
    deployment = stored(kube, DEPLOYMENT, "chat")
    assert deployment["spec"]["replicas"] == 2
    assert out.status.condition(CACHE_READY).status == "True" and out.status.cache.bytes == 9
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": ref.claim, "readOnly": True}} in volumes
    assert DEPLOYMENT[1] == "Deployment" and PVC[1] == "PersistentVolumeClaim" and JOB[0] == "batch/v1"


def test_a_claim_the_api_server_refuses_is_an_invalid_spec_in_status() -> None:
    kube = FakeKube()
    kube.reject["PersistentVolumeClaim"] = ApiError(422, "spec.storageClassName: Invalid value")
    md = make(cache={"size": "1Gi", "storageClassName": "Not_A_Name"})
    kube.md = {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment",
               "metadata": {"name": "chat", "namespace": "ns", "uid": "uid-chat", "generation": 1},
               "spec": md.spec.to_wire()}
    with pytest.raises(InvalidSpec, match="storageClassName: Invalid value"):
        reconcile(kube.md, kube, CONFIG, lambda pods: 0, datetime(2025, 1, 1, 12, tzinfo=UTC))
    assert kube.status_patches[-1]["conditions"][0]["reason"] == "InvalidSpec"
