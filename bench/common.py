"""Shared benchmark plumbing: worker processes, a closed-loop load generator, statistics, and
the results file + plot that every benchmark writes (bench/README.md)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.devcluster import wait_for
from modelfleet.netutil import free_port

RESULTS = Path(__file__).parent / "results"



def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 60, log: Path | None = None,
              interval: float = 0.2) -> None:
    """Until GET `url` answers 200 (modelfleet.devcluster.wait_for polls). RuntimeError at once
    if `proc` exits, with the tail of its `log`; TimeoutError after `timeout` seconds."""
    import httpx

    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}\n{tail}")
        return httpx.get(url, timeout=2).status_code == 200

    try:
        wait_for(up, timeout, f"{url} to answer 200", interval=interval)
    except AssertionError as exc:
        raise TimeoutError(str(exc)) from None


def start_worker(model: Path | str, name: str, *extra: str, log: Path) -> tuple[subprocess.Popen, str]:
    """A real `modelfleet worker` process on loopback, ready to serve."""
    port = free_port()
    cmd = [sys.executable, "-m", "modelfleet", "worker", "--model", str(model), "--served-name", name,
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/ready", proc, timeout=300, log=log)
    except TimeoutError:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Sample:
    """One request as the client saw it."""

    tokens: int
    started: float
    ended: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(samples: list[Sample], wall: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    ttft = [s.first_token - s.started for s in ok if s.first_token is not None]
    itl = [b - a for s in ok for a, b in zip(s.token_times, s.token_times[1:], strict=False)]
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "tokens": sum(s.tokens for s in ok),
        "seconds": round(wall, 3),
        "tokens_per_s": round(sum(s.tokens for s in ok) / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p95_ms": _ms(percentile(ttft, 95)),
        "itl_p50_ms": _ms(percentile(itl, 50)),
        "itl_p95_ms": _ms(percentile(itl, 95)),
        "latency_p50_ms": _ms(statistics.median([s.ended - s.started for s in ok]) if ok else None),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def closed_loop(send: Callable[[], Awaitable[Sample]], concurrency: int, per_client: int,
                      stagger: float = 0.0, seed: int = 0) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending `per_client` requests back to back. With `stagger`,
    clients start at random times over that many seconds instead of in one burst."""
    rng = random.Random(seed)
    samples: list[Sample] = []

    async def client(delay: float) -> None:
        await asyncio.sleep(delay)
        for _ in range(per_client):
            samples.append(await send())

    started = time.perf_counter()
    await asyncio.gather(*(client(rng.uniform(0, stagger) if stagger else 0.0) for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def write_results(name: str, config: dict[str, Any], rows: list[dict[str, Any]], ratios: dict[str, Any],
                  plot: Callable[[Any], None]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"config": config, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    plot(ax)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)
    return path


def finish_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The axes every concurrency sweep shares: log2 x axis, labels, legend, light grid."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None
