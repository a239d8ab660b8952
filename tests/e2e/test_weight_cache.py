"""The weight cache on the local cluster (issue 19, part 1): a ModelDeployment with
`spec.model.cache` fills a claim once through a Job, from a model hub the test serves itself,
slowly enough to watch; its replicas then mount the claim read-only and start without fetching.

The hub is a small aiohttp app on the node's bridge address (10.244.0.1 on the shared cluster,
the pod network's first address on any: pods reach the host there) that answers
the endpoints huggingface_hub's snapshot_download uses (revision info, the file tree, HEAD and
GET of each file) for the generated demo model, trickles the weights out, and counts every
GET per file: the counters staying put is the proof that a second replica, a scale from zero
and a second ModelDeployment of the same source do not fetch again. Pods find it through
HF_ENDPOINT in spec.podTemplate.spec.env, which the fill Job gets too.

One namespace, one operator and one mirror for the module; the tests run in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))  # operator_harness, beside this file

from localkube.config import Network  # noqa: E402  (tests/cluster, on the path from conftest)
from operator_harness import (  # noqa: E402
    WORKER_RESOURCES,
    OperatorProcess,
    apply,
    condition,
    describe,
    get,
    items,
    kubectl,
    model_deployment,
    operator_namespace,
    wait_for,
)

from modelfleet import labels  # noqa: E402
from modelfleet.demo import ensure_demo_model  # noqa: E402
from modelfleet.netutil import free_port  # noqa: E402

pytestmark = pytest.mark.e2e

NODE_ADDRESS = str(Network().gateway)  # the bridge: pods reach the host here (tests/cluster/README.md)
REPO_ID = "modelfleet/tiny-chat"
SOURCE = f"hf://{REPO_ID}@main"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 64 * 1024
CHUNK_DELAY = 0.6  # the 1.4 MB demo weights take ~13 s: several progress lines and reconciles
FILL_TIMEOUT = 120
LOAD_TIMEOUT = 180  # a worker imports torch and loads the model on a shared 2-core box
GC_TIMEOUT = 90


@dataclass
class Mirror:
    """A Hugging Face hub for one repository, served from a directory, counting downloads."""

    root: Path
    downloads: Counter[str] = field(default_factory=Counter)
    url: str = ""

    def __post_init__(self) -> None:
        self.files = {p.name: p.read_bytes() for p in sorted(self.root.iterdir()) if p.is_file()}
        self.oids = {name: hashlib.sha1(data).hexdigest() for name, data in self.files.items()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.downloads)

    async def _revision(self, request: web.Request) -> web.Response:
        if f"{request.match_info['org']}/{request.match_info['name']}" != REPO_ID:
            return web.json_response({"error": "Repository not found"}, status=404,
                                     headers={"X-Error-Code": "RepoNotFound"})
        return web.json_response({"id": REPO_ID, "modelId": REPO_ID, "sha": COMMIT, "private": False,
                                  "siblings": [{"rfilename": name} for name in self.files]})

    async def _tree(self, request: web.Request) -> web.Response:
        return web.json_response([{"type": "file", "path": name, "size": len(data), "oid": self.oids[name]}
                                  for name, data in self.files.items()])

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"]
        if name not in self.files:
            return web.json_response({"error": "Entry not found"}, status=404, headers={"X-Error-Code": "EntryNotFound"})
        data = self.files[name]
        start = 0
        if request.headers.get("Range", "").startswith("bytes="):
            start = int(request.headers["Range"][6:].split("-")[0] or 0)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self.oids[name]}"', "Accept-Ranges": "bytes"}
        resp = web.StreamResponse(status=206 if start else 200, headers=headers)
        resp.content_length = len(data) - start
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        with self._lock:
            self.downloads[name] += 1
        for offset in range(start, len(data), CHUNK):
            await resp.write(data[offset:offset + CHUNK])
            if name.endswith(".safetensors"):
                await asyncio.sleep(CHUNK_DELAY)
        await resp.write_eof()
        return resp

    def start(self, host: str) -> Mirror:
        """Serve on host:<free port> from a thread of its own until stop()."""
        port = free_port()
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._revision)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev:.*}", self._tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.*}", self._resolve)
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, host, port).start())
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=serve, name="hub-mirror", daemon=True).start()
        assert ready.wait(10), "the mirror did not start"
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass
class Env:
    namespace: str
    op: OperatorProcess
    mirror: Mirror
    seen: dict = field(default_factory=dict)  # what one test leaves for the next

    def explain(self) -> str:
        return describe(self.namespace, self.op) + f"\n\nmirror downloads: {self.mirror.counts()}" + \
            "\n\n" + kubectl("get", "pvc,jobs", "-n", self.namespace, "-o", "wide", check=False).stdout

    def wait(self, fn, timeout: float, what: str):
        return wait_for(fn, timeout, what, explain=self.explain)

    def md(self, name: str) -> dict | None:
        return get("md", name, self.namespace)

    def manifest(self, name: str, replicas: int) -> dict:
        return model_deployment(name, SOURCE, replicas=replicas, resources=WORKER_RESOURCES,
                                model={"source": SOURCE, "servedName": name, "cache": {"size": "1Gi"}},
                                podTemplate={"spec": {"env": [{"name": "HF_ENDPOINT", "value": self.mirror.url}]}})

    def ready_pods(self, name: str) -> list[dict]:
        pods = items("pods", self.namespace, f"{labels.MODEL}={name}")
        return [p for p in pods if not p["metadata"].get("deletionTimestamp") and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in p["status"].get("conditions") or [])]

    def scale(self, name: str, replicas: int) -> None:
        kubectl("scale", "md", name, f"--replicas={replicas}", "-n", self.namespace)

    def wait_ready(self, name: str, replicas: int) -> None:
        def done() -> bool:
            md = self.md(name) or {}
            return len(self.ready_pods(name)) == replicas and (md.get("status") or {}).get("readyReplicas") == replicas
        self.wait(done, LOAD_TIMEOUT, f"{replicas} ready replica(s) of {name}")


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[Env]:  # noqa: ARG001 - cluster sets KUBECONFIG
    with operator_namespace(tmp_path_factory.mktemp("weight-cache"), name="cache-") as (ns, op):
        mirror = Mirror(ensure_demo_model()).start(NODE_ADDRESS)
        try:
            yield Env(ns, op, mirror)
        finally:
            mirror.stop()


def test_the_first_replica_fills_the_cache_once_with_progress_in_status(env: Env) -> None:
    apply(env.manifest("first", replicas=1), namespace=env.namespace)

    def filling() -> dict | None:
        md = env.md("first") or {}
        cache, ready = (md.get("status") or {}).get("cache") or {}, condition(md, "Ready")
        busy = condition(md, "CacheReady").get("reason") == "CacheFilling" and ready.get("reason") == "CacheFilling"
        return cache if busy and 0 < (cache.get("bytes") or 0) < (cache.get("totalBytes") or 0) else None

    progress = env.wait(filling, FILL_TIMEOUT, "status.cache to show a fill under way (0 < bytes < totalBytes)")
    assert 0 <= progress["percent"] < 100
    md = env.md("first")
    assert md["status"]["phase"] == "Pending" and "filling the weight cache" in condition(md, "Ready")["message"]
    # No replica runs while the cache fills: the Deployment waits at zero.
    assert get("deployment", "first", env.namespace)["spec"]["replicas"] == 0

    env.wait(lambda: condition(env.md("first"), "CacheReady").get("status") == "True", FILL_TIMEOUT,
             "CacheReady=True")
    env.wait_ready("first", 1)
    md = env.md("first")
    cache = md["status"]["cache"]
    assert cache["percent"] == 100 and cache["bytes"] > 0
    assert env.mirror.counts() == {name: 1 for name in env.mirror.files}, "every file fetched exactly once"
    # The replica loads the cached directory from the claim, read-only; the fill Job is gone.
    (pod,) = env.ready_pods("first")
    command = pod["spec"]["containers"][0]["command"]
    assert command[command.index("--model") + 1] == f"/mnt/models/{cache['claimName']}/{cache['path']}"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": cache["claimName"], "readOnly": True}
    env.wait(lambda: not items("jobs", env.namespace, labels.CACHE), 60, "the finished fill Job to be deleted")
    env.seen["claim"] = cache["claimName"]


def test_a_second_replica_and_a_scale_from_zero_do_not_fetch_again(env: Env) -> None:
    before = env.mirror.counts()
    env.scale("first", 2)
    env.wait_ready("first", 2)
    env.scale("first", 0)
    env.wait(lambda: not items("pods", env.namespace, f"{labels.MODEL}=first"), 120, "no pods of first")
    env.scale("first", 1)
    env.wait_ready("first", 1)
    assert env.mirror.counts() == before
    assert not items("jobs", env.namespace, labels.CACHE), "no new fill Job"


def test_two_model_deployments_of_one_source_share_one_claim(env: Env) -> None:
    before = env.mirror.counts()
    apply(env.manifest("second", replicas=0), namespace=env.namespace)
    second = env.wait(lambda: (md := env.md("second")) and condition(md, "CacheReady").get("status") == "True"
                      and md, 60, "CacheReady=True on second")
    assert second["status"]["cache"]["claimName"] == env.seen["claim"]
    claims = items("pvc", env.namespace, labels.CACHE)
    assert [c["metadata"]["name"] for c in claims] == [env.seen["claim"]]
    owners = {r["name"] for r in claims[0]["metadata"].get("ownerReferences") or []}
    assert owners == {"first", "second"}
    assert env.mirror.counts() == before


def test_deleting_the_last_user_deletes_the_cache(env: Env) -> None:
    claim = env.seen["claim"]
    kubectl("delete", "md", "first", "-n", env.namespace, "--wait=true", "--timeout=60s")

    def only_second_owns_it() -> bool:
        pvc = get("pvc", claim, env.namespace)
        assert pvc is not None and not pvc["metadata"].get("deletionTimestamp"), "deleted with a user left"
        return {r["name"] for r in pvc["metadata"].get("ownerReferences") or []} == {"second"}

    env.wait(only_second_owns_it, GC_TIMEOUT, "the garbage collector to drop first's owner reference")
    kubectl("delete", "md", "second", "-n", env.namespace, "--wait=true", "--timeout=60s")
    env.wait(lambda: get("pvc", claim, env.namespace) is None, GC_TIMEOUT, f"the claim {claim} to be deleted")


def test_a_fill_that_fails_shows_the_fetch_error(env: Env) -> None:
    missing = model_deployment("missing", "hf://modelfleet/missing@main", replicas=1,
                               model={"source": "hf://modelfleet/missing@main", "cache": {"size": "1Gi"}},
                               podTemplate={"spec": {"env": [{"name": "HF_ENDPOINT", "value": env.mirror.url}]}})
    apply(missing, namespace=env.namespace)

    def failed() -> dict | None:
        md = env.md("missing") or {}
        return md if condition(md, "CacheReady").get("reason") == "CacheFillFailed" else None

    md = env.wait(failed, FILL_TIMEOUT + 60, "CacheReady=False with reason CacheFillFailed")
    ready = condition(md, "Ready")
    assert md["status"]["phase"] == "Failed" and ready["reason"] == "CacheFillFailed"
    assert "RepositoryNotFoundError" in ready["message"] and "Repository Not Found" in ready["message"], ready
    assert condition(md, "Degraded")["status"] == "True"
    assert get("deployment", "missing", env.namespace)["spec"]["replicas"] == 0
    # No retry can find a repository the hub does not have: `modelfleet fetch` says so by its exit
    # status, and the Job's podFailurePolicy fails it on its first pod (no retries, no back-off).
    (job,) = [j for j in items("jobs", env.namespace) if j["metadata"]["ownerReferences"][0]["name"] == "missing"]
    assert [c["reason"] for c in job["status"]["conditions"] if c["type"] == "Failed"] == ["PodFailurePolicy"], job
    assert job["status"].get("failed") == 1, job["status"]
