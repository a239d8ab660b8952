"""What the gateway adds: a fake backend that streams 200 events with no model (and a paced
variant at about 30 events/s per stream, like a real model), measured directly, through a bare
uvicorn + aiohttp relay (the floor for a Python hop), through `modelfleet gateway` and through
the peers users would pick instead (vllm-router and the LiteLLM proxy, bench/peers.py) in the
same run, at 1, 32 and 256 concurrent clients, plus many open paced streams held at once.

    python bench/gateway_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import peers  # noqa: E402
from common import finish_axes, free_port, percentile, print_table, ratio, wait_http, write_results  # noqa: E402

EVENTS = 200
ROUNDS = 3
KEY = "sk-bench-0123456789abcdef"
# The gateway runs as users run it: keys on, with limits high enough never to refuse (rpm/tpm
# here, and in-flight capacity on its command line: one key's fair share of the default 256 a
# replica is 128 streams, fewer than the 256 and 2,000 measured).
KEYS_FILE = f"keys:\n  - name: bench\n    key: {KEY}\n    rpm: 100000000\n    tpm: 100000000000\n"


# -- the fake backend (runs in its own process: `python gateway_overhead.py --backend PORT`) -------

def run_backend(port: int) -> None:
    from aiohttp import web

    # Every chunk differs: LiteLLM aborts a stream that repeats one chunk 100 times.
    chunks = [b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"fake","choices":'
              b'[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}]}\n\n' % i for i in range(EVENTS)]
    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":200,"total_tokens":205}}\n\n'

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "object": "list", "data": []})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        pace = float(body.get("pace", 0))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
            if pace:
                await asyncio.sleep(pace)
        await resp.write(usage + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/health", ready)  # vllm-router's health check
    app.router.add_get("/v1/models", ready)
    app.router.add_get("/metrics", lambda r: web.Response(text=""))
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def run_bare_relay(port: int, backend: str) -> None:
    """The floor for any Python hop: uvicorn (uvloop, httptools) + aiohttp relaying bytes, with
    no keys, limits, routing or metrics. What the gateway adds beyond this is its own cost."""
    import aiohttp
    import uvicorn

    state: dict[str, aiohttp.ClientSession] = {}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if "s" not in state:  # one pooled session for the process, as the gateway has
            state["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        session = state["s"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method = session.get if scope["method"] == "GET" else session.post
        async with method(backend + scope["path"], data=body or None,
                          headers={"content-type": "application/json"}) as r:
            await send({"type": "http.response.start", "status": r.status,
                        "headers": [(b"content-type", r.headers.get("content-type", "").encode())]})
            while chunk := await r.content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- load ------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the clients saw in one run."""

    ttfb: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    events: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)  # HTTP status or exception name
    requests: int = 0
    wall: float = 0.0


def summarize_runs(runs: list[Run]) -> dict[str, Any]:
    """Runs of one configuration merged: throughput over their summed wall time."""
    ttfb = [t for r in runs for t in r.ttfb]
    latency = [t for r in runs for t in r.latency]
    wall = sum(r.wall for r in runs)
    ms = lambda v: round(v * 1000, 3) if v is not None else None  # noqa: E731
    kinds = sum((r.error_kinds for r in runs), Counter())
    return {"requests": sum(r.requests for r in runs), "errors": sum(r.errors for r in runs),
            **({"error_kinds": dict(kinds)} if kinds else {}),
            "events_per_s": round(sum(r.events for r in runs) / wall, 1),
            "ttfb_p50_ms": ms(percentile(ttfb, 50)), "ttfb_p99_ms": ms(percentile(ttfb, 99)),
            "latency_p50_ms": ms(percentile(latency, 50)), "latency_p99_ms": ms(percentile(latency, 99))}


async def load(url: str, concurrency: int, per_client: int, pace: float) -> dict[str, Any]:
    return summarize_runs([await load_run(url, concurrency, per_client, pace)])


async def load_run(url: str, concurrency: int, per_client: int, pace: float) -> Run:
    import aiohttp

    run = Run(requests=concurrency * per_client)
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True, "pace": pace}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600),
                                     headers={"authorization": f"Bearer {KEY}"}) as session:

        async def client() -> None:
            for _ in range(per_client):
                started = time.perf_counter()
                first = None
                try:
                    async with session.post(url + "/v1/chat/completions", json=body) as r:
                        if r.status != 200:
                            run.errors += 1
                            run.error_kinds[str(r.status)] += 1
                            continue
                        async for line in r.content:
                            if line.startswith(b"data: {"):
                                first = first or time.perf_counter()
                                run.events += 1
                except aiohttp.ClientError as exc:
                    run.errors += 1
                    run.error_kinds[type(exc).__name__] += 1
                    continue
                run.ttfb.append(first - started)
                run.latency.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        run.wall = time.perf_counter() - started
    return run


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def open_streams(url: str, streams: int, seconds: float, gateway_pid: int) -> dict[str, Any]:
    """`streams` paced streams held open together; gateway memory sampled while they run."""
    pace = seconds / EVENTS
    samples: list[float] = []

    async def sample() -> None:
        while True:
            samples.append(rss_mb(gateway_pid))
            await asyncio.sleep(2)

    sampler = asyncio.create_task(sample())
    result = await load(url, streams, 1, pace)
    sampler.cancel()
    # Every stream opens in the first seconds, so memory that grows after the first quarter of
    # the hold is what a long-lived stream leaks.
    settled = samples[len(samples) // 4:] or samples
    result["rss_mb_start"] = samples[0] if samples else None
    result["rss_mb_peak"] = max(samples) if samples else None
    result["rss_mb_settled"] = settled[0] if settled else None
    result["rss_mb_end"] = samples[-1] if samples else None
    return result


def start_peers(backend: str, logs: Path) -> tuple[list[tuple[str, str]], list[subprocess.Popen]]:
    """vllm-router and LiteLLM in front of the same backend, each skipped (saying why) if it
    cannot be installed or does not become ready."""
    started: list[tuple[str, str]] = []
    procs: list[subprocess.Popen] = []
    for peer in peers.PEERS:
        exe = peers.install(peer)
        if exe is None:
            continue
        port = free_port()
        if peer is peers.VLLM_ROUTER:
            cmd, env, path = peers.router_command(exe, port, free_port(), backend), None, "/health"
        else:
            config = logs / "litellm.yaml"
            config.write_text(peers.litellm_config(backend, "fake"))
            cmd, env, path = peers.litellm_command(exe, port, config), peers.litellm_env(), "/health/liveliness"
        log = logs / f"{peer.name}.log"
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=logs)
        try:
            wait_http(f"http://127.0.0.1:{port}{path}", proc, timeout=120)
        except (RuntimeError, TimeoutError) as exc:
            print(f"SKIPPING {peer.name}: not ready ({exc}); log: {log}", flush=True)
            proc.kill()
            proc.wait()
            continue
        started.append((peer.name, f"http://127.0.0.1:{port}"))
        procs.append(proc)
    return started, procs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare-relay", nargs=2, metavar=("PORT", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        run_backend(args.backend)
        return 0
    if args.bare_relay:
        run_bare_relay(int(args.bare_relay[0]), args.bare_relay[1])
        return 0
    logs = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    bport, gport = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, __file__, "--backend", str(bport)],
                               stdout=(logs / "backend.log").open("w"), stderr=subprocess.STDOUT)
    keys = logs / "keys.yaml"
    keys.write_text(KEYS_FILE)
    gateway = subprocess.Popen([sys.executable, "-m", "modelfleet", "--log-level", "warning", "gateway",
                                "--backend", f"fake=http://127.0.0.1:{bport}", "--port", str(gport),
                                "--api-keys", str(keys), "--max-inflight-per-replica", "10000"],
                               stdout=(logs / "gateway.log").open("w"), stderr=subprocess.STDOUT)
    rport = free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--bare-relay", str(rport), f"http://127.0.0.1:{bport}"],
                            stdout=(logs / "bare.log").open("w"), stderr=subprocess.STDOUT)
    direct, through, relay = f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{rport}"
    peer_paths, peer_procs = start_peers(direct, logs)
    paths = (("direct", direct), ("bare relay", relay), ("gateway", through), *peer_paths)
    levels = [1, 32, 256]
    per = {1: 40, 32: 4, 256: 1} if args.quick else {1: 100, 32: 12, 256: 2}
    # LiteLLM is two orders of magnitude slower here: fewer streams per client keep its share of
    # the run to about a minute, and it sits out 256 clients (its ratio is clear long before).
    per_path = {"litellm": {1: 5, 32: 1} if args.quick else {1: 10, 32: 1}}
    held, hold_s = (500, 20.0) if args.quick else (2000, 60.0)
    rows: list[dict[str, Any]] = []
    try:
        for name, url in paths:
            if name not in dict(peer_paths):  # start_peers waited on each peer's own health path
                wait_http(url + "/ready")
            asyncio.run(load(url, 4, 2, 0))  # warm-up
        for c in levels:
            # The paths alternate, so that drift in this shared machine's speed falls on
            # every side of the ratios.
            at_c = [(name, url) for name, url in paths if c in per_path.get(name, per)]
            runs: dict[str, list[Run]] = {name: [] for name, _ in at_c}
            for _ in range(ROUNDS):
                for name, url in at_c:
                    runs[name].append(asyncio.run(load_run(url, c, per_path.get(name, per)[c], 0)))
            for name, _ in at_c:
                row = {"path": name, "variant": "fast", "concurrency": c, **summarize_runs(runs[name])}
                rows.append(row)
                print(f"  {name:11s} fast   c={c:<4d} {row['events_per_s']:>9} events/s  "
                      f"ttfb p50 {row['ttfb_p50_ms']} ms  errors {row['errors']}", flush=True)
        for name, url in (("direct", direct), ("gateway", through)):
            row = {"path": name, "variant": "paced", "concurrency": 32,
                   **asyncio.run(load(url, 32, 1, 1 / 30))}
            rows.append(row)
            print(f"  {name:8s} paced  c=32   ttfb p50 {row['ttfb_p50_ms']} ms  errors {row['errors']}", flush=True)
        print(f"holding {held} paced streams through the gateway for ~{hold_s:.0f}s", flush=True)
        row = {"path": "gateway", "variant": f"{held} open streams", "concurrency": held,
               **asyncio.run(open_streams(through, held, hold_s, gateway.pid))}
        rows.append(row)
        print(f"  errors {row['errors']}, gateway RSS {row['rss_mb_start']} MB before, {row['rss_mb_settled']} MB "
              f"once open, {row['rss_mb_end']} MB at the end", flush=True)
    finally:
        for proc in (gateway, bare, *peer_procs, backend):
            proc.kill()
            proc.wait()

    def get(path: str, c: int, key: str, variant: str = "fast") -> float | None:
        return next((r[key] for r in rows if (r["path"], r["concurrency"], r["variant"]) == (path, c, variant)), None)

    def added(c: int, key: str, path: str = "gateway") -> float | None:
        with suppress(TypeError):  # a peer that was skipped
            return round(get(path, c, key) - get("direct", c, key), 3)
        return None

    def vs(c: int, path: str, base: str = "direct") -> float | None:
        return ratio(get(path, c, "events_per_s"), get(base, c, "events_per_s"))

    held_row = rows[-1]
    ratios = {
        "added_ttfb_p50_ms@1": added(1, "ttfb_p50_ms"),
        "added_latency_p50_ms@1": added(1, "latency_p50_ms"),
        "added_latency_p99_ms@1": added(1, "latency_p99_ms"),
        "bare_relay_added_latency_p50_ms@1": added(1, "latency_p50_ms", "bare relay"),
        "throughput_vs_direct@32": vs(32, "gateway"),
        "throughput_vs_direct@256": vs(256, "gateway"),
        "bare_relay_throughput_vs_direct@32": vs(32, "bare relay"),
        "bare_relay_throughput_vs_direct@256": vs(256, "bare relay"),
        "throughput_vs_bare_relay@32": vs(32, "gateway", "bare relay"),
        **{f"{peer.name}_{key}": value for peer in peers.PEERS for key, value in (
            ("added_latency_p50_ms@1", added(1, "latency_p50_ms", peer.name)),
            ("throughput_vs_direct@32", vs(32, peer.name)),
            ("throughput_vs_direct@256", vs(256, peer.name)))},
        **{f"throughput_vs_{peer.name}@32": vs(32, "gateway", peer.name) for peer in peers.PEERS},
        f"open_streams_errors@{held}": held_row["errors"],
        "open_streams_rss_mb": round((held_row["rss_mb_settled"] or 0) - (held_row["rss_mb_start"] or 0), 1),
        "open_streams_rss_growth_while_held_mb": round((held_row["rss_mb_end"] or 0)
                                                       - (held_row["rss_mb_settled"] or 0), 1),
    }
    config = {"events_per_stream": EVENTS, "levels": levels, "per_client": per, "held_streams": held,
              "hold_seconds": hold_s, "gateway": "raw ASGI data path, aiohttp upstream client; keys, rpm/tpm limits, metrics on", "quick": args.quick, "cpus": os.cpu_count(),
              "peers": {p.name: p.requirement for p in peers.PEERS}, "per_client_by_path": per_path,
              "goals": {"added_latency_p50_ms@1": "<= 0.5, and below every peer's",
                        "throughput_vs_direct@32": ">= 0.95, and above every peer's",
                        f"open_streams_errors@{held}": "== 0", "open_streams_rss_growth_while_held_mb": "flat (about 0)"}}
    print()
    print_table(rows, ["path", "variant", "concurrency", "events_per_s", "ttfb_p50_ms", "ttfb_p99_ms",
                       "latency_p50_ms", "latency_p99_ms", "errors"])
    for key, value in ratios.items():
        print(f"{key:32s} {value}")

    def plot(ax) -> None:
        for name, _ in paths:
            pts = [(r["concurrency"], r["events_per_s"]) for r in rows if r["path"] == name and r["variant"] == "fast"]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_yscale("log")  # LiteLLM is two orders of magnitude below the rest
        finish_axes(ax, "concurrent streams", "SSE events/s", "gateway overhead and peers (fake backend, 200 events a stream)")

    path = write_results("gateway_overhead", config, rows, ratios, plot)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
