"""LoRA adapters on the local cluster, with the real operator and gateway as processes on the
host: a ModelDeployment of the demo model with one random adapter answers on the adapter's
name with output different from the base's; adding a second adapter to the running object
takes effect without restarting its pod; removing one makes its name a 404 model_not_found.
The same on vLLM's server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modelfleet.demo import VLLM_DEMO_SPEC, cache_dir, ensure_demo_model, make_demo_adapter
from modelfleet.devcluster import wait_for

from .operator_harness import WORKER_RESOURCES, readable_copies, vllm_engine, vllm_image, vllm_resources
from .test_gateway_k8s import Stack, running_stack

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def make_adapters(base: Path) -> dict[str, Path]:
    """Two random adapters of a demo model, where pods see them (not under /tmp: the worker pod
    mounts its own emptyDir there); made once per base model and kept in the cache."""
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        target = cache_dir() / "e2e-adapters" / base.name / f"seed-{seed}"
        if not (target / "adapter_model.safetensors").exists():
            make_demo_adapter(base, target, rank=8, seed=seed)
        out[name] = target
    return out


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory) -> Iterator[Stack]:
    with running_stack(cluster, tmp_path_factory.mktemp("lora-e2e"), name="lora-") as s:
        yield s


def model_deployment(name: str, base: Path, adapters: dict[str, Path], **spec) -> dict:
    return {
        "apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
        "spec": {"model": {"source": f"file://{base}", "servedName": f"{name}-base"},
                 "adapters": [{"name": n, "source": f"file://{p}"} for n, p in adapters.items()],
                 "resources": {"cpu": "500m", "memory": "1Gi"}, "replicas": 1, **spec},
    }


def complete(stack: Stack, model: str) -> httpx.Response:
    """Greedy, so that the same model always says the same and two models differ only by weights."""
    return httpx.post(stack.url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0})


def text(stack: Stack, model: str) -> str:
    r = complete(stack, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def adapter_status(stack: Stack, name: str) -> dict[str, int]:
    md = stack.cluster.get("modeldeployment", name, stack.namespace) or {}
    return {a["name"]: a.get("readyReplicas", 0) for a in (md.get("status") or {}).get("adapters") or []}


def pods(stack: Stack, name: str) -> dict[str, tuple[str, int, str]]:
    """uid -> (name, restart count, IP) of the worker pods."""
    out = stack.cluster.kubectl("get", "pods", "-n", stack.namespace, "-l", f"modelfleet.dev/model={name}",
                                "-o", "json").stdout
    return {p["metadata"]["uid"]: (p["metadata"]["name"],
                                   sum(c.get("restartCount", 0) for c in p["status"].get("containerStatuses") or []),
                                   p["status"].get("podIP", ""))
            for p in json.loads(out)["items"]}


def listed(stack: Stack) -> dict[str, dict]:
    return {c["id"]: c for c in httpx.get(stack.url + "/v1/models", timeout=10).json()["data"]}


def routable(stack: Stack, model: str) -> bool:
    return complete(stack, model).status_code == 200


def adapters_patch(adapters: dict[str, Path]) -> str:
    return json.dumps({"spec": {"adapters": [{"name": n, "source": f"file://{p}"} for n, p in adapters.items()]}})


def exercise(stack: Stack, md: dict, adapters: dict[str, Path], ready_timeout: float) -> None:
    """One adapter at start, a second added to the running object, then the first removed."""
    name = md["metadata"]["name"]
    served = md["spec"]["model"]["servedName"]
    first, second = f"{name}-sql", f"{name}-poet"
    stack.cluster.apply(md, namespace=stack.namespace)
    wait_for(lambda: adapter_status(stack, name).get(first) == 1, ready_timeout, what=f"{first} loaded on the replica")
    card = wait_for(lambda: listed(stack).get(first), 30, what=f"{first} listed by the gateway")
    assert card["parent"] == served
    wait_for(lambda: routable(stack, first), 30, what=f"{first} routable")
    base = text(stack, served)
    assert text(stack, first) != base
    before = pods(stack, name)
    assert len(before) == 1

    # A second adapter on the running object: loaded through the engine's API, no new pod.
    stack.cluster.kubectl("patch", "md", name, "-n", stack.namespace, "--type", "merge", "-p",
                          adapters_patch({first: adapters["a"], second: adapters["b"]}))
    wait_for(lambda: adapter_status(stack, name).get(second) == 1, 60, what=f"{second} loaded")
    wait_for(lambda: routable(stack, second), 30, what=f"{second} routable")
    poet = text(stack, second)
    assert poet != base and poet != text(stack, first)
    assert listed(stack)[second]["parent"] == served
    assert pods(stack, name) == before  # same pod (uid), same restart count

    # Removing one: its name is gone from the gateway at once, and the pod unloads it.
    stack.cluster.kubectl("patch", "md", name, "-n", stack.namespace, "--type", "merge", "-p",
                          adapters_patch({second: adapters["b"]}))
    wait_for(lambda: complete(stack, first).status_code == 404, 30, what=f"{first} refused by the gateway")
    assert complete(stack, first).json()["error"]["code"] == "model_not_found"
    assert first not in listed(stack)
    ((_, _, ip),) = before.values()
    wait_for(lambda: first not in {c["id"] for c in httpx.get(f"http://{ip}:8000/v1/models", timeout=5).json()["data"]},
             60, what=f"{first} unloaded from the pod")
    assert text(stack, second) == poet
    assert pods(stack, name) == before


def test_adapters_serve_under_their_names_and_come_and_go_without_a_restart(stack: Stack) -> None:
    """On both node kinds: the model and adapters as copies uid 65532 can read (readable_copies),
    hostPaths on the real node (worker_args' --host-path-models)."""
    base = ensure_demo_model()
    with readable_copies({"base": base, **make_adapters(base)}) as copies:
        adapters = {"a": copies["a"], "b": copies["b"]}
        md = model_deployment("lora", copies["base"], {"lora-sql": adapters["a"]}, resources=WORKER_RESOURCES)
        exercise(stack, md, adapters, 240)


def test_the_same_on_vllm(stack: Stack) -> None:
    """vLLM's own dynamic LoRA loading (--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING), driven by
    the same operator code: on the real node from the project's vLLM CPU image (as uid 65532, the
    model and adapters as hostPaths of readable copies), on the agent from `make vllm`. vLLM
    starts in a minute or two here."""
    image = vllm_image()
    base = ensure_demo_model(VLLM_DEMO_SPEC)
    engine = vllm_engine(max_model_len=512, max_num_seqs=4, image=image)
    with readable_copies({"base": base, **make_adapters(base)}) as copies:
        adapters = {"a": copies["a"], "b": copies["b"]}
        md = model_deployment("vlora", copies["base"], {"vlora-sql": adapters["a"]}, engine=engine,
                              resources=vllm_resources(image))
        exercise(stack, md, adapters, 900)
