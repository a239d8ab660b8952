"""Embeddings/s of all-MiniLM-L6-v2: concurrent single-sentence HTTP clients against one worker
(which batches them dynamically), compared in the same run with the sentence-transformers
library itself, one sentence at a time and in batches of 32, and with vLLM's CPU build on its
pooling runner (`--runner pooling`, as modelfleet renders vLLM for task embed; float32 like the
worker; run right after the worker at the same concurrency; skipped without `make vllm`).

    python bench/embeddings.py [--quick] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    Sample,
    closed_loop,
    finish_axes,
    print_table,
    ratio,
    start_worker,
    stop,
    summarize,
    write_results,
)
from worker_throughput import verdict  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near "
         "the old harbour where ships unload grain and spices every morning").split()


def sentences(n: int) -> list[str]:
    """Deterministic sentences of 8 to 24 words, like short user queries and reviews."""
    out = []
    for i in range(n):
        length = 8 + (i * 7) % 17
        out.append(" ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(length)) + f" #{i}")
    return out


def library(batch: int, texts: list[str]) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from modelfleet.demo import minilm_path

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.encode(texts[:batch], batch_size=batch)  # warm-up
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.encode(texts[i : i + batch], batch_size=batch)
    wall = time.perf_counter() - started
    return {"requests": len(texts), "errors": 0, "tokens": len(texts), "seconds": round(wall, 3),
            "tokens_per_s": round(len(texts) / wall, 2)}


async def http_load(url: str, concurrency: int, texts: list[str]) -> dict[str, Any]:
    import aiohttp

    queue = iter(texts)
    per_client = max(1, len(texts) // concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def send() -> Sample:
            s = Sample(tokens=0, started=time.perf_counter(), ended=0.0)
            body = {"model": "minilm", "input": next(queue, texts[0]), "encoding_format": "base64"}
            async with session.post(url + "/v1/embeddings", json=body) as r:
                if r.status == 200:
                    await r.read()
                    s.tokens = 1  # one embedding
                else:
                    s.error = f"HTTP {r.status}"
            s.ended = time.perf_counter()
            return s

        samples, wall = await closed_loop(send, concurrency, per_client)
    return summarize(samples, wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true", help="leave out vLLM (needs `make vllm`)")
    args = parser.parse_args()
    from modelfleet.demo import minilm_path

    n = 512 if args.quick else 1024
    levels = [1, 8, 32] if args.quick else [1, 8, 32, 64]
    texts = sentences(n)
    rows: list[dict[str, Any]] = []

    def record(system: str, concurrency: int, result: dict[str, Any]) -> None:
        rows.append({"system": system, "concurrency": concurrency, **result,
                     "embeddings_per_s": result["tokens_per_s"]})
        print(f"  {system:22s} c={concurrency:<3d} {result['tokens_per_s']:8.1f} embeddings/s", flush=True)

    print("sentence-transformers library", flush=True)
    record("library batch=1", 1, library(1, texts[: n // 4]))
    before = library(32, texts)
    print("modelfleet worker over HTTP (dynamic batching)", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    proc, url = start_worker(minilm_path(), "minilm", log=logs / "worker.log")
    vllm = vllm_url = None
    try:
        if not args.skip_vllm:
            from engines import VLLM_VERSION, start_vllm

            vllm, vllm_url = start_vllm(minilm_path(), 64, logs / "vllm.log", name="minilm", task="embed",
                                        dtype="float32", omp_threads=None)
            asyncio.run(http_load(vllm_url, 4, texts[:16]))  # warm-up
        asyncio.run(http_load(url, 4, texts[:16]))  # warm-up
        for c in levels:
            record("modelfleet", c, asyncio.run(http_load(url, c, texts)))
            if vllm_url and c in (1, 32):
                record("vllm pooling", c, asyncio.run(http_load(vllm_url, c, texts)))
    finally:
        stop(proc)
        if vllm is not None:
            stop(vllm)
    # This machine's speed drifts by 10-20% over a minute (shared cores), so the batch-32
    # baseline is measured before and after the HTTP runs and averaged.
    after = library(32, texts)
    seconds = before["seconds"] + after["seconds"]
    record("library batch=32", 32, {**after, "requests": 2 * n, "tokens": 2 * n, "seconds": round(seconds, 3),
                                    "tokens_per_s": round(2 * n / seconds, 2),
                                    "spread": [before["tokens_per_s"], after["tokens_per_s"]]})

    def eps(system: str, c: int) -> float | None:
        return next((r["embeddings_per_s"] for r in rows if r["system"] == system and r["concurrency"] == c), None)

    ratios = {
        "modelfleet@32_vs_library_batch32": ratio(eps("modelfleet", 32), eps("library batch=32", 32)),
        "modelfleet@32_vs_library_one_at_a_time": ratio(eps("modelfleet", 32), eps("library batch=1", 1)),
        "modelfleet_vs_vllm@1": ratio(eps("modelfleet", 1), eps("vllm pooling", 1)),
        "modelfleet_vs_vllm@32": ratio(eps("modelfleet", 32), eps("vllm pooling", 32)),
    }
    goals = {"modelfleet@32_vs_library_batch32": ">= 0.85", "modelfleet_vs_vllm@1": ">= 1.0",
             "modelfleet_vs_vllm@32": ">= 1.0"}
    config = {"model": "all-MiniLM-L6-v2", "sentences": n, "levels": levels, "quick": args.quick, "goals": goals,
              "vllm": None if args.skip_vllm else VLLM_VERSION}
    config["verdicts"] = {key: verdict(value, goals.get(key, "-")) for key, value in ratios.items()}
    print()
    print_table(rows, ["system", "concurrency", "embeddings_per_s", "latency_p50_ms", "errors"])
    for key, value in ratios.items():
        print(f"{key:40s} {value}   goal {goals.get(key, '-'):8s} {config['verdicts'][key]}")

    def plot(ax) -> None:
        pts = sorted((r["concurrency"], r["embeddings_per_s"]) for r in rows if r["system"] == "modelfleet")
        ax.plot(*zip(*pts, strict=True), marker="o", label="modelfleet (HTTP, 1 sentence/request)")
        pts = sorted((r["concurrency"], r["embeddings_per_s"]) for r in rows if r["system"] == "vllm pooling")
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="s", label="vLLM pooling runner (HTTP)")
        for name, style in (("library batch=32", "--"), ("library batch=1", ":")):
            ax.axhline(eps(name, 32 if "32" in name else 1), linestyle=style, color="gray", label=name)
        finish_axes(ax, "concurrent clients", "embeddings/s", "all-MiniLM-L6-v2 embeddings")

    path = write_results("embeddings", config, rows, ratios, plot)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
