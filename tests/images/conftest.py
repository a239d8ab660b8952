"""The images tier: the images that images/build.sh builds, run with podman as a user would.

The build runs once per session through the same script as `make images` (podman's layer cache
makes it a no-op when `make images` ran first). Containers run on the host network (see
images/podman/containers.conf) on loopback ports, read-only, with every capability dropped and
no privilege escalation, as the chart's securityContext asks; each is removed when its fixture
ends, failed or not. Waits are on state: the container running and its endpoint answering.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from modelfleet.demo import ensure_demo_model, minilm_path
from modelfleet.devcluster import wait_for
from modelfleet.netutil import free_port

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "images" / "build.sh"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "images" / "podman" / "containers.conf")}
CHAT = "tiny-chat"
EMBED = "all-MiniLM-L6-v2"
# What the chart's securityContext (values.yaml, operator/render.py) gives every container.
LOCKED_DOWN = ("--read-only", "--cap-drop=all", "--security-opt=no-new-privileges")


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], env=PODMAN_ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, str]:
    """name (the Dockerfile's stem) -> image reference, as built by images/build.sh."""
    if shutil.which("podman") is None and os.geteuid() != 0:
        pytest.skip("podman is not installed and only root may install it (run `make images` as root)")
    log = tmp_path_factory.mktemp("images") / "build.log"
    with log.open("w") as err:
        proc = subprocess.run(["bash", str(BUILD)], stdout=subprocess.PIPE, stderr=err, text=True, timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"images/build.sh exited {proc.returncode}:\n{log.read_text()[-5000:]}")
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.strip())


@dataclass(frozen=True)
class Container:
    name: str
    url: str

    def status(self) -> str:
        return podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-4000:]

    def exec(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *cmd, check=False)

    def wait_ready(self, models: set[str], timeout: float = 240) -> None:
        """Until /ready answers 200 listing `models`; fails at once, with the logs, if the
        container exits. Workers and the gateway both answer /ready so."""

        def ready() -> bool:
            status = self.status()
            if status != "running":
                raise AssertionError(f"container {self.name} is {status}:\n{self.logs()}")
            r = httpx.get(self.url + "/ready", timeout=2)
            return r.status_code == 200 and models <= set(r.json().get("models", []))

        wait_for(ready, timeout, f"{self.name} to be ready with {sorted(models)}", interval=0.3, explain=self.logs)


@contextmanager
def container(image: str, args: Sequence[str], port: int, *, options: Sequence[str] = ()) -> Iterator[Container]:
    """`podman run --detach` locked down like the chart's pods; removed on exit, whatever happened."""
    name = f"modelfleet-test-{uuid.uuid4().hex[:10]}"
    podman("run", "--detach", "--name", name, *LOCKED_DOWN, *options, image, *args)
    try:
        yield Container(name, f"http://127.0.0.1:{port}")
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def readable_copy(src: Path, dst: Path) -> Path:
    """A copy of a model directory that uid 65532 can read (the generated ones are private to
    their owner), as a volume's fsGroup or file modes make it for a pod."""
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


def worker_container(image: str, model: Path, served: str) -> AbstractContextManager[Container]:
    """`modelfleet worker` serving `model`, mounted read-only where a pod's volume would be."""
    port = free_port()
    args = ["worker", "--model", f"file:///models/{served}", "--served-name", served, "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--max-num-seqs", "8", "--kv-cache-memory", "0.25"]
    return container(image, args, port, options=["--volume", f"{model}:/models/{served}:ro"])


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {CHAT: readable_copy(ensure_demo_model(), root / CHAT), EMBED: readable_copy(minilm_path(), root / EMBED)}


@pytest.fixture(scope="session")
def chat_worker(images, models) -> Iterator[Container]:
    """The worker image serving the demo chat model from a read-only volume."""
    with worker_container(images["worker"], models[CHAT], CHAT) as c:
        c.wait_ready({CHAT})
        yield c


@pytest.fixture(scope="session")
def embed_worker(images, models) -> Iterator[Container]:
    """The worker image serving all-MiniLM-L6-v2 from a read-only volume."""
    with worker_container(images["worker"], models[EMBED], EMBED) as c:
        c.wait_ready({EMBED})
        yield c


@pytest.fixture(scope="session")
def gateway(images, chat_worker, embed_worker) -> Iterator[Container]:
    """The control-plane image's gateway in front of both worker containers (static discovery)."""
    port = free_port()
    args = ["gateway", "--discovery", "static", "--backend", f"{CHAT}={chat_worker.url}",
            "--backend", f"{EMBED}={embed_worker.url}", "--host", "127.0.0.1", "--port", str(port)]
    with container(images["control-plane"], args, port) as c:
        c.wait_ready({CHAT, EMBED})
        yield c
