"""What constrained decoding costs: generated tokens/s of one worker with and without a JSON
schema, at 1 and 32 concurrent chat clients (issue 7's goal: under 20% at 32).

The model is the benchmark Llama (random weights, vocab 32000). The schema holds one unbounded
string, so the random model writes inside it until max_tokens: the mask is computed at every
step, in the state where it allows the most tokens (the costliest to fill and apply). Without
a schema the same requests ignore EOS, so both sides generate the same number of tokens.
Plain and schema runs alternate, `repeats` times per level after a warm-up of each, and the
median run counts: the 2-core machine is shared, and load from elsewhere moves single runs by
tens of percent.

    python bench/structured.py [--quick]
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

from common import Sample, closed_loop, print_table, ratio, start_worker, stop, summarize, write_results  # noqa: E402

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"],
          "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA, "strict": True}}


async def chat_load(url: str, concurrency: int, per_client: int, max_tokens: int, schema: bool) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800, connect=10), limits=limits) as client:

        async def send() -> Sample:
            body: dict[str, Any] = {"model": "bench", "max_tokens": max_tokens, "ignore_eos": True,
                                    "temperature": 1.0,
                                    "messages": [{"role": "user", "content": "Tell a story about the sea."}]}
            if schema:
                body["response_format"] = FORMAT
            s = Sample(tokens=0, started=time.perf_counter(), ended=0.0)
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                s.tokens = r.json()["usage"]["completion_tokens"]
            s.ended = time.perf_counter()
            return s

        samples, wall = await closed_loop(send, concurrency, per_client)
    return summarize(samples, wall)


def measured(url: str, level: int, per_client: int, max_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Median of alternating runs per mode, after one warm-up of each (first-use costs such as
    llguidance's token trie and lazily built lexer tables are not throughput)."""
    for schema in (False, True):
        asyncio.run(chat_load(url, level, 1, max_tokens // 4 or 1, schema))
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(repeats):
        for schema in (False, True):
            runs[schema].append(asyncio.run(chat_load(url, level, per_client, max_tokens, schema)))
    rows = []
    for schema, results in runs.items():
        results.sort(key=lambda r: r["tokens_per_s"])
        median = results[len(results) // 2]
        rows.append({"mode": "json_schema" if schema else "plain", "concurrency": level, **median,
                     "runs_tokens_per_s": [r["tokens_per_s"] for r in results]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and requests (under 5 minutes)")
    args = parser.parse_args()

    from modelfleet.demo import BENCH_SPEC, ensure_demo_model

    levels = [1, 32]
    max_tokens = 32 if args.quick else 128
    per_client = {1: 3 if args.quick else 8, 32: 1 if args.quick else 2}
    repeats = 3
    config = {"model": BENCH_SPEC.key(), "levels": levels, "max_tokens": max_tokens, "per_client": per_client,
              "repeats": repeats, "schema": SCHEMA, "quick": args.quick}
    print(f"building/loading the bench model ({BENCH_SPEC.name})", flush=True)
    model_dir = ensure_demo_model(BENCH_SPEC)
    logs = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    rows: list[dict[str, Any]] = []
    proc, url = start_worker(model_dir, "bench", "--max-num-seqs", "64", log=logs / "worker.log")
    try:
        for level in levels:
            level_rows = measured(url, level, per_client[level], max_tokens, repeats)
            rows += level_rows
            print_table(level_rows, ["mode", "concurrency", "tokens_per_s", "runs_tokens_per_s", "errors"])
    finally:
        stop(proc)

    def tps(mode: str, level: int) -> float | None:
        return next((r["tokens_per_s"] for r in rows if r["mode"] == mode and r["concurrency"] == level), None)

    ratios: dict[str, Any] = {}
    for level in levels:
        kept = ratio(tps("json_schema", level), tps("plain", level))
        ratios[f"schema_over_plain_at_{level}"] = kept
        ratios[f"schema_cost_at_{level}"] = round(1 - kept, 3) if kept is not None else None
    ratios["goal_schema_cost_at_32_under_0.2"] = (ratios["schema_cost_at_32"] is not None
                                                  and ratios["schema_cost_at_32"] < 0.2)

    def plot(ax) -> None:
        for mode in ("plain", "json_schema"):
            ax.plot(levels, [tps(mode, lv) for lv in levels], marker="o", label=mode)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("generated tokens/s")
        ax.set_xscale("log", base=2)
        ax.set_title("Worker throughput with and without a JSON schema")
        ax.legend()

    path = write_results("structured", config, rows, ratios, plot)
    print_table(rows, ["mode", "concurrency", "tokens_per_s", "ttft_p50_ms", "latency_p50_ms", "errors"])
    print(ratios)
    print(f"results: {path}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
