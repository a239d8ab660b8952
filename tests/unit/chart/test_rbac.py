"""What the chart and the operator let modelfleet's pods do, compared with what the code does.

RBAC: each ServiceAccount's grants, as rendered by `helm template`, must equal a table derived
from the code's Kubernetes calls (one row per resource, naming the call sites): a verb the chart
grants that no call uses fails, as does a call the chart does not allow.

Pods: the operator and gateway pods (chart) and the worker pods (operator/render.py) run as
their image's non-root user on a read-only root filesystem, with emptyDirs where they write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelfleet.api import ModelDeployment
from modelfleet.operator.config import OperatorConfig
from modelfleet.operator.render import render_deployment

REPO = Path(__file__).resolve().parents[3]
RELEASE_NS = "mf-system"
OPERATOR_SA = "mf-modelfleet-operator"
GATEWAY_SA = "mf-modelfleet-gateway"
CLUSTER = "*"  # the scope of a ClusterRoleBinding


@dataclass(frozen=True)
class Need:
    """Verbs one component's code uses on one resource, and where they are granted:
    "watched" (each watched namespace, or cluster-wide when it watches all), "cluster",
    "release" (the release namespace) or "keys" (the API-key namespace)."""

    sa: str
    scope: str
    group: str
    resource: str
    verbs: frozenset[str]
    mode: str = "any"  # "any", "all-namespaces" or "restricted": when the code makes the call


def need(sa: str, scope: str, group: str, resource: str, verbs: str, mode: str = "any") -> Need:
    return Need(sa, scope, group, resource, frozenset(verbs.split()), mode)


OP, GW = OPERATOR_SA, GATEWAY_SA
NEEDS = [
    # operator/handlers.py register(): kopf.on.create/update/resume and kopf.index on
    # ModelDeployments -> kopf lists and watches them; operator/main.py kopf_settings() keeps
    # progress and diff-base in annotations -> kopf patches (merge and JSON patch).
    # operator/reconcile.py (make_runner: kube.get(MODEL_DEPLOYMENT, ...)) reads it fresh.
    need(OP, "watched", "modelfleet.dev", "modeldeployments", "get list watch patch"),
    # operator/reconcile.py kube.patch_status() -> operator/kube.py Kube.patch_status: a merge
    # patch on the status subresource (kopf's patch_obj also patches /status, never reads it).
    need(OP, "watched", "modelfleet.dev", "modeldeployments/status", "patch"),
    # operator/reconcile.py kube.apply(render_deployment(...)) -> Kube.apply: server-side apply
    # (patch; the API server also asks for create when the apply creates the object);
    # kube.get(DEPLOYMENT, ...) for autoscaling; handlers.py kopf.on.event("apps", "v1",
    # "deployments") -> list and watch.
    need(OP, "watched", "apps", "deployments", "get list watch create patch"),
    # operator/reconcile.py kube.apply(render_service(...)): server-side apply only.
    need(OP, "watched", "", "services", "create patch"),
    # operator/reconcile.py kube.apply(pdb) and kube.delete(PDB, ...) below two replicas.
    need(OP, "watched", "policy", "poddisruptionbudgets", "create patch delete"),
    # operator/cache.py sync_cache (the weight cache): kube.get(PVC), kube.apply(render_claim)
    # (server-side apply: create and patch), kube.patch(PVC) (join as an owner, keep, record the
    # fill), release(): kube.delete(PVC) when it was the last owner.
    need(OP, "watched", "", "persistentvolumeclaims", "get create patch delete"),
    # operator/cache.py: kube.get(JOB), kube.apply(render_fill_job), kube.delete(JOB) once filled
    # or released; handlers.py kopf.on.event("batch", "v1", "jobs") -> list and watch.
    need(OP, "watched", "batch", "jobs", "get list watch create patch delete"),
    # operator/cache.py _progress -> operator/kube.py Kube.pod_log: read_namespaced_pod_log.
    need(OP, "watched", "", "pods/log", "get"),
    # operator/reconcile.py kube.list(POD, ns, label_selector=...) (status and autoscaling).
    need(OP, "watched", "", "pods", "list"),
    # operator/reconcile.py kube.list(EVENT, ns, field_selector=...) (pods' warnings);
    # operator/kube.py Kube._post_or_fold: create, then on 409 get and patch (count bump);
    # kopf's own posting (settings.posting, level WARNING) creates Events.
    need(OP, "watched", "", "events", "get list create patch"),
    # kopf peering (kopf.operator(peering_name=...)): list, watch and patch (keep-alive) of the
    # peering object; operator/resync.py Peering.allows: kube.get of the same object.
    need(OP, "watched", "kopf.dev", "kopfpeerings", "get list watch patch", mode="restricted"),
    need(OP, "cluster", "kopf.dev", "clusterkopfpeerings", "get list watch patch", mode="all-namespaces"),
    # kopf's resource_observer: lists and watches CRDs to notice resources that appear or go.
    need(OP, "cluster", "apiextensions.k8s.io", "customresourcedefinitions", "list watch"),
    # kopf's namespace_observer: lists and watches namespaces only when not cluster-wide.
    need(OP, "cluster", "", "namespaces", "list watch", mode="restricted"),
    # gateway/discovery.py KubernetesDiscovery.start: Informer over CustomObjectsApi
    # list_{cluster,namespaced}_custom_object (list, then watch); on_demand ->
    # gateway/kube.py patch_annotation: patch_namespaced_custom_object (merge patch).
    need(GW, "watched", "modelfleet.dev", "modeldeployments", "list watch patch"),
    # gateway/discovery.py: Informer over DiscoveryV1Api list_{namespaced_,}endpoint_slice...
    need(GW, "watched", "discovery.k8s.io", "endpointslices", "list watch"),
    # gateway/cluster_sources.py peers: Informer over list_namespaced_endpoint_slice of its own
    # Service (--gateway-service) in its own namespace.
    need(GW, "release", "discovery.k8s.io", "endpointslices", "list watch"),
    # gateway/cluster_sources.py key Secrets: Informer over CoreV1Api.list_namespaced_secret in
    # --key-namespace (label modelfleet.dev/api-key=true).
    need(GW, "keys", "", "secrets", "list watch"),
    # gateway/responses_store.py KubernetesStore -> gateway/kube.py create_secret, read_secret,
    # delete_secret, list_secret_metadata: one Secret per stored response in its own namespace
    # (on unless gateway.responses.ttlSeconds is 0).
    need(GW, "release", "", "secrets", "create get list delete"),
]

Grant = tuple[str, str, str, str, str]  # (service account, scope, group, resource, verb)


def expected(watch: list[str], key_ns: str, operator: bool = True) -> set[Grant]:
    mode = "restricted" if watch else "all-namespaces"
    out: set[Grant] = set()
    for n in NEEDS:
        if n.mode not in ("any", mode) or (n.sa == OP and not operator):
            continue
        scopes = {"watched": watch or [CLUSTER], "cluster": [CLUSTER], "release": [RELEASE_NS], "keys": [key_ns]}
        out |= {(n.sa, scope, n.group, n.resource, verb) for scope in scopes[n.scope] for verb in n.verbs}
    return out


def granted(objects: list[dict]) -> set[Grant]:
    """Every (service account, scope, group, resource, verb) the rendered bindings give."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects
             if o["kind"] in ("Role", "ClusterRole")}
    out: set[Grant] = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = binding["roleRef"]
        scope = binding["metadata"]["namespace"] if binding["kind"] == "RoleBinding" else CLUSTER
        role = roles[(ref["kind"], None if ref["kind"] == "ClusterRole" else scope, ref["name"])]
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == RELEASE_NS, subject
            for rule in role["rules"]:
                assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
                out |= {(subject["name"], scope, g, r, v)
                        for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


VARIANTS = {
    "all-namespaces": ({}, [], RELEASE_NS),
    "restricted": ({"operator.watchNamespaces": ["team-a", "team-b"]}, ["team-a", "team-b"], RELEASE_NS),
    "restricted-incl-release": ({"operator.watchNamespaces": ["team-a", RELEASE_NS]}, ["team-a", RELEASE_NS],
                                RELEASE_NS),
    "key-namespace": ({"apiKeys.namespace": "keys"}, [], "keys"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rbac_grants_exactly_what_the_code_calls(render, variant: str) -> None:
    values, watch, key_ns = VARIANTS[variant]
    objects = render(values)
    actual, wanted = granted(objects), expected(watch, key_ns)
    extra = sorted(actual - wanted)
    missing = sorted(wanted - actual)
    assert not extra, f"the chart grants what no call uses (remove, or add the call site to NEEDS): {extra}"
    assert not missing, f"the code calls what the chart does not grant: {missing}"


def test_without_the_operator_only_the_gateway_is_granted(render) -> None:
    objects = render({"operator.enabled": False})
    assert granted(objects) == expected([], RELEASE_NS, operator=False)
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"} == {GATEWAY_SA}


def test_only_the_two_components_have_service_accounts(render) -> None:
    accounts = {o["metadata"]["name"] for o in render() if o["kind"] == "ServiceAccount"}
    assert accounts == {OPERATOR_SA, GATEWAY_SA}


def test_the_table_names_only_resources_the_code_mentions() -> None:
    """A guard on the table itself: every resource in NEEDS appears in the code that calls it
    (or is kopf's own), so a row cannot outlive the call it stands for."""
    kopf_own = {"kopfpeerings", "clusterkopfpeerings", "customresourcedefinitions", "namespaces"}
    code = "\n".join(p.read_text() for d in ("operator", "gateway") for p in (REPO / d).glob("*.py"))
    code += (REPO / "modelfleet" / "api.py").read_text()
    words = {"modeldeployments": "PLURAL", "modeldeployments/status": 'subresources["status"]',
             "deployments": "deployments", "services": "Service", "poddisruptionbudgets": "PodDisruptionBudget",
             "pods": '"Pod"', "events": '"Event"', "endpointslices": "endpoint_slice", "secrets": "_secret",
             "persistentvolumeclaims": '"PersistentVolumeClaim"', "jobs": '"jobs"', "pods/log": "read_namespaced_pod_log"}
    for n in NEEDS:
        if n.resource not in kopf_own:
            assert words[n.resource] in code, n.resource


# --- pods: non-root, read-only root filesystem, no privilege escalation ------------------------

def dockerfile_user(name: str) -> int:
    text = (REPO / "images" / name).read_text()
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", text, re.M)
    assert users, f"images/{name} has no numeric USER"
    return int(users[-1][0])


def dockerfile_env(name: str, var: str) -> str:
    found = re.search(rf"\b{var}=(\S+)", (REPO / "images" / name).read_text())
    assert found, f"images/{name} sets no {var}"
    return found.group(1)


def assert_locked_down(pod: dict[str, Any], container: dict[str, Any], uid: int) -> None:
    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not container["securityContext"].get("privileged")
    assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    # Writable places are emptyDirs; everything else mounted is read-only.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    for path, m in mounts.items():
        assert m.get("readOnly") or "emptyDir" in volumes[m["name"]], path


def test_chart_pods_run_as_the_image_user_read_only(render) -> None:
    uid = dockerfile_user("control-plane.Dockerfile")
    for values in ({}, {"apiKeys.existingSecret": "more-keys"}):
        deployments = [o for o in render(values) if o["kind"] == "Deployment"]
        assert {d["metadata"]["name"] for d in deployments} == {OPERATOR_SA, GATEWAY_SA}
        for dep in deployments:
            pod = dep["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            assert_locked_down(pod, container, uid)
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


def test_chart_security_defaults_are_in_values_and_schema() -> None:
    import json

    import yaml

    values = yaml.safe_load((REPO / "charts" / "modelfleet" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    assert values["podSecurityContext"]["runAsUser"] == dockerfile_user("control-plane.Dockerfile")
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert values["securityContext"]["allowPrivilegeEscalation"] is False
    schema = json.loads((REPO / "charts" / "modelfleet" / "values.schema.json").read_text())
    assert {"podSecurityContext", "securityContext"} <= set(schema["properties"])


def worker(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    md = ModelDeployment.from_body({
        "apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "team-a", "uid": "u", "generation": 1},
        "spec": spec,
    })
    pod = render_deployment(md, 1, OperatorConfig())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.mark.parametrize("source", ["file:///models/tiny", "pvc://models/tiny", "hf://org/tiny@main"])
def test_worker_pods_run_as_the_image_user_read_only(source: str) -> None:
    pod, container = worker({"model": {"source": source}})
    assert_locked_down(pod, container, dockerfile_user("worker.Dockerfile"))
    assert pod["automountServiceAccountToken"] is False  # workers never call the API server
    if source.startswith("hf://"):
        # Downloads go to HF_HOME, the image's own value, on an emptyDir.
        home = {e["name"]: e.get("value") for e in container["env"]}["HF_HOME"]
        assert home == dockerfile_env("worker.Dockerfile", "HF_HOME")
        volumes = {v["name"]: v for v in pod["volumes"]}
        (cache,) = [m for m in container["volumeMounts"] if m["mountPath"] == home]
        assert "emptyDir" in volumes[cache["name"]]


def test_vllm_pods_keep_the_official_images_root_user_but_cannot_escalate() -> None:
    """vllm/vllm-openai runs as root (its image has no other user): the operator forbids
    privilege escalation and adds no runAsNonRoot, which would stop the pod from starting."""
    pod, container = worker({"model": {"source": "hf://org/tiny"}, "engine": {"kind": "vllm"}})
    assert container["image"].startswith("vllm/vllm-openai:")
    assert container["securityContext"] == {"allowPrivilegeEscalation": False}
    assert "securityContext" not in pod
