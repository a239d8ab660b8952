"""API keys stay secret, and a key's model allowlist holds before any backend is involved.

The first test runs `modelfleet serve` (gateway plus one worker per model, real processes) with
an --api-keys file, drives traffic that exercises every path a key touches (missing, wrong and
near-miss keys, a refused model, rpm and tpm limits, streams, errors from the gateway and from
the workers), then searches everything an operator or a client can observe: the processes'
logs at debug level, /metrics of the gateway and of every worker, and every response's status
line, headers and body. None may contain a key, in any form.

The others need only a gateway: keys are looked up by their SHA-256 digest, compared in
constant time, and a refused model is answered 403 by the gateway with the backend (a fake
here, counting what it receives) never seeing the request; nor does a backend ever see a key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from modelfleet.demo import ensure_demo_model
from modelfleet.devcluster import wait_for as wait_until
from modelfleet.netutil import free_port

from .conftest import stop

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "modelfleet"]
CHAT, OTHER = "tiny-chat", "other-chat"


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(24)


# Fresh keys per run, so nothing on the machine can contain them by chance.
KEYS = {"alice": new_key(), "bob": new_key(), "carol": new_key(), "dave": new_key(), "erin": new_key()}
WRONG = ["sk-" + secrets.token_urlsafe(24), KEYS["carol"][:-1] + ("A" if KEYS["carol"][-1] != "A" else "B"),
         KEYS["carol"][:20]]


def key_file(path: Path) -> Path:
    path.write_text(f"""
keys:
  - name: alice
    key: {KEYS["alice"]}
    models: [{CHAT}]
    rpm: 3
  - name: bob
    key: {KEYS["bob"]}
    tpm: 40
  - name: carol
    key: {KEYS["carol"]}
  - name: dave
    key_sha256: "{hashlib.sha256(KEYS["dave"].encode()).hexdigest()}"
    models: [{CHAT}, {OTHER}]
  - name: erin
    key: {KEYS["erin"]}
    tpm: 100000
""")
    return path


def needles() -> dict[str, str]:
    """Every form of a secret that must not show: the key, its bearer header, its base64 (a
    Basic header), its digest, and 10-character pieces of its head and tail (a masked print)."""
    out = {}
    for name, key in [*KEYS.items(), *((f"wrong{i}", k) for i, k in enumerate(WRONG))]:
        out[f"{name}: key"] = key
        out[f"{name}: bearer"] = f"Bearer {key}"
        out[f"{name}: base64"] = base64.b64encode(f"user:{key}".encode()).decode()
        out[f"{name}: head"] = key[3:13]
        out[f"{name}: tail"] = key[-10:]
        if name in KEYS:
            out[f"{name}: sha256"] = hashlib.sha256(key.encode()).hexdigest()
    return out



def descendants(pid: int) -> list[int]:
    """Child processes, recursively, from /proc (Linux)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            out += [child, *descendants(child)]
    return out


def worker_urls(pid: int) -> list[str]:
    urls = []
    for child in descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "worker" in argv and "--port" in argv:
            urls.append(f"http://127.0.0.1:{argv[argv.index('--port') + 1]}")
    return urls


@dataclass
class Observed:
    """Everything a client or an operator saw, as text to search."""

    parts: list[tuple[str, str]] = field(default_factory=list)

    def response(self, what: str, r: httpx.Response) -> httpx.Response:
        head = "\n".join(f"{k}: {v}" for k, v in r.headers.multi_items())
        self.parts.append((f"{what} -> {r.status_code}", f"HTTP {r.status_code} {r.reason_phrase}\n{head}\n\n{r.text}"))
        return r

    def add(self, what: str, text: str) -> None:
        self.parts.append((what, text))


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen, Path, Path]]:
    tmp = tmp_path_factory.mktemp("secrets")
    keys = key_file(tmp / "keys.yaml")
    demo = ensure_demo_model()
    port = free_port()
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [*CLI, "--log-level", "debug", "--log-format", "json", "serve", "--model", f"{CHAT}={demo}",
         "--model", f"{OTHER}={demo}", "--api-keys", str(keys), "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: len(httpx.get(url + "/ready").json().get("models", [])) == 2, 180, "serve ready")
        yield url, proc, log, keys
    finally:
        stop(proc)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def drive(url: str, seen: Observed) -> None:
    """Every path a key touches, each answer recorded and checked for the status it must have."""
    post = lambda what, path, headers, body, **kw: seen.response(  # noqa: E731 - a local shorthand
        what, httpx.post(url + path, headers=headers, timeout=60, **({"json": body} if body is not None else kw)))
    chat = "/v1/chat/completions"

    # Missing, wrong and near-miss keys, in every header a client may use.
    assert post("no key", chat, {}, chat_body(CHAT)).status_code == 401
    for i, wrong in enumerate(WRONG):
        assert post(f"wrong{i} bearer", chat, bearer(wrong), chat_body(CHAT)).status_code == 401
        assert post(f"wrong{i} api-key", chat, {"api-key": wrong}, chat_body(CHAT)).status_code == 401
        basic = base64.b64encode(f"user:{wrong}".encode()).decode()
        assert post(f"wrong{i} basic", chat, {"authorization": f"Basic {basic}"}, chat_body(CHAT)).status_code == 401
        assert seen.response(f"wrong{i} models", httpx.get(url + "/v1/models", headers=bearer(wrong))).status_code \
            == 401
    carol = KEYS["carol"]
    assert post("key twice", chat, {"authorization": f"Bearer {carol} {carol}"}, chat_body(CHAT)).status_code == 401
    assert post("bearer without key", chat, {"authorization": "Bearer"}, chat_body(CHAT)).status_code == 401

    # A model outside the key's allowlist: hidden from listings, refused on use.
    alice = bearer(KEYS["alice"])
    assert post("alice other", chat, alice, chat_body(OTHER)).status_code == 403
    assert seen.response("alice get other", httpx.get(f"{url}/v1/models/{OTHER}", headers=alice)).status_code == 404
    assert seen.response("alice models", httpx.get(url + "/v1/models", headers=alice)).status_code == 200

    # rpm: alice's fourth request in the minute is refused.
    statuses = [post(f"alice rpm {i}", chat, alice, chat_body(CHAT)).status_code for i in range(4)]
    assert statuses[-1] == 429 and 200 in statuses

    # tpm: bob's first answer spends his tokens, the next is refused; a stream too.
    bob = bearer(KEYS["bob"])
    assert post("bob big", chat, bob, chat_body(CHAT, max_tokens=30, ignore_eos=True)).status_code == 200
    assert post("bob limited", chat, bob, chat_body(CHAT)).status_code == 429
    with httpx.stream("POST", url + chat, headers=bob, json=chat_body(CHAT, stream=True), timeout=60) as r:
        r.read()
        seen.response("bob stream limited", r)
        assert r.status_code == 429

    # Streams: a whole one, one whose usage the gateway asks for on the key's behalf (tpm),
    # one the client leaves early, one hash-configured key's, and completions.
    for name, body in [("carol", chat_body(CHAT, stream=True, max_tokens=8)),
                       ("erin", chat_body(CHAT, stream=True, max_tokens=8)),
                       ("dave", chat_body(OTHER, stream=True, stream_options={"include_usage": True}))]:
        with httpx.stream("POST", url + chat, headers=bearer(KEYS[name]), json=body, timeout=60) as r:
            r.read()
            seen.response(f"{name} stream", r)
            assert r.status_code == 200 and "[DONE]" in r.text
    with httpx.stream("POST", url + chat, headers=bearer(carol), timeout=60,
                      json=chat_body(CHAT, stream=True, max_tokens=200, ignore_eos=True)) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # then leave: the gateway cancels the upstream
    assert post("completions", "/v1/completions", bearer(carol),
                {"model": CHAT, "prompt": "hi", "max_tokens": 2}).status_code == 200
    with httpx.stream("POST", url + "/v1/completions", headers=bearer(carol), timeout=60,
                      json={"model": CHAT, "prompt": "hi", "max_tokens": 2, "stream": True}) as r:
        r.read()
        seen.response("completions stream", r)

    # Errors: the gateway's own and the workers' (relayed), streamed and not.
    assert post("bad json", chat, bearer(carol), None, content=b"{not json").status_code == 400
    assert post("unknown model", chat, bearer(carol), chat_body("nope")).status_code == 404
    assert post("bad param", chat, bearer(carol), chat_body(CHAT, max_tokens=-1)).status_code == 400
    assert post("bad stream param", chat, bearer(carol), chat_body(CHAT, stream=True, temperature=-3)).status_code \
        == 400
    post("embeddings", "/v1/embeddings", bearer(carol), {"model": CHAT, "input": "x"})
    assert post("bad embeddings", "/v1/embeddings", bearer(carol), {"model": CHAT, "input": []}).status_code == 400
    assert post("too long", chat, bearer(carol), chat_body(CHAT, max_tokens=10**7)).status_code == 400
    assert seen.response("wrong method", httpx.get(url + chat, headers=bearer(carol))).status_code == 405
    assert post("no model", chat, bearer(carol), {"messages": []}).status_code in (400, 404)


def test_no_key_shows_in_logs_metrics_headers_or_bodies(served) -> None:
    url, proc, log, _ = served
    seen = Observed()
    drive(url, seen)
    workers = worker_urls(proc.pid)
    assert len(workers) == 2, workers
    for base in [url, *workers]:
        for path in ("/metrics", "/health", "/ready", "/v1/models"):
            seen.response(f"{base}{path}", httpx.get(base + path, headers=bearer(KEYS["carol"]), timeout=10))
    # What the gateway counted per key, by name: the metrics carry names, never keys.
    gateway_metrics = httpx.get(url + "/metrics").text
    assert 'key="alice"' in gateway_metrics and 'key="carol"' in gateway_metrics
    stop(proc)  # so that every log line is flushed
    seen.add("serve log (gateway and workers, stdout and stderr)", log.read_text())

    leaks = [(what, needle) for what, text in seen.parts for needle, secret in needles().items() if secret in text]
    assert not leaks, f"secrets seen: {leaks[:20]}"
    # The search had something to search: the traffic reached the workers and got logged.
    assert len(seen.parts) > 40 and "request routed" in log.read_text()


# --- keys kept as digests, compared in constant time ---------------------------------------------

def test_keys_are_looked_up_by_sha256_digest_in_constant_time(monkeypatch, tmp_path: Path) -> None:
    import hmac

    from modelfleet.gateway import auth

    store = auth.KeyStore()
    store.replace("file", auth.parse_key_file(key_file(tmp_path / "keys.yaml").read_text()))
    stored = [k.sha256 for keys in store.sources.values() for k in keys]
    assert all(len(d) == 64 for d in stored)
    assert not any(key in repr(store.sources) for key in KEYS.values())  # only digests in memory

    calls: list[tuple[str, str]] = []
    real_compare = hmac.compare_digest

    def compare(a, b):
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    for presented in [KEYS["alice"], KEYS["erin"], WRONG[0], WRONG[1]]:
        calls.clear()
        found = store.lookup(presented)
        want = hashlib.sha256(presented.encode()).hexdigest()
        # Every stored digest is compared with the presented key's digest, never the key
        # itself, and the loop does not stop at a match: the time does not tell which key.
        assert sorted(a for a, _ in calls) == sorted(stored)
        assert {b for _, b in calls} == {want}
        assert (found is not None) == (presented in KEYS.values())


def test_a_broken_key_file_never_quotes_a_key(tmp_path: Path, caplog) -> None:
    from modelfleet.gateway.auth import KeyFileError, KeyFileWatcher, KeyStore

    good = key_file(tmp_path / "keys.yaml")
    watcher = KeyFileWatcher(good, KeyStore())
    watcher.load()
    broken = good.read_text().replace(f"key: {KEYS['carol']}", f"key: {KEYS['carol']}: [")
    good.write_text(broken)
    os.utime(good, (time.time() + 5, time.time() + 5))
    with caplog.at_level("ERROR"):
        assert watcher.poll() is False  # the previous keys stay in force
    assert "keeping the previous keys" in caplog.text
    with pytest.raises((KeyFileError, Exception)) as info:
        KeyFileWatcher(good, KeyStore()).load()
    shown = caplog.text + str(info.value)
    leaks = [what for what, secret in needles().items() if what.startswith("carol:") and secret in shown]
    assert not leaks, shown


# --- the allowlist holds before any backend -----------------------------------------------------

class FakeBackend:
    """A worker as the gateway's static discovery sees it, counting the requests it is sent
    and recording their headers."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.posts: list[tuple[str, dict[str, str]]] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, body: dict | str, ctype: str = "application/json") -> None:
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": backend.model, "object": "model",
                                                                 "created": 0, "owned_by": "test"}]})
                elif self.path == "/metrics":
                    self.reply(200, "", "text/plain")
                else:
                    self.reply(200, {"status": "ready", "models": [backend.model]})

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length") or 0))
                backend.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": backend.model,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "ok"}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fronted(tmp_path_factory) -> Iterator[tuple[str, dict[str, FakeBackend]]]:
    tmp = tmp_path_factory.mktemp("allowlist")
    backends = {CHAT: FakeBackend(CHAT), OTHER: FakeBackend(OTHER)}
    port = free_port()
    log = tmp / "gateway.log"
    proc = subprocess.Popen([*CLI, "gateway", *[a for m, b in backends.items() for a in ("--backend", f"{m}={b.url}")],
                             "--api-keys", str(key_file(tmp / "keys.yaml")), "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: len(httpx.get(url + "/ready").json().get("models", [])) == 2, 60, "gateway ready")
        yield url, backends
    finally:
        stop(proc)
        for b in backends.values():
            b.close()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_model_is_403_and_no_backend_sees_it(fronted, path: str, stream: bool) -> None:
    url, backends = fronted
    for b in backends.values():
        b.posts.clear()
    body = {"model": OTHER, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi",
            "stream": stream}
    r = httpx.post(url + path, headers=bearer(KEYS["alice"]), json=body, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert [p for b in backends.values() for p in b.posts] == []
    # The same request with a key allowed that model does reach it: the fake is listening.
    assert httpx.post(url + path, headers=bearer(KEYS["dave"]), json={**body, "stream": False},
                      timeout=30).status_code == 200
    assert len(backends[OTHER].posts) == 1 and backends[CHAT].posts == []


def test_backends_never_receive_a_key(fronted) -> None:
    url, backends = fronted
    for name in ("carol", "dave"):
        for header in (bearer(KEYS[name]), {"api-key": KEYS[name]}):
            assert httpx.post(url + "/v1/chat/completions", headers=header, timeout=30,
                              json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    received = json.dumps([h for b in backends.values() for _, h in b.posts])
    assert backends[CHAT].posts and "authorization" not in received and "api-key" not in received
    assert not any(key in received for key in KEYS.values())
