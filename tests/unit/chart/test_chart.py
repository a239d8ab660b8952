"""charts/modelfleet without a cluster: what `helm template` renders for the values users set,
that bad values fail with the schema's message, that the CRD is the one in crds/, and that the
RBAC grants what the operator and gateway use and no more."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "modelfleet"

WORKER_LABELS = {"app.kubernetes.io/name": "modelfleet-worker", "app.kubernetes.io/component": "worker"}


def find(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def one(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


# --- structural validity: every field known to the Kubernetes API, with the right type -----------

MODELS = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Secret"): "V1Secret",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("networking.k8s.io/v1", "Ingress"): "V1Ingress",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
}
# Kinds from CRDs the python client has no model for: checked by hand below.
CUSTOM = {("kopf.dev/v1", "ClusterKopfPeering"), ("kopf.dev/v1", "KopfPeering"),
          ("gateway.networking.k8s.io/v1", "HTTPRoute"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
          ("monitoring.coreos.com/v1", "PodMonitor")}
SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float)}
QUANTITY_MAPS = {"V1ResourceRequirements"}  # resource quantities may be numbers in JSON


def check_shape(value: Any, type_name: str, path: str, owner: str = "") -> None:
    """Every key of `value` is a field of the client model `type_name`, recursively."""
    if type_name.startswith("List["):
        assert isinstance(value, list), f"{path}: expected a list, got {value!r}"
        for i, item in enumerate(value):
            check_shape(item, type_name[5:-1], f"{path}[{i}]", owner)
        return
    if type_name.startswith("Dict["):
        assert isinstance(value, dict), f"{path}: expected a mapping, got {value!r}"
        inner = type_name[5:-1].split(", ", 1)[1]
        for k, v in value.items():
            if owner in QUANTITY_MAPS and inner == "str" and isinstance(v, (int, float)):
                continue
            check_shape(v, inner, f"{path}.{k}", owner)
        return
    if type_name == "object":  # int-or-string and free-form fields
        return
    if type_name in SCALARS:
        assert isinstance(value, SCALARS[type_name]) and not (type_name == "int" and isinstance(value, bool)), (
            f"{path}: expected {type_name}, got {value!r}")
        return
    if type_name == "datetime":
        return
    model = getattr(k8s, type_name)
    assert isinstance(value, dict), f"{path}: expected an object ({type_name}), got {value!r}"
    fields = {json_name: model.openapi_types[py] for py, json_name in model.attribute_map.items()}
    for key, item in value.items():
        assert key in fields, f"{path}: unknown field {key!r} in {type_name}"
        check_shape(item, fields[key], f"{path}.{key}", type_name)


def check_object(obj: dict) -> None:
    meta = obj.get("metadata") or {}
    where = f"{obj.get('kind')}/{meta.get('name')}"
    assert obj.get("apiVersion") and obj.get("kind") and meta.get("name"), f"{where}: apiVersion, kind, name"
    assert len(meta["name"]) <= 63 or obj["kind"] in {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM:
        return
    assert key in MODELS, f"{where}: unexpected kind {key}"
    check_shape(obj, MODELS[key], where)


def check_labels(obj: dict) -> None:
    labels = obj["metadata"].get("labels") or {}
    for name in ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                 "app.kubernetes.io/managed-by", "app.kubernetes.io/version"):
        assert name in labels, f"{obj['kind']}/{obj['metadata']['name']}: label {name} missing"


VARIANTS: dict[str, dict[str, object]] = {
    "defaults": {},
    "namespaced": {"operator.watchNamespaces": ["team-a", "team-b"]},
    "exposed": {"ingress.enabled": True, "ingress.className": "nginx", "ingress.host": "llm.example.com",
                "ingress.tls.enabled": True, "ingress.tls.secretName": "llm-tls",
                "httpRoute.enabled": True, "httpRoute.parentRefs": [{"name": "public", "namespace": "gw"}],
                "httpRoute.hostnames": ["llm.example.com"], "gateway.service.type": "NodePort",
                "gateway.service.nodePort": 30080},
    "monitored": {"metrics.serviceMonitor.enabled": True, "metrics.podMonitor.enabled": True,
                  "metrics.serviceMonitor.labels": {"release": "prom"}},
    "keys": {"apiKeys.keys": [{"name": "alice", "key": "sk-alice", "models": ["tiny-chat"], "rpm": 60},
                              {"name": "bob", "keySha256": "AB" * 32, "tpm": 2_000_000}],
             "apiKeys.existingSecret": "more-keys", "imagePullSecrets": ["regcred"]},
    "minimal": {"operator.enabled": False, "gateway.replicas": 1, "dashboards.enabled": False,
                "operator.leaderElection.enabled": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_object_is_valid_and_labelled(render, variant: str) -> None:
    objects = render(VARIANTS[variant])
    assert objects
    for obj in objects:
        check_object(obj)
        check_labels(obj)
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects with the same kind, namespace and name"


def test_defaults(render) -> None:
    objects = render()
    gateway = one(objects, "Deployment", "mf-modelfleet-gateway")
    assert gateway["spec"]["replicas"] == 2
    c = container(gateway)
    assert c["image"] == "modelfleet/control-plane:0.1.0"
    assert c["args"][:2] == ["gateway", "--discovery=kubernetes"]
    assert "--gateway-service=mf-modelfleet-gateway" in c["args"]
    assert "--key-namespace=mf-system" in c["args"]
    assert not [a for a in c["args"] if a.startswith("--namespace")]  # every namespace
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["requests"]
    svc = one(objects, "Service", "mf-modelfleet-gateway")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"] == gateway["spec"]["selector"]

    operator = one(objects, "Deployment", "mf-modelfleet-operator")
    args = container(operator)["args"]
    assert args[0] == "operator" and "--all-namespaces" in args
    assert "--default-image=modelfleet/worker:0.1.0" in args
    assert "--peering=mf-modelfleet-mf-system" in args
    assert one(objects, "ClusterKopfPeering")["metadata"]["name"] == "mf-modelfleet-mf-system"
    assert container(operator)["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"] for p in container(operator)["ports"]} == {"healthz", "metrics"}
    # kopf names itself after the pod (its default, getpass.getuser(), fails for uid 65532).
    operator_env = {e["name"]: e for e in container(operator)["env"]}
    assert operator_env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The two Deployments' selectors must not overlap.
    assert gateway["spec"]["selector"] != operator["spec"]["selector"]

    for kind in ("Ingress", "HTTPRoute", "ServiceMonitor", "PodMonitor", "Secret"):
        assert not find(objects, kind), kind


def test_security_contexts(render) -> None:
    for dep in find(render(), "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        sc = container(dep)["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container(dep)["volumeMounts"]


def test_ingress_class_and_host(render) -> None:
    ing = one(render({"ingress.enabled": True, "ingress.className": "nginx", "ingress.host": "llm.example.com"}),
              "Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "llm.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "mf-modelfleet-gateway", "port": {"name": "http"}}
    # Empty host and class: any host, the cluster's default class.
    ing = one(render({"ingress.enabled": True}), "Ingress")
    assert "host" not in ing["spec"]["rules"][0] and "ingressClassName" not in ing["spec"]


def test_http_route(render) -> None:
    route = one(render({"httpRoute.enabled": True, "httpRoute.parentRefs": [{"name": "public"}],
                        "httpRoute.hostnames": ["a.example.com"]}), "HTTPRoute")
    assert route["spec"]["parentRefs"] == [{"name": "public"}]
    assert route["spec"]["hostnames"] == ["a.example.com"]
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "mf-modelfleet-gateway", "port": 80}]


def test_service_type_and_replicas(render) -> None:
    objects = render({"gateway.replicas": 1, "gateway.service.type": "NodePort", "gateway.service.nodePort": 30080})
    assert one(objects, "Deployment", "mf-modelfleet-gateway")["spec"]["replicas"] == 1
    svc = one(objects, "Service", "mf-modelfleet-gateway")
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["ports"][0]["nodePort"] == 30080
    assert not find(objects, "PodDisruptionBudget")  # one replica: a PDB would block node drains


def test_images_from_registry_and_tags(render) -> None:
    objects = render({"image.registry": "ghcr.io/acme/", "image.tag": "1.2.3", "image.worker.tag": "1.2.3-cuda"})
    assert container(one(objects, "Deployment", "mf-modelfleet-gateway"))["image"] == \
        "ghcr.io/acme/modelfleet/control-plane:1.2.3"
    assert "--default-image=ghcr.io/acme/modelfleet/worker:1.2.3-cuda" in \
        container(one(objects, "Deployment", "mf-modelfleet-operator"))["args"]


def test_watch_namespaces(render) -> None:
    objects = render({"operator.watchNamespaces": ["team-a", "team-b"]})
    # Cluster-wide, only what kopf reads even when restricted to namespaces: CRDs and namespaces.
    (observe,) = find(objects, "ClusterRole")
    assert {r for rule in observe["rules"] for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    assert all(rule["verbs"] == ["list", "watch"] for rule in observe["rules"])
    assert [b["roleRef"]["name"] for b in find(objects, "ClusterRoleBinding")] == [observe["metadata"]["name"]]
    assert not find(objects, "ClusterKopfPeering")
    args = container(one(objects, "Deployment", "mf-modelfleet-operator"))["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    assert "--peering=mf-modelfleet" in args
    gw_args = container(one(objects, "Deployment", "mf-modelfleet-gateway"))["args"]
    assert "--namespace=team-a" in gw_args and "--namespace=team-b" in gw_args
    for ns in ("team-a", "team-b"):
        one(objects, "KopfPeering", "mf-modelfleet", ns)
        one(objects, "Role", "mf-modelfleet-operator", ns)
        one(objects, "RoleBinding", "mf-modelfleet-operator", ns)
        one(objects, "Role", "mf-modelfleet-gateway-discovery", ns)


def test_api_keys_from_values(render) -> None:
    objects = render(VARIANTS["keys"])
    secrets = {s["metadata"]["name"]: s for s in find(objects, "Secret")}
    assert set(secrets) == {"mf-modelfleet-key-alice", "mf-modelfleet-key-bob"}
    alice, bob = secrets["mf-modelfleet-key-alice"], secrets["mf-modelfleet-key-bob"]
    for s in (alice, bob):
        assert s["metadata"]["labels"]["modelfleet.dev/api-key"] == "true"
        assert s["metadata"]["namespace"] == "mf-system"
    assert alice["stringData"] == {"name": "alice", "key": "sk-alice", "models": "tiny-chat", "rpm": "60"}
    assert bob["stringData"] == {"name": "bob", "key_sha256": "ab" * 32, "tpm": "2000000"}
    dep = one(objects, "Deployment", "mf-modelfleet-gateway")
    assert "--api-keys=/etc/modelfleet/api-keys/keys.yaml" in container(dep)["args"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "more-keys"
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_api_keys_the_gateway_parses(render) -> None:
    """The rendered Secrets go through the gateway's own parser (docs/keys.md)."""
    import base64

    from modelfleet.gateway.auth import keys_from_secrets

    secrets = find(render(VARIANTS["keys"]), "Secret")
    as_read = [{"metadata": s["metadata"],
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in s["stringData"].items()}}
               for s in secrets]
    keys = {k.name: k for k in keys_from_secrets(as_read)}
    assert set(keys) == {"alice", "bob"}
    assert keys["alice"].models == frozenset({"tiny-chat"}) and keys["alice"].rpm == 60
    # Helm reads numbers as floats; a large one must not reach the Secret as "2e+06"
    assert keys["bob"].models is None and keys["bob"].tpm == 2_000_000


def test_monitors(render) -> None:
    objects = render(VARIANTS["monitored"])
    monitors = {m["metadata"]["name"]: m for m in find(objects, "ServiceMonitor")}
    assert set(monitors) == {"mf-modelfleet-gateway", "mf-modelfleet-operator"}
    assert monitors["mf-modelfleet-gateway"]["metadata"]["labels"]["release"] == "prom"
    assert monitors["mf-modelfleet-operator"]["spec"]["endpoints"][0]["port"] == "metrics"
    one(objects, "Service", "mf-modelfleet-operator-metrics")
    pods = one(objects, "PodMonitor")
    assert pods["spec"]["selector"]["matchLabels"] == WORKER_LABELS
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    scoped = one(render({**VARIANTS["monitored"], "operator.watchNamespaces": ["a"]}), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["a"]}


def test_worker_labels_match_the_operator() -> None:
    from modelfleet import labels

    assert WORKER_LABELS == {labels.APP_NAME: labels.APP_NAME_WORKER, labels.APP_COMPONENT: labels.COMPONENT_WORKER}


DASHBOARD_METRICS = [
    "modelfleet_gateway_requests_total", "modelfleet_gateway_request_seconds", "modelfleet_gateway_first_byte_seconds",
    "modelfleet_gateway_tokens_total", "modelfleet_gateway_backend_inflight", "vllm:num_requests_waiting",
    "vllm:num_requests_running", "vllm:time_to_first_token_seconds", "vllm:generation_tokens_total",
]


def test_dashboard(render) -> None:
    cm = one(render(), "ConfigMap", "mf-modelfleet-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["modelfleet.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in DASHBOARD_METRICS:
        assert metric in exprs, metric
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in ("requests", "errors", "first token", "tokens per second", "replicas", "queue"):
        assert word in titles, word


# --- the schema --------------------------------------------------------------------------------

BAD_VALUES = [
    ({"gateway.replicas": "two"}, "at '/gateway/replicas': got string, want integer"),
    ({"gateway.replicas": 0}, "at '/gateway/replicas': minimum"),
    ({"gateway.service.type": "Public"}, "at '/gateway/service/type': value must be one of"),
    ({"ingress.host": "Not A Host"}, "at '/ingress/host'"),
    ({"ingress.enabled": "yes"}, "at '/ingress/enabled': got string, want boolean"),
    ({"operator.watchNamespaces": "team-a"}, "at '/operator/watchNamespaces': got string, want array"),
    ({"operator.watchNamespaces": ["team-*"]}, "at '/operator/watchNamespaces/0'"),
    ({"gatway": {"replicas": 3}}, "additional properties 'gatway' not allowed"),
    ({"apiKeys.keys": [{"name": "alice"}]}, "at '/apiKeys/keys/0': 'oneOf' failed"),
    ({"apiKeys.keys": [{"name": "a", "keySha256": "abc"}]}, "at '/apiKeys/keys/0/keySha256'"),
    ({"image.pullPolicy": "Sometimes"}, "at '/image/pullPolicy'"),
    ({"ingress.tls.enabled": True}, "at '/ingress/host'"),
    ({"httpRoute.enabled": True}, "at '/httpRoute/parentRefs'"),
]


def _set_args(values: dict[str, object]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


@pytest.mark.parametrize("values,message", BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_bad_values_fail_with_the_schema_message(helm, values: dict, message: str) -> None:
    proc = helm("template", "mf", str(CHART), *_set_args(values), check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_values_are_documented_and_valid() -> None:
    """Every leaf in values.yaml has a comment, and values.yaml itself passes the schema."""
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    lines = (CHART / "values.yaml").read_text().splitlines()

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def commented(i: int) -> bool:
        return i > 0 and lines[i - 1].strip().startswith("#")

    for i, line in enumerate(lines):
        if not line.strip() or line.strip().startswith("#") or line.rstrip().endswith(":"):
            continue  # comments and section headers
        # A leaf is documented by its own comment or by one on a block it is in (the leaves of
        # resources and security contexts are Kubernetes' own fields).
        chain, level = [i], indent(line)
        for j in range(i - 1, -1, -1):
            if lines[j].strip() and not lines[j].strip().startswith("#") and indent(lines[j]) < level:
                chain.append(j)
                level = indent(lines[j])
        assert any(commented(j) for j in chain), f"values.yaml:{i + 1} is not documented: {line.strip()}"


# --- CRDs: one source ---------------------------------------------------------------------------

def test_chart_crd_is_the_one_in_crds() -> None:
    chart_crd = CHART / "crds" / "modeldeployments.modelfleet.dev.yaml"
    assert chart_crd.read_bytes() == (REPO / "crds" / "modeldeployments.modelfleet.dev.yaml").read_bytes()


def test_packaged_chart_carries_the_crd(helm, tmp_path: Path) -> None:
    helm("package", str(CHART), "-d", str(tmp_path))
    (pkg,) = tmp_path.glob("modelfleet-*.tgz")
    with tarfile.open(pkg) as tar:
        packed = tar.extractfile("modelfleet/crds/modeldeployments.modelfleet.dev.yaml")
        assert packed is not None
        assert packed.read() == (REPO / "crds" / "modeldeployments.modelfleet.dev.yaml").read_bytes()


def test_kopf_peering_crds_match_the_operator() -> None:
    ours = [d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()) if d]
    theirs = [d for d in yaml.safe_load_all((REPO / "operator" / "peering.yaml").read_text())
              if d and d["kind"] == "CustomResourceDefinition"]
    assert ours == theirs


def test_install_renders_crds(render) -> None:
    names = {o["metadata"]["name"] for o in render(include_crds=True) if o["kind"] == "CustomResourceDefinition"}
    assert names == {"modeldeployments.modelfleet.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


# --- RBAC -------------------------------------------------------------------------------------

def grants(rules: list[dict], group: str, resource: str, verbs: set[str]) -> bool:
    return any(group in r.get("apiGroups", []) and resource in r.get("resources", []) and verbs <= set(r["verbs"])
               for r in rules)


def rules_of(objects: list[dict], subject: str, namespace: str | None) -> list[dict]:
    """Rules bound to ServiceAccount `subject` that apply in `namespace` (None: cluster-wide only)."""
    out: list[dict] = []
    for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == subject for s in binding["subjects"]):
            continue
        if binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] != namespace:
            continue
        ref = binding["roleRef"]
        role_ns = None if ref["kind"] == "ClusterRole" else binding["metadata"]["namespace"]
        out += one(objects, ref["kind"], ref["name"], role_ns)["rules"]
    return out


GATEWAY_NEEDS_WATCHED = [("modelfleet.dev", "modeldeployments", {"list", "watch", "patch"}),
                         ("discovery.k8s.io", "endpointslices", {"list", "watch"})]
GATEWAY_NEEDS_OWN = [("", "secrets", {"list", "watch"}),
                     ("discovery.k8s.io", "endpointslices", {"list", "watch"})]


def operator_needs() -> list[tuple[str, str, set[str]]]:
    """operator/rbac.yaml: the rules the operator's author wrote for it."""
    docs = [d for d in yaml.safe_load_all((REPO / "operator" / "rbac.yaml").read_text()) if d]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    return [(g, r, set(rule["verbs"])) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]]


# Only the cluster-wide peering is not needed by an operator restricted to namespaces.
CLUSTER_SCOPED = {"clusterkopfpeerings"}
# tests/unit/chart/test_rbac.py compares every grant with the code's calls, both ways.


@pytest.mark.parametrize("watch", [[], ["team-a", "mf-system"]], ids=["all-namespaces", "some-namespaces"])
def test_rbac_covers_what_the_components_use(render, watch: list[str]) -> None:
    objects = render({"operator.watchNamespaces": watch})
    watched = watch or [None]
    for ns in watched:
        op = rules_of(objects, "mf-modelfleet-operator", ns)
        for group, resource, verbs in operator_needs():
            if watch and resource in CLUSTER_SCOPED:
                continue
            assert grants(op, group, resource, verbs), (ns, resource, verbs)
        gw = rules_of(objects, "mf-modelfleet-gateway", ns)
        for group, resource, verbs in GATEWAY_NEEDS_WATCHED:
            assert grants(gw, group, resource, verbs), (ns, resource, verbs)
    own = rules_of(objects, "mf-modelfleet-gateway", "mf-system")
    for group, resource, verbs in GATEWAY_NEEDS_OWN:
        assert grants(own, group, resource, verbs), (resource, verbs)


def test_rbac_is_least_privilege(render) -> None:
    for watch in ([], ["team-a"]):
        objects = render({"operator.watchNamespaces": watch})
        for role in find(objects, "ClusterRole") + find(objects, "Role"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], role["metadata"]["name"]
                assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"]) \
                    or rule["resources"] in (["poddisruptionbudgets"], ["secrets"], ["persistentvolumeclaims"],
                                             ["jobs"]), rule
        # Secrets are readable only by the gateway, in the key namespace and (stored Responses)
        # its own, here the same one.
        for role in find(objects, "ClusterRole"):
            assert not any("secrets" in r["resources"] for r in role["rules"])
        secret_roles = [r for r in find(objects, "Role") if any("secrets" in x["resources"] for x in r["rules"])]
        assert [(r["metadata"]["name"], r["metadata"]["namespace"]) for r in secret_roles] == \
            [("mf-modelfleet-gateway", "mf-system")]


def test_key_namespace(render) -> None:
    objects = render({"apiKeys.namespace": "keys", "apiKeys.keys": [{"name": "a", "key": "k"}]})
    assert one(objects, "Secret")["metadata"]["namespace"] == "keys"
    assert "--key-namespace=keys" in container(one(objects, "Deployment", "mf-modelfleet-gateway"))["args"]
    assert grants(rules_of(objects, "mf-modelfleet-gateway", "keys"), "", "secrets", {"list", "watch"})
    # Its own namespace: only the stored Responses' verbs, never watch; none with storing off.
    own = rules_of(objects, "mf-modelfleet-gateway", "mf-system")
    assert grants(own, "", "secrets", {"create", "get", "list", "delete"}) and not grants(own, "", "secrets", {"watch"})
    off = render({"apiKeys.namespace": "keys", "gateway.responses.ttlSeconds": 0})
    assert not grants(rules_of(off, "mf-modelfleet-gateway", "mf-system"), "", "secrets", {"list"})
    assert "--responses-ttl=0" in container(one(off, "Deployment", "mf-modelfleet-gateway"))["args"]


# --- lint and NOTES ----------------------------------------------------------------------------

def test_helm_lint_is_clean(helm) -> None:
    for values in ({}, {"ingress.enabled": True, "metrics.serviceMonitor.enabled": True}):
        proc = helm("lint", "--strict", str(CHART), *_set_args(values))
        assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def notes(render, tmp_path: Path, values: dict[str, object]) -> str:
    """NOTES.txt as `helm install` prints it (helm template does not render NOTES, so a copy of
    the chart renders it into a ConfigMap)."""
    chart = tmp_path / "modelfleet"
    shutil.copytree(CHART, chart, symlinks=False)
    body = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{- define "test.notes" }}' + body + "{{ end }}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ include "test.notes" . | toJson }}}\n')
    return one(render(values, chart=chart), "ConfigMap", "notes")["data"]["notes"]


def test_notes_say_how_to_reach_the_api(render, tmp_path: Path) -> None:
    text = notes(render, tmp_path, {"ingress.enabled": True, "ingress.host": "llm.example.com"})
    assert "export MODELFLEET_URL=http://llm.example.com" in text
    assert "curl $MODELFLEET_URL/v1/chat/completions" in text
    assert "modelfleet.dev/api-key=true" in text
    text = notes(render, tmp_path / "b", {"operator.watchNamespaces": ["team-a"]})
    assert "kubectl port-forward -n mf-system svc/mf-modelfleet-gateway 8000:80" in text
    assert "namespaces team-a" in text and "kubectl apply -n team-a" in text
