"""Process-level behaviour: command-line errors, a model without a chat template, SIGTERM
drain, and several replicas behind one gateway."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from modelfleet.devcluster import wait_for
from modelfleet.netutil import free_port

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "modelfleet"]



def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def start_worker(model, name: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([*CLI, "worker", "--model", str(model), "--served-name", name, "--port", str(port),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stdout.read()
        return httpx.get(url + "/ready", timeout=1).status_code == 200

    try:
        wait_for(ready, 120, f"worker {name} to be ready", interval=0.2)
    except AssertionError:
        proc.kill()
        raise
    return proc, url


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0]
    return lines[0]


def test_missing_model_directory_is_one_line():
    assert "does not exist" in one_error_line(run_cli("worker", "--model", "/no/such/model"))
    assert "does not exist" in one_error_line(run_cli("serve", "--model", "m=/no/such/model",
                                                      "--port", str(free_port())))


def test_bad_arguments_are_one_line():
    one_error_line(run_cli("worker", "--model", "/tmp", "--port", "99999"))
    one_error_line(run_cli("worker"))
    one_error_line(run_cli("serve", "--model", "no-equals-sign"))
    one_error_line(run_cli("gateway", "--backend", "x=ftp://host"))


def test_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        assert "cannot listen" in one_error_line(run_cli("serve", "--port", port))
        assert "cannot listen" in one_error_line(run_cli("gateway", "--port", port))


def test_model_without_chat_template(no_template_model):
    proc, url = start_worker(no_template_model, "plain")
    try:
        r = httpx.post(url + "/v1/chat/completions",
                       json={"model": "plain", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_missing"
        r = httpx.post(url + "/v1/completions", json={"model": "plain", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200
        card = httpx.get(url + "/v1/models/plain").json()
        assert card["capabilities"] == {"chat": False, "completion": True, "embedding": True, "score": False}
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_drains_in_flight_requests(tmp_path):
    from modelfleet.demo import ensure_demo_model

    proc, url = start_worker(ensure_demo_model(), "tiny-chat", "--drain-timeout", "60")
    result = {}

    def long_request():
        body = {"model": "tiny-chat", "prompt": "x", "max_tokens": 1500, "ignore_eos": True}
        result["r"] = httpx.post(url + "/v1/completions", json=body, timeout=120)

    def running() -> bool:
        metrics = httpx.get(url + "/metrics", timeout=5).text
        return any(line.startswith("vllm:num_requests_running{") and not line.endswith(" 0.0")
                   for line in metrics.splitlines())

    t = threading.Thread(target=long_request)
    t.start()
    wait_for(running, 60, "the long request to be in flight", interval=0.05)
    proc.send_signal(signal.SIGTERM)
    # leaves the Service's endpoints
    wait_for(lambda: httpx.get(url + "/ready").status_code == 503, 10, "/ready to answer 503", interval=0.05)
    refused = httpx.post(url + "/v1/completions", json={"model": "tiny-chat", "prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503 and "retry-after" in refused.headers
    t.join(timeout=120)
    assert result["r"].status_code == 200
    assert result["r"].json()["usage"]["completion_tokens"] == 1500
    assert proc.wait(timeout=30) == 0


def test_replicas_share_the_load(tmp_path):
    from modelfleet.demo import ensure_demo_model

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([*CLI, "serve", "--model", f"tiny-chat={ensure_demo_model()}", "--replicas", "2",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def both_available() -> bool:
            lines = [line for line in httpx.get(url + "/metrics", timeout=1).text.splitlines()
                     if line.startswith("modelfleet_gateway_backend_available{")]
            return len(lines) == 2 and all(not line.endswith(" 0.0") for line in lines)

        wait_for(both_available, 180, "both backends available", interval=0.3)  # two workers starting at once
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20}
        backends = []

        def call():
            backends.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
                            .headers["x-modelfleet-backend"])

        threads = [threading.Thread(target=call) for _ in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(set(backends)) == 2
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130)  # 130: the shell's convention for Ctrl-C
        for backend in set(backends):
            with pytest.raises(httpx.ConnectError):
                httpx.get(backend + "/health", timeout=2)  # no worker outlives serve


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_no_worker_outlives_serve(tmp_path, how):
    from modelfleet.demo import ensure_demo_model

    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--model", f"tiny-chat={ensure_demo_model()}", "--port", str(port)],
                            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def served_by() -> str | None:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-chat", "prompt": "x", "max_tokens": 1})
        return r.headers.get("x-modelfleet-backend") if r.status_code == 200 else None

    backend = wait_for(served_by, 120, "a completion through serve", interval=0.3,
                       explain=lambda: (tmp_path / "serve.log").read_text())
    proc.send_signal(how)
    proc.wait(timeout=30)

    def gone() -> bool:
        # Another transport error (reset, timeout) while the worker goes down counts as not yet.
        try:
            httpx.get(backend + "/health", timeout=1)
        except httpx.ConnectError:
            return True
        return False

    wait_for(gone, 30, f"worker {backend} to stop answering after serve got {how!r}", interval=0.3)


def test_requests_wait_for_a_backend_that_is_still_starting_then_503_after_the_bound(tmp_path):
    """Right after the gateway answers, its workers may still be loading: a request is held
    until one is ready, not refused; with nothing coming up it gets 503 + Retry-After once the
    hold bound has passed."""
    from modelfleet.demo import ensure_demo_model

    # Two gateways, so that the bound a request waits for a worker that is loading (a worker
    # needs ~6 s of CPU to start, ~50 s of wall time at load 16 on two cores) is not also how
    # long the test waits to see a request to a model with nothing coming up refused.
    worker_port, port, nobody_port, refusing_port = free_port(), free_port(), free_port(), free_port()
    log = open(tmp_path / "gateway.log", "w")

    def start_gateway(backend: str, hold: int, at: int) -> subprocess.Popen:
        return subprocess.Popen([*CLI, "gateway", "--backend", backend, "--hold-timeout", str(hold), "--port", str(at)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    HOLD = 10
    gateway = start_gateway(f"tiny-chat=http://127.0.0.1:{worker_port}", 180, port)
    refusing = start_gateway(f"nobody=http://127.0.0.1:{nobody_port}", HOLD, refusing_port)
    url, refusing_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{refusing_port}"
    worker = None
    try:
        for u in (url, refusing_url):
            wait_for(lambda u=u: httpx.get(u + "/health", timeout=1).status_code == 200, 60, "gateway health",
                     interval=0.1)
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
        answers: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: answers.append(
            httpx.post(url + "/v1/chat/completions", json=body, timeout=240))) for _ in range(6)]
        for th in threads:
            th.start()
        worker = subprocess.Popen([*CLI, "worker", "--model", str(ensure_demo_model()), "--served-name", "tiny-chat",
                                   "--port", str(worker_port)], stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        refused = httpx.post(refusing_url + "/v1/chat/completions", timeout=120,
                             json={"model": "nobody", "messages": [{"role": "user", "content": "x"}]})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert HOLD - 1 <= time.monotonic() - started < HOLD + 40  # held for the bound, then refused
        for th in threads:
            th.join()
        assert [a.status_code for a in answers] == [200] * 6
    finally:
        for proc in (gateway, refusing, worker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
