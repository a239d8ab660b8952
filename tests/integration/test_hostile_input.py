"""Hostile clients against real processes on loopback: a `modelfleet worker` on the demo model and a
`modelfleet gateway` in front of it. Each test states what the hostile client sees, and that a
normal request sent meanwhile is not slowed (its latency against the one measured before, with
a generous bound: the point is a server that stays responsive, not a benchmark).
"""

from __future__ import annotations

import json
import select
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from modelfleet.demo import ensure_demo_model
from modelfleet.devcluster import wait_for
from modelfleet.http import HEAD_TIMEOUT, MAX_BODY_BYTES, MAX_HEAD_BYTES

from .conftest import stop

pytestmark = pytest.mark.integration

CHAT = "tiny-chat"
MSG = [{"role": "user", "content": "Hello"}]
NORMAL = {"model": CHAT, "messages": MSG, "max_tokens": 1}
@dataclass
class Server:
    name: str
    url: str
    pid: int
    baseline: float = 0.0  # median seconds of a normal request, measured once

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname, parts.port

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024


def normal_latency(url: str, client: httpx.Client) -> float:
    started = time.monotonic()
    r = client.post(url + "/v1/chat/completions", json=NORMAL)
    assert r.status_code == 200, r.text
    return time.monotonic() - started


@pytest.fixture(scope="module")
def fleet(launch, tmp_path_factory):
    logs = tmp_path_factory.mktemp("hostile")
    worker, worker_url = launch(["worker", "--model", str(ensure_demo_model()), "--served-name", CHAT,
                                 "--max-num-seqs", "8"], {CHAT}, logs / "worker.log")
    try:
        gateway, gateway_url = launch(["gateway", "--backend", f"{CHAT}={worker_url}"], {CHAT},
                                      logs / "gateway.log")
    except Exception:
        stop(worker)
        raise
    servers = {"worker": Server("worker", worker_url, worker.pid),
               "gateway": Server("gateway", gateway_url, gateway.pid)}
    with httpx.Client(timeout=30) as client:
        for server in servers.values():
            normal_latency(server.url, client)  # warm-up
            server.baseline = statistics.median(normal_latency(server.url, client) for _ in range(7))
    yield servers
    stop(gateway)
    stop(worker)


@pytest.fixture(params=["worker", "gateway"])
def target(request, fleet) -> Server:
    return fleet[request.param]


class Meanwhile:
    """Sends normal requests to `server` on a thread while the block runs (at least `least` of
    them), then checks that they all succeeded and were not slowed."""

    def __init__(self, server: Server, least: int = 3, statistic=statistics.median) -> None:
        self.server = server
        self.least = least
        self.statistic = statistic
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.done.is_set() or len(self.latencies) + len(self.failures) < self.least:
                try:
                    self.latencies.append(normal_latency(self.server.url, client))
                except (AssertionError, httpx.HTTPError) as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.05)  # the pace of the background traffic, not a wait on state

    def __enter__(self) -> Meanwhile:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=120)
        if exc[0] is not None:
            return
        assert not self.failures, f"normal requests failed meanwhile: {self.failures[:3]}"
        seen = self.statistic(self.latencies)
        bound = 10 * self.server.baseline + 1.0
        assert seen < bound, (f"normal requests slowed: {self.statistic.__name__} {seen:.3f}s, "
                              f"before {self.server.baseline:.3f}s")


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def post(server: Server, path: str, content: bytes, content_type: str = "application/json",
         timeout: float = 30) -> httpx.Response:
    return httpx.post(server.url + path, content=content, headers={"content-type": content_type}, timeout=timeout)


# -- bodies -------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_a_413_and_others_go_on(target):
    """The client sees 413 `request_too_large` once it has sent the limit; the server never
    holds more than that, nor parses it."""
    body = b'{"model": "tiny-chat", "prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    with Meanwhile(target):
        started = time.monotonic()
        r = post(target, "/v1/completions", body, timeout=60)
        assert_error(r, 413, "request_too_large")
        assert time.monotonic() - started < 30


def test_a_megabytes_prompt_is_a_400_and_does_not_stall_others(fleet):
    """A 2 MB prompt, well under the body limit: 400 `context_length_exceeded`, and the worker
    keeps answering others meanwhile (no normal request slower than the bound)."""
    gateway = fleet["gateway"]
    body = json.dumps({"model": CHAT, "prompt": "a" * 2_000_000, "max_tokens": 1}).encode()
    with Meanwhile(gateway, statistic=max) as meanwhile:
        wait_for(lambda: meanwhile.latencies or meanwhile.failures, 30, "a first normal request", interval=0.05)
        assert_error(post(gateway, "/v1/completions", body, timeout=120), 400, param="prompt")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"n": 100_000}, "n"),
    ("/v1/chat/completions", {"n": 100}, "n"),  # more than the worker runs at once
    ("/v1/chat/completions", {"max_tokens": 10**12}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 5000}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 4000}, "max_tokens"),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 2**70}, "max_tokens"),
    ("/v1/completions", {"prompt": "Once", "n": 2**31}, "n"),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 10**9}, "max_output_tokens"),
])
def test_n_and_max_tokens_past_the_context_are_a_400(fleet, path, body, param):
    """Answered at once as 400 naming the parameter, before any generation starts."""
    base = {"model": CHAT} if "prompt" in body or "input" in body else {"model": CHAT, "messages": MSG}
    gateway = fleet["gateway"]
    with Meanwhile(gateway):
        started = time.monotonic()
        r = post(gateway, path, json.dumps({**base, **body}).encode())
        assert_error(r, 400, param=param)
        # At once: a generation this long would take minutes. (2 s, with a new client per
        # request and normal traffic beside it, was a thin margin at load 16.)
        assert time.monotonic() - started < 5


def nested(depth: int) -> bytes:
    return b'{"model": "tiny-chat", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def test_moderately_nested_json_is_a_400(target):
    assert_error(post(target, "/v1/chat/completions", nested(500)), 400, param="messages")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_deeply_nested_json_is_a_400_not_a_crash(target, path):
    """100,000 levels: 400 `invalid_json`, not a RecursionError as a 500, and the server goes on."""
    with Meanwhile(target):
        assert_error(post(target, path, nested(100_000)), 400, "invalid_json")


@pytest.mark.parametrize("raw", [
    b"\xff\xfe\xfd",
    b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "caf\xe9"}]}',  # latin-1, not UTF-8
    b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\xc0\xaf"}]}',  # overlong
    b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # an encoded surrogate
    b'{"model": "tiny-\xff", "messages": []}',
], ids=["garbage", "latin-1", "overlong", "surrogate", "in-the-model"])
def test_invalid_utf8_is_a_400(target, raw):
    assert_error(post(target, "/v1/chat/completions", raw), 400, "invalid_json")


def test_an_escaped_lone_surrogate_is_answered_not_a_500(target):
    """Valid JSON whose string cannot be UTF-8: served as text or refused, never a 500."""
    body = b'{"model": "tiny-chat", "max_tokens": 1, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = post(target, "/v1/chat/completions", body)
    assert r.status_code in (200, 400), r.text[:300]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml",
                                          "application/jsonx"])
def test_a_wrong_content_type_is_a_400(target, content_type):
    err = assert_error(post(target, "/v1/chat/completions", json.dumps(NORMAL).encode(), content_type), 400,
                       "unsupported_content_type")
    assert content_type.split(";")[0] in err["message"]


# -- the connection -------------------------------------------------------------------------------

def read_response(sock: socket.socket, deadline: float) -> bytes:
    """What the server sent before closing, up to `deadline`; a reset after the answer is fine."""
    out = b""
    sock.setblocking(False)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BlockingIOError):
            break
        if not chunk:
            break
        out += chunk
    return out


def flood(server: Server, head: bytes) -> bytes:
    """Sends `head` in pieces, stopping once the server answers; returns the answer."""
    sock = socket.create_connection(server.address, timeout=10)
    try:
        for i in range(0, len(head), 16384):
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(head[i:i + 16384])
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_response(sock, time.monotonic() + 10)
    finally:
        sock.close()


@pytest.mark.parametrize("shape", ["many", "huge"])
@pytest.mark.parametrize("name", ["worker", "gateway"])
def test_a_header_flood_is_a_431_and_the_server_survives(fleet, name, shape):
    """20,000 headers, or one header of 8 MB: 431 in the API's format as soon as the head passes
    the limit (the rest is never read), and the server goes on."""
    server = fleet[name]
    if shape == "many":
        headers = b"".join(b"X-Flood-%d: %d\r\n" % (i, i) for i in range(20_000))
    else:
        headers = b"X-Flood: " + b"a" * (8 << 20) + b"\r\n"
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    assert len(head) > MAX_HEAD_BYTES
    with Meanwhile(server):
        answer = flood(server, head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_header_fields_too_large"


@pytest.mark.parametrize("name", ["worker", "gateway"])
def test_slow_loris_clients_are_cut_off_and_others_go_on(fleet, name):
    """40 clients that send a request head a byte every half second (and 10 that send nothing)
    get 408 once the head timeout passes; normal requests meanwhile are not slowed."""
    server = fleet[name]
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    socks = [socket.create_connection(server.address, timeout=5) for _ in range(50)]
    answers: dict[int, bytes] = {}
    started = time.monotonic()
    deadline = started + HEAD_TIMEOUT + 5
    try:
        with Meanwhile(server, least=10):
            position = 0
            while len(answers) < len(socks) and time.monotonic() < deadline:
                for i, sock in enumerate(socks):
                    if i in answers:
                        continue
                    if select.select([sock], [], [], 0)[0]:
                        answers[i] = read_response(sock, time.monotonic() + 2)
                    elif i < 40 and position < len(head):
                        try:
                            sock.send(head[position:position + 1])
                        except OSError:
                            answers[i] = b""
                position += 1
                time.sleep(0.5)  # the slow client's pace (a byte per half second) is what the test sends
        elapsed = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    assert len(answers) == len(socks), f"{len(socks) - len(answers)} slow clients still connected after {elapsed:.0f}s"
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers.values()), set(a[:40] for a in answers.values())
    assert HEAD_TIMEOUT - 1 < elapsed < HEAD_TIMEOUT + 5


def running(server: Server) -> float:
    """The worker's running-batch gauge."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def test_a_client_that_never_reads_its_stream_costs_bounded_memory(fleet, target):
    """A stream of up to 8 x 1500 tokens to a client that reads nothing: the server's memory stays
    bounded (the output is bounded by the context, and the socket pushes back), normal requests
    are not slowed, and once the client goes the worker's batch is free again."""
    worker = fleet["worker"]
    body = json.dumps({"model": CHAT, "messages": MSG, "max_tokens": 1500, "ignore_eos": True, "n": 8,
                       "stream": True}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    before = {s.name: s.rss_mb() for s in fleet.values()}
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(target.address)
    try:
        sock.sendall(request)
        with Meanwhile(target, least=10):
            time.sleep(6)  # the client holds its unread stream this long: the stall is what is measured
        growth = {s.name: s.rss_mb() - before[s.name] for s in fleet.values()}
        assert all(g < 300 for g in growth.values()), growth
    finally:
        sock.close()
    wait_for(lambda: running(worker) == 0, 30, "the worker to stop generating for a client that has gone",
             interval=0.2)
