"""Helpers for the operator's end-to-end tests: what only tests need (describe, conditions,
endpoints, the gateway as a process, pod signals) beside the cluster helpers of
modelfleet.devcluster, re-exported here so that tests import everything from this one module.
Nothing here is a pytest fixture; `vllm_image()` skips the test that calls it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from localkube.images import project_image

from modelfleet.demo import VLLM_DEMO_KV_BYTES, ensure_demo_model
from modelfleet.devcluster import (  # noqa: F401 - re-exported for the tests
    CRD,
    NS_PREFIX,
    PEERING,
    REPO,
    OperatorProcess,
    create_namespace,
    delete_model_deployments,
    delete_namespace,
    get,
    install_crds,
    kubectl,
    model_deployment,
    stop_group,
    wait_for,
)
from modelfleet.engines import KV_CACHE_BYTES_FLAG, find_vllm_python
from modelfleet.netutil import free_port  # noqa: F401 - re-exported for the tests

WORKER_IMAGE = project_image("worker")  # what `make images` tags (images/README.md)
VLLM_CPU_IMAGE = project_image("vllm-cpu")
# What a worker of the e2e tests asks for: up to four at once on two CPUs, and room for torch
# under the real node's memory limit (the agent enforces none).
WORKER_RESOURCES = {"cpu": "100m", "memory": "2Gi"}


def _node() -> dict:
    return json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"][0]


def _is_real(node: dict) -> bool:
    return node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


def real_node() -> bool:
    """Whether the cluster's node is a real kubelet (containerd), not the agent."""
    return _is_real(_node())


def vllm_image() -> str | None:
    """The image this cluster's vLLM pods must run: the project's vLLM CPU image on the real node,
    which must already hold it (`localkube load-images vllm-cpu`); None on the agent, which runs
    any vLLM image from the `make vllm` environment. Skips the calling test when this node cannot
    run vLLM, and fails it instead under MODELFLEET_REQUIRE_VLLM=1 (`make test`)."""
    node = _node()
    if not _is_real(node):
        if find_vllm_python() is None:
            _vllm_missing("vLLM is not installed (make vllm)")
        return None
    held = {name for image in node["status"].get("images") or [] for name in image.get("names") or []}
    if VLLM_CPU_IMAGE not in held:
        _vllm_missing(f"the node does not hold {VLLM_CPU_IMAGE} (make images && make node-load-images NODE_IMAGES=vllm-cpu)")
    return VLLM_CPU_IMAGE


def vllm_resources(image: str | None) -> dict[str, str]:
    """What a vLLM pod running `image` (vllm_image()) asks for: on the real node (the machine's
    2 CPUs, shared with other tests) up to five at once, cpu a share and no limit, memory a limit
    (a chat pod's RSS peaked at 2.7 GiB with the 1 GiB KV cache it had before vllm_engine sized
    it); on the agent, whose node counts 8 CPUs and 32Gi and enforces nothing, vLLM's own sizes."""
    return {"cpu": "200m", "memory": "3Gi"} if image else {"cpu": "1", "memory": "4Gi"}


def vllm_engine(max_model_len: int, max_num_seqs: int, image: str | None = None) -> dict:
    """`spec.engine` of an e2e vLLM ModelDeployment of the vLLM demo model (or MiniLM, which keeps
    no KV): its KV cache sized as the demo model needs, not as the operator's default, and no
    cold-start compile, since several vLLM pods share 2 cores and 24 GiB here, with tests of the
    other tiers beside them; and `image` (vllm_image()) when one is named."""
    return {"kind": "vllm", "maxModelLen": max_model_len, "maxNumSeqs": max_num_seqs,
            "args": ["--enforce-eager", f"{KV_CACHE_BYTES_FLAG}={VLLM_DEMO_KV_BYTES}"], "startupTimeoutSeconds": 900,
            **({"image": image} if image else {})}


def _vllm_missing(reason: str) -> None:
    if os.environ.get("MODELFLEET_REQUIRE_VLLM"):
        raise RuntimeError(f"MODELFLEET_REQUIRE_VLLM is set but {reason}")
    pytest.skip(reason)


def worker_args() -> list[str]:
    """The operator's flags for workers that run on this cluster's node. The agent runs any image
    named modelfleet... as the project's Python with the host's files; the real node runs the
    worker image `make images` built (`localkube load-images`), which sees a file:// model only
    through a hostPath (--host-path-models), as uid 65532 (see readable_copies)."""
    return ["--default-image", WORKER_IMAGE, "--host-path-models"] if real_node() else []


@contextmanager
def readable_copies(sources: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Each model folder copied where the worker's user can read it. A worker container runs as
    uid 65532 (enforced on the real node) and sees a hostPath at the path it has on this machine:
    ensure_demo_model()'s cache and minilm_path() lie under /root, which stays closed (0700).
    Not under /tmp either: that is the worker's own emptyDir, which the agent mounts over a
    hostPath there."""
    root = Path(tempfile.mkdtemp(prefix="modelfleet-e2e-models-", dir="/var/tmp"))
    root.chmod(0o755)  # mkdtemp's 0700 would close it, and the operator mounts a file:// adapter by its folder
    out = {}
    try:
        for name, source in sources.items():
            copy = out[name] = Path(shutil.copytree(source, root / name))
            for path in (copy, *copy.rglob("*")):
                path.chmod(0o755 if path.is_dir() else 0o644)
        yield out
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def demo_model_source() -> Iterator[str]:
    """The `file://` source of a readable copy of the demo model (readable_copies), as the
    e2e tier's ModelDeployments of the modelfleet engine name it."""
    with readable_copies({"tiny-chat": ensure_demo_model()}) as copies:
        yield f"file://{copies['tiny-chat']}"


@contextmanager
def operator_namespace(logs: Path, *extra: str, name: str = "", workers: bool = True) -> Iterator[tuple[str, OperatorProcess]]:
    """A fresh namespace (`NS_PREFIX` + `name` + a random suffix) with the ModelDeployment CRD
    and the operator as a host process watching only it, logging to `logs`/operator.log, with
    worker_args() unless `workers` is false, and `extra` flags. Afterwards the ModelDeployments
    are deleted while the operator still runs (their pods go with them), then the operator and
    the namespace. What a module starts beside it (a gateway, a mirror) it stops inside the block."""
    install_crds()
    ns = f"{NS_PREFIX}{name}{uuid.uuid4().hex[:6]}"
    create_namespace(ns)
    op = OperatorProcess([ns], logs / "operator.log", *(worker_args() if workers else ()), *extra)
    try:
        op.start()
        yield ns, op
    finally:
        delete_model_deployments(ns)
        op.stop()
        delete_namespace(ns)
        print(f"logs: {logs}")


def items(kind: str, namespace: str, selector: str = "") -> list[dict]:
    args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
    return json.loads(kubectl(*args).stdout)["items"]


def apply(*objects: dict, namespace: str, server_side: bool = False) -> None:
    doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
    extra = ["--server-side", "--field-manager", "e2e"] if server_side else []
    kubectl("apply", "-n", namespace, *extra, "-f", "-", input=doc)


def describe(namespace: str, op: OperatorProcess | None = None) -> str:
    """What a failing test prints: the ModelDeployments, their children, events, operator log."""
    parts = []
    for args in (("get", "md,deploy,rs,pods,svc,pdb,endpointslices", "-o", "wide"),
                 ("describe", "md"),
                 ("get", "events", "--sort-by=.lastTimestamp")):
        proc = kubectl(*args, "-n", namespace, check=False)
        parts.append(f"$ kubectl {' '.join(args)} -n {namespace}\n{(proc.stdout + proc.stderr).strip()[-6000:]}")
    if op is not None:
        parts.append(f"operator log ({op.log_path}), last lines:\n{op.tail()}")
    return "\n\n".join(parts)


def condition(md: dict | None, type_: str) -> dict:
    for c in ((md or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def ready_endpoints(namespace: str, service: str) -> list[str]:
    """Addresses of ready endpoints in the Service's EndpointSlices (what the gateway routes to)."""
    out = []
    for s in items("endpointslices", namespace, f"kubernetes.io/service-name={service}"):
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready"):
                out.extend(ep.get("addresses") or [])
    return sorted(out)


def chat(address: str, model: str, port: int = 8000, timeout: float = 30) -> dict:
    """One chat completion straight to a worker pod (pods are reachable by IP from the host)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    req = urllib.request.Request(f"http://{address}:{port}/v1/chat/completions", data=body.encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class GatewayProcess:
    """`modelfleet gateway --discovery kubernetes` on the host, watching `namespace`, logging
    to a file. Its URL is 127.0.0.1 only."""

    def __init__(self, namespace: str, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.namespace = namespace
        self.log_path = log_path
        self.extra = list(extra)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> GatewayProcess:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "modelfleet", "gateway", "--discovery", "kubernetes",
                "--namespace", self.namespace, "--port", str(port), *self.extra]
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**os.environ, **self.env})
        wait_for(self._ready, 60, what="the gateway's /ready", explain=self.tail)
        return self

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"the gateway exited ({self.proc and self.proc.returncode}):\n{self.tail()}")
        try:
            with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metric(self, name: str, **match: str) -> float:
        """The sum of `name`'s samples whose labels include `match` (0 if none)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in match.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 15) -> None:
        stop_group(self.proc, signal.SIGINT, timeout)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no gateway log)"
        return "\n".join(text.splitlines()[-lines:])


def pod_pids(pod: dict) -> list[int]:
    """The host pids of a pod's processes (its containers', not the sandbox's pause): on the real
    node, the processes in the pod's cgroup (the kubelet's cgroupfs driver names it
    `pod<uid>`); on the agent, which runs each pod as processes in a network namespace named
    after its uid (tests/cluster/localkube/network.py), the processes in that namespace."""
    uid = pod["metadata"]["uid"]
    return _cgroup_pids(f"/pod{uid}/") or _netns_pids(uid[:18])


def _cgroup_pids(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cgroup").read_text() \
                    and (proc / "comm").read_text().strip() != "pause":
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return sorted(pids)


def _netns_pids(uid_prefix: str) -> list[int]:
    names = [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                        check=True).stdout.splitlines() if line.strip()]
    netns = [n for n in names if n.endswith(uid_prefix)]
    if not netns:
        return []
    out = subprocess.run(["ip", "netns", "pids", netns[0]], capture_output=True, text=True, check=True).stdout
    return [int(p) for p in out.split()]


def signal_pod(pod: dict, sig: int) -> list[int]:
    """Send `sig` to every process of the pod (its worker and anything it started); the pids."""
    pids = pod_pids(pod)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids
