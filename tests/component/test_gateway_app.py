"""The gateway in-process: `create_app` driven through httpx.ASGITransport (or, where a client
must leave half-way, straight through its ASGI interface), in front of fake workers served by
aiohttp on loopback in the same event loop. These are the request paths that otherwise only a
gateway process reaches: retries before the first byte, ejection, the first-byte deadline,
replicas found failing, clients that leave, usage accounting, keys, limits and capacity, and the
headers and errors a client sees.

Nothing here sleeps: a test waits on what the fakes or the clients have done (`Fleet.until`),
and every wait is bounded. Randomness in the balancer (power of two choices) is taken out
either by a shared plan (the first request to arrive, whichever replica it lands on, gets the
planned answer) or by asserting what holds whichever way the choices fall.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import httpx
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.gateway.app import GatewaySettings, create_app
from modelfleet.gateway.auth import ApiKey, KeyStore, digest
from modelfleet.protocol import SSE_DONE, error_body, sse

USAGE = {"prompt_tokens": 5, "completion_tokens": 45, "total_tokens": 50}


def key(name: str) -> str:
    return f"sk-{name}-0123456789"


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key(name)}"}


def chat(model: str = "m", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


class Fleet:
    """The fake workers of one test, the plan they share, and a way to wait for what happens.

    `plan` holds actions for the next POSTs to arrive at any replica, in arrival order; once it
    is empty each replica answers with its own `action`. Whoever changes something a test may
    wait for calls `changed()`."""

    def __init__(self, plan: Iterable[str] = ()) -> None:
        self.plan = list(plan)
        self.replicas: list[Replica] = []
        self._changed = asyncio.Event()

    def replica(self, model: str = "m", action: str = "ok") -> Replica:
        replica = Replica(self, model, action)
        self.replicas.append(replica)
        return replica

    def changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
        """Waits until `predicate()` holds, woken by `changed()` rather than by polling."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = self._changed
                    if predicate():
                        return
                    await event.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None

    @asynccontextmanager
    async def gateway(self, keys: Iterable[ApiKey] = (), **settings) -> AsyncIterator[Gateway]:
        """The gateway in front of every replica, its lifespan entered (discovery has probed
        the replicas once by then), with a client on its ASGI interface."""
        async with AsyncExitStack() as stack:
            backends: dict[str, list[str]] = {}
            for replica in self.replicas:
                # handler_cancellation: a replica's handler sees the gateway drop its connection.
                await replica.server.start_server(shutdown_timeout=1.0)
                stack.push_async_callback(replica.server.close)
                backends.setdefault(replica.model, []).append(replica.url)
            store = KeyStore()
            store.replace("test", list(keys))
            app = create_app(GatewaySettings(backends=backends, **settings), keys=store)
            await stack.enter_async_context(app.app.router.lifespan_context(app.app))
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=10))
            assert (await client.get("/ready")).status_code == 200
            yield Gateway(app, client, self)


class Replica:
    """A modelfleet worker as the gateway sees one: ready on /ready, its model on /v1/models,
    an empty queue on /metrics, and each POST answered as its action says.

    ok: the answer (streamed if asked; the usage chunk and `usage: null` only when asked, as
    the worker does, with events cut across writes); 503: the worker's refusal; stall: never
    answers; trickle: a stream's first event, then nothing; drip: a stream's events one by one
    until `undrip` is set; drop: closes the connection; wedge: never answers, and from then on
    its health checks fail (a wedged process). `ready_hangs` makes /ready never answer (its
    answer lost on the way), `ready_status` answer with that status; `ready_calls` counts them."""

    def __init__(self, fleet: Fleet, model: str, action: str) -> None:
        self.fleet, self.model, self.action = fleet, model, action
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.cancelled = 0  # POSTs whose connection the gateway dropped while they were open
        self.wedged = False
        self.ready_hangs = False
        self.ready_status = 200
        self.ready_calls = 0
        self.undrip = asyncio.Event()
        app = web.Application()
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.post)
        app.router.add_post("/v1/completions", self.post)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def posts(self) -> int:
        return len(self.bodies)

    async def ready(self, request: web.Request) -> web.StreamResponse:
        self.ready_calls += 1
        self.fleet.changed()
        if self.ready_hangs:
            await asyncio.Event().wait()
        if self.ready_status != 200:
            return web.json_response({"status": "broken"}, status=self.ready_status)
        if self.wedged:
            request.transport.close()  # the health check gets no answer at all
            await asyncio.Event().wait()
        return web.json_response({"status": "ready", "models": [self.model]})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 1, "owned_by": "modelfleet"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def post(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        self.bodies.append(raw)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        action = self.fleet.plan.pop(0) if self.fleet.plan else self.action
        self.fleet.changed()
        try:
            if action == "503":
                return web.json_response(error_body("The worker is draining.", type="service_unavailable",
                                                    code="service_unavailable"), status=503)
            if action == "drop":
                request.transport.close()
            self.wedged = action == "wedge"
            if action in ("drop", "stall", "wedge"):
                await asyncio.Event().wait()
            if body.get("stream"):
                return await self.stream(request, body, trickle=action == "trickle", drip=action == "drip")
            return web.json_response({"id": "cmpl-1", "object": "chat.completion", "created": 1, "model": self.model,
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": "hello"}}],
                                      "usage": USAGE}, headers={"x-internal": "replica-only"})
        except asyncio.CancelledError:
            self.cancelled += 1
            self.fleet.changed()
            raise

    async def stream(self, request: web.Request, body: dict, trickle: bool, drip: bool = False) -> web.StreamResponse:
        asked = (body.get("stream_options") or {}).get("include_usage") is True
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "x-internal": "replica-only"})
        await response.prepare(request)
        base = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": self.model}
        events = [sse({**base, "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": None}],
                       **({"usage": None} if asked else {})}) for i in range(3)]
        if asked:
            events.append(sse({**base, "choices": [], "usage": USAGE}))
        if trickle:
            await response.write(events[0])
            await asyncio.Event().wait()
        while drip and not self.undrip.is_set():  # a long generation, one token at a time
            await response.write(events[0])
            await asyncio.sleep(0.05)
        raw = b"".join(events) + SSE_DONE
        for start in range(0, len(raw), 37):  # events cut across writes, as a network may
            await response.write(raw[start:start + 37])
        await response.write_eof()
        return response


@dataclass
class Gateway:
    app: object  # the gateway's ASGI app
    client: httpx.AsyncClient
    fleet: Fleet

    async def metric(self, name: str, **labels: str) -> float:
        """One sample of the gateway's /metrics (0 when absent), matched on the labels given."""
        text = (await self.client.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    async def chat(self, name: str | None = None, **kw) -> httpx.Response:
        return await self.client.post("/v1/chat/completions", json=chat(**kw), headers=auth(name) if name else {})


@dataclass
class LeavingClient:
    """One request on the gateway's raw ASGI interface from a client that can go away at any
    moment (`leave`): httpx.ASGITransport cannot, as it hands back a response only once the app
    has sent all of it."""

    gateway: Gateway
    body: dict
    sent: list[dict] = field(default_factory=list)
    left: asyncio.Event = field(default_factory=asyncio.Event)
    read: bool = False

    def start(self) -> asyncio.Task:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("gateway", 80),
                 "headers": [(b"content-type", b"application/json")]}
        return asyncio.ensure_future(self.gateway.app(scope, self.receive, self.send))

    async def receive(self) -> dict:
        if not self.read:
            self.read = True
            return {"type": "http.request", "body": json.dumps(self.body).encode(), "more_body": False}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        self.gateway.fleet.changed()

    def body_received(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    def leave(self) -> None:
        self.left.set()


def run(test: Callable[[], object]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):  # a hung test fails here, not at pytest's 600 s
            await test()

    asyncio.run(bounded())


def events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


# -- what a client sees of a routed request --------------------------------------------------------

def test_an_answer_names_its_replica_and_route_and_passes_the_body_both_ways_untouched():
    async def test():
        fleet = Fleet()
        replica = fleet.replica()
        async with fleet.gateway(keys=[ApiKey("carol", digest(key("carol")))]) as gw:
            sent = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"my_extension":{"x":[1,2]}}'
            r = await gw.client.post("/v1/chat/completions", content=sent,
                                     headers={**auth("carol"), "content-type": "application/json",
                                              "x-request-id": "rid-1"})
            assert r.status_code == 200, r.text
            assert r.headers["x-modelfleet-backend"] == replica.url
            assert r.headers["x-modelfleet-route"] == "least-load;attempt=1"
            assert r.headers["x-request-id"] == "rid-1"
            assert "x-internal" not in r.headers  # only the headers a client needs pass back
            assert r.json()["usage"] == USAGE and r.json()["choices"][0]["message"]["content"] == "hello"
            assert replica.bodies == [sent]  # never re-encoded: fields the gateway does not know pass through
            assert replica.headers[0]["x-request-id"] == "rid-1"
            assert "authorization" not in replica.headers[0]  # the client's key stays at the gateway
            assert await gw.metric("modelfleet_gateway_requests_total", model="m", status="200", key="carol") == 1

    run(test)


def test_models_and_errors_of_the_gateway_itself_are_in_the_api_format():
    async def test():
        fleet = Fleet()
        fleet.replica()
        async with fleet.gateway() as gw:
            listed = (await gw.client.get("/v1/models")).json()
            assert [m["id"] for m in listed["data"]] == ["m"] and listed["data"][0]["owned_by"] == "modelfleet"
            unknown = await gw.chat(model="nope")
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
            assert unknown.json()["error"]["param"] == "model"
            garbled = await gw.client.post("/v1/chat/completions", content=b"{not json",
                                           headers={"content-type": "application/json"})
            assert garbled.status_code == 400 and set(garbled.json()["error"]) == {"message", "type", "param", "code"}
            missing = await gw.client.post("/v1/chat/completions", json={"messages": []})
            assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
            assert fleet.replicas[0].posts == 0

    run(test)


def test_proxied_paths_answer_wrong_methods_and_huge_bodies_in_the_api_format():
    async def test():
        fleet = Fleet()
        replica = fleet.replica()
        async with fleet.gateway(max_body_bytes=1024) as gw:
            r = await gw.client.get("/v1/chat/completions")
            assert r.status_code == 405 and r.headers["allow"] == "POST" and r.headers["x-request-id"]
            assert r.json()["error"]["code"] == "method_not_allowed"
            r = await gw.client.post("/v1/embeddings", content=b"x" * 1025,
                                     headers={"content-type": "application/json", "x-request-id": "big-1"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            assert r.headers["x-request-id"] == "big-1"
            assert replica.posts == 0

    run(test)


# -- retries, ejection and deadlines, before the first byte ----------------------------------------

def test_a_503_before_the_first_byte_is_retried_on_another_replica():
    async def test():
        fleet = Fleet(plan=["503"])  # the first request to arrive, on whichever replica, is refused
        fleet.replica(), fleet.replica()
        async with fleet.gateway() as gw:
            r = await gw.chat()
            assert r.status_code == 200, r.text
            assert r.headers["x-modelfleet-route"] == "least-load;attempt=2"
            refused = next(x for x in fleet.replicas if x.url != r.headers["x-modelfleet-backend"])
            assert refused.posts == 1  # the first attempt went there, and the client never saw its 503
            assert await gw.metric("modelfleet_gateway_retries_total", model="m") == 1
            assert await gw.metric("modelfleet_gateway_requests_total", model="m", status="200", key="") == 1

    run(test)


def test_the_last_replicas_503_reaches_the_client_when_there_is_no_other_to_try():
    async def test():
        fleet = Fleet(plan=["503"])
        fleet.replica()
        async with fleet.gateway() as gw:
            r = await gw.chat()
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
            assert await gw.metric("modelfleet_gateway_retries_total", model="m") == 0

    run(test)


def test_a_replica_that_drops_connections_is_ejected_after_repeated_failures():
    """As a crashing pod does: every client request still succeeds on the healthy replica, and
    after three failures in a row the bad one gets no more requests."""
    async def test():
        fleet = Fleet()
        good, bad = fleet.replica(), fleet.replica(action="drop")
        async with fleet.gateway() as gw:
            answers = []
            for _ in range(200):  # the balancer tries `bad` first half of the time: 3 of 200 is certain
                answers.append(await gw.chat())
                if bad.posts == 3:
                    break
            assert bad.posts == 3
            assert all(r.status_code == 200 and r.headers["x-modelfleet-backend"] == good.url for r in answers)
            retried = [r for r in answers if r.headers["x-modelfleet-route"] == "least-load;attempt=2"]
            assert len(retried) == 3
            assert await gw.metric("modelfleet_gateway_ejections_total", model="m") == 1
            assert await gw.metric("modelfleet_gateway_backend_available", model="m", backend=bad.url) == 0
            after = [await gw.chat() for _ in range(10)]
            assert {r.headers["x-modelfleet-route"] for r in after} == {"least-load;attempt=1"}
            assert bad.posts == 3

    run(test)


def test_a_stream_on_a_stalled_replica_moves_to_another_after_the_first_byte_deadline():
    """A worker sends a stream's headers as soon as it has validated the request, so a replica
    silent past the deadline is stalled: the gateway drops it and the stream starts elsewhere."""
    async def test():
        fleet = Fleet(plan=["stall"])
        fleet.replica(), fleet.replica()
        async with fleet.gateway(first_byte_timeout=0.3) as gw:
            started = time.monotonic()
            r = await gw.chat(stream=True)
            took = time.monotonic() - started
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert events(r.text)[-1] == "[DONE]" and len(events(r.text)) == 4
            assert r.headers["x-modelfleet-route"] == "least-load;attempt=2"
            stalled = next(x for x in fleet.replicas if x.url != r.headers["x-modelfleet-backend"])
            assert 0.3 <= took < 3  # the deadline, not the read timeout (600 s)
            await fleet.until(lambda: stalled.cancelled == 1, "the stalled request's connection to be dropped")
            assert await gw.metric("modelfleet_gateway_retries_total", model="m") == 1

    run(test)


def test_a_non_streamed_request_moves_off_a_replica_once_its_health_checks_fail():
    """A non-streamed answer comes whole at the end, so no first-byte deadline can tell a
    stalled replica from a long generation; a replica whose health checks stop answering too is
    wedged, and the request it holds moves to a healthy one at the next probe (here every 0.2 s),
    long before the read timeout."""
    async def test():
        fleet = Fleet(plan=["wedge"])
        fleet.replica(), fleet.replica()
        async with fleet.gateway(probe_interval=0.2) as gw:
            started = time.monotonic()
            r = await gw.chat()
            assert r.status_code == 200 and r.headers["x-modelfleet-route"] == "least-load;attempt=2"
            assert time.monotonic() - started < 5  # a probe's 2 s timeout, not the read timeout (600 s)
            wedged = next(x for x in fleet.replicas if x.url != r.headers["x-modelfleet-backend"])
            assert wedged.wedged
            await fleet.until(lambda: wedged.cancelled == 1, "the wedged request's connection to be dropped")

    run(test)


async def open_stream(fleet, gw):
    """A streamed chat through `gw` whose first token has arrived (the replica drips the rest),
    and the task that finishes it."""
    streaming = LeavingClient(gw, chat(stream=True))
    task = streaming.start()
    await fleet.until(lambda: b"t0" in streaming.body_received(), "the stream to start")
    return streaming, task


def test_a_health_check_that_times_out_while_its_replica_streams_to_us_leaves_it_in_service():
    """Under a few thousand held streams a probe's answer can be late for reasons of load alone:
    a replica streaming answers to the gateway is serving, so a timeout of its health check
    neither takes it (here the model's last replica) out nor moves the requests it holds."""
    async def test():
        fleet = Fleet(plan=["drip"])
        replica = fleet.replica()
        async with fleet.gateway(probe_interval=0.2, probe_timeout=1.0) as gw:
            streaming, task = await open_stream(fleet, gw)
            replica.ready_hangs = True
            hung_from = replica.ready_calls
            # A probe begins only once the one before has ended: two more, and the first timed out.
            await fleet.until(lambda: replica.ready_calls >= hung_from + 2, "a health check to time out", timeout=5)
            assert await gw.metric("modelfleet_gateway_backend_available", model="m", backend=replica.url) == 1
            assert (await gw.client.get("/ready")).status_code == 200
            assert (await gw.chat()).status_code == 200  # a non-streamed request still goes to it
            replica.undrip.set()
            await task
            assert events(streaming.body_received().decode())[-1] == "[DONE]"

    run(test)


def test_a_health_check_timeout_counts_only_when_the_gateways_own_loop_did_not_lag():
    """The same replica, whose health check never answers: while the gateway's event loop is
    stalled (a saturated gateway, here CPU-bound callbacks of 0.5 s every 0.2 s) the timeout is
    not held against it; once the loop runs freely, the next timeout takes it out."""
    async def test():
        fleet = Fleet()
        replica = fleet.replica()
        async with fleet.gateway(probe_interval=0.2, probe_timeout=1.0) as gw:
            busy = True

            async def saturate() -> None:
                while busy:
                    time.sleep(0.5)  # the subject is the loop itself: CPU-bound work that holds it
                    await asyncio.sleep(0.2)

            replica.ready_hangs = True
            hung_from = replica.ready_calls
            stalls = asyncio.create_task(saturate())
            await fleet.until(lambda: replica.ready_calls >= hung_from + 2, "a lagged health check to time out",
                              timeout=8)
            busy = False
            await stalls
            assert await gw.metric("modelfleet_gateway_backend_available", model="m", backend=replica.url) == 1
            # The probe that reaches the replica second from now started on a free loop.
            freed_from = replica.ready_calls
            await fleet.until(lambda: replica.ready_calls >= freed_from + 3, "a health check on a free loop",
                              timeout=8)
            assert await gw.metric("modelfleet_gateway_backend_available", model="m", backend=replica.url) == 0
            assert (await gw.client.get("/ready")).status_code == 503

    run(test)


def test_a_health_check_error_takes_a_streaming_replica_out_at_once():
    """Only a timeout is excused: an error status is the replica's own verdict."""
    async def test():
        fleet = Fleet(plan=["drip"])
        replica = fleet.replica()
        async with fleet.gateway(probe_interval=0.2, probe_timeout=1.0) as gw:
            streaming, task = await open_stream(fleet, gw)
            replica.ready_status = 500
            failed_from = replica.ready_calls
            await fleet.until(lambda: replica.ready_calls >= failed_from + 2, "a health check to fail")
            assert await gw.metric("modelfleet_gateway_backend_available", model="m", backend=replica.url) == 0
            replica.undrip.set()
            await task

    run(test)


# -- clients that leave ----------------------------------------------------------------------------

def test_a_client_that_leaves_a_stream_cancels_the_replicas_request():
    """Dropping the upstream connection is how the worker learns to stop generating."""
    async def test():
        fleet = Fleet()
        replica = fleet.replica(action="trickle")
        async with fleet.gateway() as gw:
            client = LeavingClient(gw, chat(stream=True))
            call = client.start()
            await fleet.until(lambda: client.body_received().startswith(b"data: {"), "the first event relayed")
            assert client.sent[0]["status"] == 200
            client.leave()
            await fleet.until(lambda: replica.cancelled == 1, "the replica's request to be cancelled")
            await asyncio.wait_for(call, 2)
            assert not any(m.get("more_body") is False for m in client.sent[1:])  # never completed
            assert await gw.metric("modelfleet_gateway_requests_total", model="m", status="499", key="") == 1
            assert await gw.metric("modelfleet_gateway_backend_inflight", model="m", backend=replica.url) == 0

    run(test)


def test_a_client_that_leaves_while_a_non_streamed_answer_is_pending_cancels_the_replicas_request():
    async def test():
        fleet = Fleet()
        replica = fleet.replica(action="stall")
        async with fleet.gateway() as gw:
            client = LeavingClient(gw, chat())
            call = client.start()
            await fleet.until(lambda: replica.posts == 1, "the request at the replica")
            client.leave()
            await fleet.until(lambda: replica.cancelled == 1, "the replica's request to be cancelled")
            await asyncio.wait_for(call, 2)
            assert client.sent == []  # nobody left to answer
            assert await gw.metric("modelfleet_gateway_requests_total", model="m", status="499", key="") == 1
            assert await gw.metric("modelfleet_gateway_backend_inflight", model="m", backend=replica.url) == 0
            again = await gw.client.get("/ready")  # the gateway is still fine
            assert again.status_code == 200

    run(test)


# -- keys, limits, usage ---------------------------------------------------------------------------

KEYS = [ApiKey("alice", digest(key("alice")), models=frozenset({"m"}), rpm=3),
        ApiKey("bob", digest(key("bob")), tpm=40),
        ApiKey("carol", digest(key("carol"))),
        ApiKey("erin", digest(key("erin")), tpm=100000)]


def test_missing_and_wrong_keys_are_401_and_an_allowlist_hides_and_forbids_other_models():
    async def test():
        fleet = Fleet()
        fleet.replica("m"), fleet.replica("n")
        async with fleet.gateway(keys=KEYS) as gw:
            missing = await gw.chat()
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
            wrong = await gw.client.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer sk-no"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
            assert "sk-no" not in wrong.text
            assert (await gw.client.get("/v1/models")).status_code == 401
            azure = await gw.client.post("/v1/chat/completions", json=chat(), headers={"api-key": key("carol")})
            assert azure.status_code == 200

            listed = (await gw.client.get("/v1/models", headers=auth("alice"))).json()["data"]
            assert [m["id"] for m in listed] == ["m"]
            assert (await gw.client.get("/v1/models/n", headers=auth("alice"))).status_code == 404
            forbidden = await gw.chat("alice", model="n")
            assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "model_not_allowed"
            listed = (await gw.client.get("/v1/models", headers=auth("carol"))).json()["data"]
            assert [m["id"] for m in listed] == ["m", "n"]
            assert fleet.replicas[1].posts == 0

    run(test)


def test_an_rpm_limit_answers_429_with_openais_rate_limit_headers():
    async def test():
        fleet = Fleet()
        fleet.replica()
        async with fleet.gateway(keys=KEYS) as gw:
            answers = [await gw.chat("alice") for _ in range(3)]
            assert [r.status_code for r in answers] == [200] * 3
            assert {r.headers["x-ratelimit-limit-requests"] for r in answers} == {"3"}
            assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0"]
            limited = await gw.chat("alice")
            assert limited.status_code == 429
            assert limited.json()["error"]["code"] == "rate_limit_exceeded"
            assert limited.json()["error"]["type"] == "requests"
            assert 1 <= int(limited.headers["retry-after"]) <= 60
            assert limited.headers["x-ratelimit-remaining-requests"] == "0"
            assert (await gw.chat("carol")).status_code == 200  # other keys are unaffected
            assert fleet.replicas[0].posts == 4

    run(test)


def test_a_tpm_limit_counts_the_usage_the_answer_reports():
    async def test():
        fleet = Fleet()
        fleet.replica()
        async with fleet.gateway(keys=KEYS) as gw:
            first = await gw.chat("bob")
            assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "40"
            limited = await gw.chat("bob")  # the first answer used 50 of 40
            assert limited.status_code == 429 and limited.json()["error"]["type"] == "tokens"
            assert limited.headers["x-ratelimit-remaining-tokens"] == "0"
            assert await gw.metric("modelfleet_gateway_tokens_total", model="m", key="bob") == 50

    run(test)


def test_a_token_limited_keys_stream_is_charged_its_usage_and_reaches_the_client_as_it_asked():
    """The gateway asks the replica for the stream's usage on the key's behalf, charges it, and
    hands the client the stream it asked for: no usage chunk, no usage fields."""
    async def test():
        fleet = Fleet()
        replica = fleet.replica()
        async with fleet.gateway(keys=KEYS) as gw:
            r = await gw.chat("erin", stream=True)
            assert r.status_code == 200
            sent = json.loads(replica.bodies[-1])
            assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
            got = events(r.text)
            assert got[-1] == "[DONE]" and len(got) == 4
            chunks = [json.loads(e) for e in got[:-1]]
            assert all("usage" not in c and c["choices"] for c in chunks)
            assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["t0", "t1", "t2"]
            assert await gw.metric("modelfleet_gateway_tokens_total", model="m", key="erin") == 50

            asked = await gw.chat("erin", stream=True, stream_options={"include_usage": True})
            chunks = [json.loads(e) for e in events(asked.text)[:-1]]
            assert chunks[-1]["usage"] == USAGE and chunks[-1]["choices"] == []  # asked for, so kept
            assert all(c["usage"] is None for c in chunks[:-1])
            assert json.loads(replica.bodies[-1])["stream_options"] == {"include_usage": True}  # as sent

            unmetered = await gw.chat("carol", stream=True)
            assert "stream_options" not in json.loads(replica.bodies[-1])  # nothing to charge: untouched
            assert len(events(unmetered.text)) == 4

    run(test)


def test_streams_are_timed_to_first_token_and_between_tokens_and_plain_answers_are_not():
    async def test():
        fleet = Fleet()
        fleet.replica()
        async with fleet.gateway() as gw:
            for _ in range(3):
                assert (await gw.chat(stream=True)).status_code == 200
            assert await gw.metric("modelfleet_gateway_time_to_first_token_seconds_count", model="m") == 3
            assert await gw.metric("modelfleet_gateway_inter_token_latency_seconds_count", model="m") == 3
            assert 0 < await gw.metric("modelfleet_gateway_time_to_first_token_seconds_sum", model="m") < 3
            assert (await gw.chat()).status_code == 200
            assert await gw.metric("modelfleet_gateway_time_to_first_token_seconds_count", model="m") == 3
            assert await gw.metric("modelfleet_gateway_request_seconds_count", model="m") == 4

    run(test)


def test_a_burst_beyond_capacity_is_refused_fast_and_keys_get_fair_shares():
    """A replica that holds every request (as a saturated one does), capacity 8 in flight: a
    heavy key's burst gets 4 in (half, so others find room) and fast 429s for the rest; a light
    key still gets in; once the model is full, everyone gets a fast 503 with Retry-After
    instead of waiting in an unbounded queue."""
    async def test():
        fleet = Fleet()
        replica = fleet.replica(action="stall")
        keys = [ApiKey(name, digest(key(name))) for name in ("heavy", "light", "third")]
        async with fleet.gateway(keys=keys, max_inflight_per_replica=8) as gw:
            answers: dict[str, list[httpx.Response]] = {"heavy": [], "light": [], "third": []}
            calls: list[asyncio.Task] = []

            async def call(name: str) -> None:
                answers[name].append(await gw.chat(name))
                fleet.changed()

            def burst(name: str, count: int) -> None:
                calls.extend(asyncio.ensure_future(call(name)) for _ in range(count))

            try:
                burst("heavy", 10)
                await fleet.until(lambda: len(answers["heavy"]) == 6 and replica.posts == 4, "heavy's burst")
                burst("light", 3)
                await fleet.until(lambda: replica.posts == 7, "light's three at the replica")
                burst("third", 4)
                await fleet.until(lambda: len(answers["third"]) == 3 and replica.posts == 8, "third's burst")
            finally:
                for c in calls:
                    c.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
            assert [r.status_code for r in answers["heavy"]] == [429] * 6
            assert answers["light"] == []  # all three got in, and were held
            assert [r.status_code for r in answers["third"]] == [503] * 3  # one got in, then the model was full
            assert all(r.headers["retry-after"] == "1" for r in answers["heavy"] + answers["third"])
            await fleet.until(lambda: replica.cancelled == 8, "the held requests to be dropped")

    run(test)
