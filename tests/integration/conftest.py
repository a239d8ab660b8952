"""A real `modelfleet serve` (gateway + one worker per model) on loopback, shared by the tier."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from modelfleet.demo import (
    VLLM_DEMO_KV_BYTES,
    VLLM_DEMO_SPEC,
    ensure_demo_model,
    make_demo_adapter,
    minilm_path,
)
from modelfleet.devcluster import stop_group, wait_for
from modelfleet.engines import (
    LORA_RUNTIME_ENV,
    VLLM_SERVER_MODULE,
    VllmServer,
    find_vllm_python,
    vllm_env,
    vllm_tracing,
)
from modelfleet.netutil import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/otlp_receiver.py
from otlp_receiver import OtlpReceiver, otlp_receiver  # noqa: E402

CHAT = "tiny-chat"
EMBED = "all-MiniLM-L6-v2"
# The keys of the shared vLLM server (vllm_serve).
VLLM_KEYS = """
keys:
  - name: open
    key: sk-open-0123456789
  - name: metered
    key: sk-metered-0123456789
    tpm: 1000000
"""


def worker_metric(url: str, name: str, having: str = "") -> float:
    """A labelled sample on `url`'s /metrics; the first whose line contains `having`."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") and having in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} with {having!r} on {url}")


def running(worker: str) -> float:
    return worker_metric(worker, "vllm:num_requests_running")


def send_request(url: str, body: dict) -> socket.socket:
    """POSTs `body` on a raw connection and returns it unread, for the caller to hang up on
    when it chooses (a client that stops waiting for a non-streamed answer)."""
    target = httpx.URL(url)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((target.host, target.port), timeout=60)
    sock.sendall(f"POST {target.raw_path.decode()} HTTP/1.1\r\nHost: {target.host}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def wait_ready(url: str, models: set[str], proc: subprocess.Popen, timeout: float = 180) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        r = httpx.get(url + "/ready", timeout=2)
        return r.status_code == 200 and models <= set(r.json().get("models", []))

    wait_for(ready, timeout, f"{url} to be ready with {sorted(models)}", interval=0.3)


def start(args: list[str], ready_models: set[str], log: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "modelfleet", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, ready_models, proc, timeout)
    except Exception:
        stop(proc)
        raise RuntimeError(f"{' '.join(cmd)} failed to start:\n{log.read_text()[-3000:]}") from None
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to a started command and its workers, SIGKILL if they have not gone in 30 s."""
    stop_group(proc, signal.SIGINT, timeout=30)


def tokens_charged(url: str, key: str) -> float:
    """The tokens the gateway at `url` has charged to `key`, from its metrics."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("modelfleet_gateway_tokens_total{") and f'key="{key}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="session")
def launch():
    """`launch(args, ready_models, log, timeout)`: a modelfleet command, once ready -> (process, url)."""
    return start


def require_vllm() -> None:
    """Skips the calling test (or module, called at its top) without vLLM's environment, or fails
    it under MODELFLEET_REQUIRE_VLLM (`make test` sets it after `make vllm`)."""
    if find_vllm_python() is None:
        if os.environ.get("MODELFLEET_REQUIRE_VLLM"):
            raise RuntimeError("MODELFLEET_REQUIRE_VLLM is set but vLLM is not installed: run `make vllm`")
        pytest.skip("vLLM is not installed (make vllm)", allow_module_level=True)


@pytest.fixture(scope="session")
def vllm_serve(tmp_path_factory):
    """`modelfleet serve --engine vllm` with the embedded default models (the demo chat model and
    MiniLM, each on a vLLM server of its own) behind the gateway, keys `open` and `metered`
    (VLLM_KEYS). vLLM takes one to two minutes to start here, so every module that needs these
    models on vLLM shares this one."""
    require_vllm()
    tmp = tmp_path_factory.mktemp("vllm")
    (tmp / "keys.yaml").write_text(VLLM_KEYS)
    proc, url = start(["serve", "--engine", "vllm", "--api-keys", str(tmp / "keys.yaml"), "--max-num-seqs", "16",
                       "--kv-cache-memory", str(VLLM_DEMO_KV_BYTES / 2**30)],
                      {CHAT, EMBED}, tmp / "serve.log", timeout=600)
    yield url
    stop(proc)


@dataclass(frozen=True)
class VllmDirect:
    """vLLM's own OpenAI server (no gateway) on the vLLM demo model, served as `tiny-chat`."""

    url: str
    base: Path  # the model
    adapters: dict[str, Path]  # `ada` loaded at start, `adb` for loading at runtime
    receiver: OtlpReceiver  # where it exports its traces


@pytest.fixture(scope="session")
def vllm_direct(tmp_path_factory):
    """vLLM's OpenAI server started as the operator renders a replica (VllmServer's command line,
    `vllm_env`, and what `vllm_tracing` gives for an OTLP endpoint), with LoRA on and its traces
    going to a loopback OTLP receiver. One server for test_lora_vllm and test_tracing_vllm: a
    start costs two to two and a half minutes here."""
    require_vllm()
    tmp = tmp_path_factory.mktemp("vllm-direct")
    base = ensure_demo_model(VLLM_DEMO_SPEC)
    adapters = {n: make_demo_adapter(base, tmp / n, rank=8, seed=s) for n, s in (("ada", 1), ("adb", 2))}
    with otlp_receiver() as receiver:
        endpoint, tracing_env = vllm_tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
        port = free_port()
        server = VllmServer(model=str(base), served_names=["tiny-chat"], host="127.0.0.1", port=port,
                            dtype="float32", max_model_len=512, max_num_seqs=8, task="generate",
                            otlp_traces_endpoint=endpoint, max_loras=4, max_lora_rank=16,
                            kv_cache_bytes=VLLM_DEMO_KV_BYTES, extra_args=["--lora-modules", f"ada={adapters['ada']}"])
        env = {**os.environ, **vllm_env(False, server_args=server.args()), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
               **tracing_env, **LORA_RUNTIME_ENV, "HF_HUB_OFFLINE": "1"}
        log = tmp / "vllm.log"
        # -P and a cwd of its own: never import from a checkout (its operator/ would shadow the stdlib's)
        proc = subprocess.Popen([find_vllm_python(), "-P", "-m", VLLM_SERVER_MODULE, *server.args()], env=env,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_for(healthy, 480, "vLLM to serve", interval=1)  # within pytest-timeout's 600 s
            yield VllmDirect(url, base, adapters, receiver)
        finally:
            stop_group(proc, signal.SIGTERM, timeout=60)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """`modelfleet serve` with its embedded default models."""
    ensure_demo_model()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, url = start(["serve", "--max-num-seqs", "16"], {CHAT, EMBED}, log)
    yield url
    stop(proc)


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="EMPTY", max_retries=0)


@pytest.fixture(scope="session")
def no_template_model(tmp_path_factory) -> Path:
    """The demo model with its chat template removed."""
    src = ensure_demo_model()
    dst = tmp_path_factory.mktemp("models") / "no-template"
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    import json

    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_path()
