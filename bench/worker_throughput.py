"""Generated tokens/s of one worker at 1..64 concurrent HTTP clients, against baselines measured
in the same run on the same model and prompts:

  one-at-a-time   the same worker with --max-num-seqs 1
  static          padded static batching with model.generate (the practical ceiling here)
  transformers-cb transformers' own continuous batching (model.generate_batch)
  fastchat        FastChat's model_worker (bench/fastchat_baseline.py), when it can be set up
  vllm            vLLM's CPU build (`make vllm`), started as bench/engines.py starts it, at 1 and
                  32 clients right after the worker at the same concurrency

and a shared-prefix workload: 32 clients whose prompts share a ~1,500-token system prompt and
differ in a short question, time to first token with the engine's prefix cache on and off, and
over HTTP against vLLM with its prefix cache; and the KV memory in use at 32 short requests
against what the slot cache used to reserve (max_num_seqs x max_model_len).

Both engines run one OpenMP thread (the other core is the client's) in the dtype the worker picks
by default (bfloat16 on this CPU, which has AVX512-BF16; vLLM is started in bfloat16).

The model is a random-weight Llama of about 56M parameters (hidden 512, 8 layers, vocab 32000),
big enough that compute, not Python, dominates a decode step. Every request generates exactly
max_tokens (EOS ignored) with the OpenAI SDK's default sampling (temperature 1, no top-p).

    python bench/worker_throughput.py [--quick] [--workload all|throughput|shared-prefix|vs-vllm|long-prompt]

`--workload vs-vllm` runs only the two engines, alternating at 1 and 32 clients for `--rounds`
rounds, each round ending with the warm shared-prefix burst over HTTP on both (the comparison to
rerun after an engine change); `--workload long-prompt` measures how
long 8 running streams stall when a 1,500-token prompt joins them, with chunked prefill
(`--max-num-batched-tokens` 256) and without (one step takes the whole prompt).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
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

PROMPT = "Request {i}: write a long story about the sea, the ships and the people who sail them."


def prompts(n: int) -> list[str]:
    return [PROMPT.format(i=i) for i in range(n)]


# -- HTTP load against a worker ------------------------------------------------------------------

async def http_load(url: str, concurrency: int, per_client: int, max_tokens: int, stream: bool,
                    stagger: float, prompt_ids: list[list[int]] | None = None) -> dict[str, Any]:
    """`prompt_ids`, when given, are the prompts (as token ids) in order, instead of PROMPT."""
    import aiohttp

    counter = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1800)) as session:

        async def send() -> Sample:
            i = next(counter)
            prompt = prompt_ids[i % len(prompt_ids)] if prompt_ids else PROMPT.format(i=i)
            body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                    "ignore_eos": True, "temperature": 1.0, "stream": stream}
            s = Sample(tokens=0, started=time.perf_counter(), ended=0.0)
            try:
                async with session.post(url + "/v1/completions", json=body) as r:
                    if r.status != 200:
                        s.error = f"HTTP {r.status}"
                    elif stream:
                        async for line in r.content:
                            if line.startswith(b"data: {"):
                                now = time.perf_counter()
                                chunk = json.loads(line[6:])
                                if chunk["choices"] and chunk["choices"][0]["text"]:
                                    s.first_token = s.first_token or now
                                    s.token_times.append(now)
                        s.tokens = max_tokens
                    else:
                        s.tokens = (await r.json())["usage"]["completion_tokens"]
            except aiohttp.ClientError as exc:
                s.error = str(exc)
            s.ended = time.perf_counter()
            return s

        samples, wall = await closed_loop(send, concurrency, per_client, stagger)
    return summarize(samples, wall)


# -- in-process baselines ------------------------------------------------------------------------

def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelfleet.worker.allocator import keep_freed_memory
    from modelfleet.worker.loader import pick_dtype

    torch.set_grad_enabled(False)
    keep_freed_memory()  # as the worker process does, so that in-process engines match it
    tok = AutoTokenizer.from_pretrained(path)
    # the dtype the worker picks by default, so that the in-process baselines match it
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype("auto", "cpu"),
                                                 attn_implementation="sdpa").eval()
    return model, tok


def static_batching(model, tok, concurrency: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """Padded batches of `concurrency` prompts through model.generate, `rounds` times."""
    import torch

    tok.padding_side = "left"
    batch = tok(prompts(concurrency), return_tensors="pt", padding=True)
    model.generate(**batch, max_new_tokens=2, do_sample=True, pad_token_id=tok.pad_token_id)  # warm-up
    started = time.perf_counter()
    for _ in range(rounds):
        model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=True,
                       temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id)
    wall = time.perf_counter() - started
    del torch
    return {"requests": concurrency * rounds, "errors": 0, "tokens": concurrency * rounds * max_tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(concurrency * rounds * max_tokens / wall, 2)}


def transformers_cb(model, tok, concurrency: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """transformers' ContinuousBatchingManager through model.generate_batch."""
    from transformers import GenerationConfig

    inputs = [tok(p)["input_ids"] for p in prompts(concurrency)]
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              eos_token_id=-1, pad_token_id=tok.pad_token_id)
    model.generate_batch(inputs[:2], generation_config=GenerationConfig(max_new_tokens=2, eos_token_id=-1,
                                                                          pad_token_id=tok.pad_token_id))
    started = time.perf_counter()
    tokens = 0
    for _ in range(rounds):
        out = model.generate_batch(inputs, generation_config=config)
        tokens += sum(len(o.generated_tokens) for o in out.values())
    wall = time.perf_counter() - started
    return {"requests": concurrency * rounds, "errors": 0, "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2)}


async def fastchat_load(url: str, concurrency: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    import httpx
    from fastchat_baseline import fastchat_generate

    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=None)) as client:

        async def send() -> Sample:
            s = Sample(tokens=0, started=time.perf_counter(), ended=0.0)
            try:
                tokens, ttft, times = await fastchat_generate(client, url, PROMPT.format(i=next(counter)), max_tokens)
                s.tokens, s.token_times = tokens, times
                s.first_token = s.started + ttft if ttft is not None else None
            except Exception as exc:  # noqa: BLE001 - recorded as an error row
                s.error = str(exc)
            s.ended = time.perf_counter()
            return s

        samples, wall = await closed_loop(send, concurrency, per_client)
    return summarize(samples, wall)


# -- shared prefix: the prefix cache on and off --------------------------------------------------

SYSTEM_TOKENS = 1500
SYSTEM_RULE = ("Rule {i}: the harbour master assigns berth {i} to ships of the {i}th convoy, logs their cargo, "
               "and answers questions about tides, pilots, fees and customs in plain words. ")


def system_prompt_ids(tok) -> list[int]:
    ids: list[int] = []
    i = 0
    while len(ids) < SYSTEM_TOKENS:
        ids += tok(SYSTEM_RULE.format(i=i))["input_ids"]
        i += 1
    return ids[:SYSTEM_TOKENS]


def shared_prefix(model, tok, caching: bool, clients: int, max_tokens: int, warm: bool) -> dict[str, Any]:
    """A burst of `clients` requests sharing the system prompt; with `warm`, one request with the
    system prompt runs first (the steady state of a busy deployment, where it is always cached).

    In-process on the engine, because the worker's command line has no switch for the cache yet;
    TTFT here is submit -> first token event, so it leaves out HTTP, the same for both modes."""
    from modelfleet.worker.engine import EngineConfig, GenerationEngine
    from modelfleet.worker.sampling import SamplingParams
    from modelfleet.worker.sequence import GenerationRequest

    system = system_prompt_ids(tok)
    config = EngineConfig(max_model_len=model.config.max_position_embeddings, max_num_seqs=clients,
                          enable_prefix_caching=caching)
    engine = GenerationEngine(model, tok, config, [tok.eos_token_id])
    engine.start()

    async def send(ids: list[int], tokens: int) -> Sample:
        req = GenerationRequest(prompt_ids=ids, params=SamplingParams(temperature=1.0), max_tokens=tokens,
                                ignore_eos=True)
        s = Sample(tokens=0, started=time.perf_counter(), ended=0.0)
        async for event in engine.submit(req):
            if event.error:
                s.error = event.error
            for d in event.deltas:
                now = time.perf_counter()
                s.first_token = s.first_token or now
                s.token_times.append(now)
                s.tokens += len(d.token_ids)
        s.ended = time.perf_counter()
        return s

    async def burst() -> tuple[list[Sample], float]:
        if warm:
            await send(system + tok(" Question: ready?")["input_ids"], 1)
        questions = [tok(f" Question {i}: when does the ship of convoy {i} sail?")["input_ids"] for i in range(clients)]
        started = time.perf_counter()
        samples = await asyncio.gather(*(send(system + q, max_tokens) for q in questions))
        return list(samples), time.perf_counter() - started

    try:
        samples, wall = asyncio.run(burst())
    finally:
        engine.stop()
    result = summarize(samples, wall)
    if caching:
        result["prefix_cache_hit_rate"] = round(engine.stats.prefix_cache_hits / max(1, engine.stats.prefix_cache_queries), 3)
    return result


def run_shared_prefix(model, tok, quick: bool, record) -> dict[str, float | None]:
    """Cache off, then on, cold and warm; returns the TTFT p50 ratios (off / on)."""
    clients, max_tokens = 32, (16 if quick else 32)
    # Warm-up at full size: whichever run comes first otherwise pays the process's first
    # multi-GB allocations (measured: the first cache-off burst ran ~1.8x slower than the second).
    shared_prefix(model, tok, True, clients, 2, warm=True)
    ttft = {}
    for warm in (True, False):
        for caching in (False, True):
            arrival = "warm" if warm else "cold"
            row = shared_prefix(model, tok, caching, clients, max_tokens, warm)
            record("engine", "prefix-on" if caching else "prefix-off", arrival, clients, row)
            ttft[(caching, arrival)] = row["ttft_p50_ms"]
    return {f"ttft_p50_prefix_off_vs_on_{a}@32": ratio(ttft[(False, a)], ttft[(True, a)]) for a in ("warm", "cold")}


PREFIX_GOALS = {"ttft_p50_prefix_off_vs_on_warm@32": ">= 5", "ttft_p50_prefix_off_vs_on_cold@32": "-"}


def http_shared_prefix(url: str, tok, max_tokens: int, round_: int = 0) -> dict[str, Any]:
    """The warm shared-prefix burst over HTTP (streamed completions of token-id prompts): one
    request caches the system prompt, then 32 clients send it with their own question, new in
    each `round_` (a question asked before would also hit its own cached block)."""
    system = system_prompt_ids(tok)
    asyncio.run(http_load(url, 1, 1, 1, True, 0, prompt_ids=[system + tok(" Question: ready?")["input_ids"]]))
    questions = [system + tok(f" Question {i}: when does the ship of convoy {i} sail?")["input_ids"]
                 for i in range(32 * round_, 32 * (round_ + 1))]
    return asyncio.run(http_load(url, 32, 1, max_tokens, True, 0, prompt_ids=questions))


def kv_in_use(model, tok, clients: int, max_tokens: int, max_num_seqs: int = 64) -> dict[str, Any]:
    """Peak KV of `clients` short requests on the engine in-process: the tokens its rows hold
    (what `vllm:kv_cache_usage_perc` counts) and the token slots its buffers take, against the
    max_num_seqs x max_model_len slots the slot cache used to size its gauge by."""
    from modelfleet.worker.engine import EngineConfig, GenerationEngine
    from modelfleet.worker.sampling import SamplingParams
    from modelfleet.worker.sequence import GenerationRequest

    max_model_len = model.config.max_position_embeddings
    engine = GenerationEngine(model, tok, EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs),
                              [tok.eos_token_id])
    peak = {"used": 0, "allocated": 0, "usage": 0.0}

    def watch(name: str, value: float) -> None:  # on the engine thread, after each step
        peak["used"] = max(peak["used"], engine.pool.used_tokens())
        peak["allocated"] = max(peak["allocated"], engine.pool.allocated_tokens())
        peak["usage"] = max(peak["usage"], engine.pool.used_tokens() / engine.kv_budget_tokens)

    engine.observe = watch
    engine.start()

    async def burst() -> None:
        async def one(i: int) -> None:
            req = GenerationRequest(prompt_ids=tok(PROMPT.format(i=i))["input_ids"],
                                    params=SamplingParams(temperature=1.0), max_tokens=max_tokens, ignore_eos=True)
            async for _ in engine.submit(req):
                pass

        await asyncio.gather(*(one(i) for i in range(clients)))

    try:
        asyncio.run(burst())
    finally:
        engine.stop()
    reserved = max_num_seqs * max_model_len
    return {"clients": clients, "max_tokens": max_tokens, "old_slot_reservation_tokens": reserved,
            "peak_used_tokens": peak["used"], "peak_allocated_tokens": peak["allocated"],
            "peak_kv_cache_usage_perc": round(peak["usage"], 5), "budget_tokens": engine.kv_budget_tokens,
            "token_bytes": engine.kv_token_bytes,
            "used_vs_reservation": round(peak["used"] / reserved, 4),
            "allocated_vs_reservation": round(peak["allocated"] / reserved, 4)}


def verdict(value: float | None, goal: str) -> str:
    """'met', or by how much the goal is missed (goals read '>= x' or '<= x')."""
    if value is None or goal[:2] not in (">=", "<="):
        return ""
    target = float(goal[2:])
    if (value >= target) if goal.startswith(">=") else (value <= target):
        return "met"
    return f"short by {abs(target - value) / target:.0%}"


def main_shared_prefix(quick: bool) -> int:
    from modelfleet.demo import BENCH_SPEC, ensure_demo_model

    print(f"building/loading the bench model ({BENCH_SPEC.name})", flush=True)
    model, tok = load_model(ensure_demo_model(BENCH_SPEC))
    rows: list[dict[str, Any]] = []

    def record(system: str, mode: str, arrival: str, concurrency: int, result: dict[str, Any]) -> None:
        rows.append({"system": system, "mode": mode, "arrival": arrival, "concurrency": concurrency, **result})
        print(f"  {system} {mode:10s} {arrival:5s} c={concurrency}  ttft p50 {result['ttft_p50_ms']} ms, "
              f"p95 {result['ttft_p95_ms']} ms, {result['tokens_per_s']} tok/s", flush=True)

    ratios = run_shared_prefix(model, tok, quick, record)
    print()
    print_table(rows, [*COLUMNS, "prefix_cache_hit_rate"])
    print()
    for key, value in ratios.items():
        print(f"{key:36s} {value if value is not None else '-':>8}   goal {PREFIX_GOALS[key]}")
    config = {"model": BENCH_SPEC.key(), "system_prompt_tokens": SYSTEM_TOKENS, "quick": quick,
              "goals": PREFIX_GOALS}

    def plot(ax) -> None:
        labels = [f"{r['mode']}\n{r['arrival']}" for r in rows]
        ax.bar(labels, [r["ttft_p50_ms"] or 0 for r in rows])  # not a concurrency sweep: no finish_axes
        ax.set_xlabel("prefix cache; system prompt cached before the burst (warm) or not (cold)")
        ax.set_ylabel("TTFT p50 (ms)")
        ax.set_title(f"32 clients sharing a {SYSTEM_TOKENS}-token system prompt, {BENCH_SPEC.name}")
        ax.grid(alpha=0.3, axis="y")

    path = write_results("worker_shared_prefix", config, rows, ratios, plot)
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 0


def tree_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a server process and its children (vLLM's engine core)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def main_vs_vllm(quick: bool, rounds: int, variant_args: tuple[str, ...] = ()) -> int:
    """modelfleet's worker and vLLM's CPU build, both up, alternating at 1 and 32 clients; with
    `variant_args`, a second worker started with them takes its turn beside them."""
    from engines import VLLM_VERSION, start_vllm
    from transformers import AutoTokenizer

    from modelfleet.demo import BENCH_SPEC, ensure_demo_model

    os.environ["OMP_NUM_THREADS"] = "1"
    max_tokens = 32 if quick else 64
    model_dir = ensure_demo_model(BENCH_SPEC)
    logs = Path(tempfile.mkdtemp(prefix="bench-vs-vllm-"))
    rows: list[dict[str, Any]] = []
    proc, url = start_worker(model_dir, "bench", "--max-num-seqs", "64", log=logs / "worker.log")
    variant = f"modelfleet {' '.join(variant_args)}"
    vllm = other = None
    try:
        systems = [("modelfleet", url)]
        if variant_args:
            other, other_url = start_worker(model_dir, "bench", "--max-num-seqs", "64", *variant_args,
                                            log=logs / "worker-variant.log")
            systems.append((variant, other_url))
        vllm, vllm_url = start_vllm(model_dir, 64, logs / "vllm.log")
        systems.append(("vllm", vllm_url))
        pids = {"modelfleet": proc.pid, variant: other.pid if other else 0, "vllm": vllm.pid}
        for _, target in systems:
            asyncio.run(http_load(target, 32, 1, 8, False, 0))  # warm-up, at full width
        tok = AutoTokenizer.from_pretrained(model_dir)
        for r in range(rounds):
            for c in (1, 32):
                for system, target in systems:
                    cpu = tree_cpu_seconds(pids[system])
                    result = asyncio.run(http_load(target, c, 4 if c == 1 else 1, max_tokens, False, 0))
                    cpu = tree_cpu_seconds(pids[system]) - cpu
                    result["tokens_per_cpu_s"] = round(result["tokens"] / cpu, 2) if cpu > 0 else None
                    rows.append({"system": system, "mode": "plain", "arrival": f"round-{r}", "concurrency": c,
                                 **result})
                    print(f"  round {r} {system:10s} c={c:<3d} {result['tokens_per_s']:8.1f} tok/s, "
                          f"{result['tokens_per_cpu_s']} tok per CPU-s (load {os.getloadavg()[0]:.1f})", flush=True)
            for system, target in systems:  # both with their prefix cache on (their defaults)
                result = http_shared_prefix(target, tok, max_tokens // 2, r)
                rows.append({"system": system, "mode": "prefix-on", "arrival": f"warm-http-{r}", "concurrency": 32,
                             **result})
                print(f"  round {r} {system:10s} shared prefix, c=32: ttft p50 {result['ttft_p50_ms']} ms, "
                      f"itl p50 {result['itl_p50_ms']} ms", flush=True)
    finally:
        stop(proc)
        for p in (other, vllm):
            if p is not None:
                stop(p)

    def median_tps(system: str, c: int, key: str = "tokens_per_s", mode: str = "plain") -> float:
        return statistics.median(r[key] for r in rows if (r["system"], r["concurrency"], r["mode"]) == (system, c, mode))

    ratios = {f"modelfleet_vs_vllm@{c}": ratio(median_tps("modelfleet", c), median_tps("vllm", c)) for c in (1, 32)}
    goals = {"modelfleet_vs_vllm@1": ">= 0.9", "modelfleet_vs_vllm@32": ">= 1.0"}
    # time to first token: the lower the better, so vLLM's over ours
    ratios["shared_prefix_ttft_p50_vllm_vs_modelfleet@32"] = ratio(median_tps("vllm", 32, "ttft_p50_ms", "prefix-on"),
                                                                   median_tps("modelfleet", 32, "ttft_p50_ms",
                                                                              "prefix-on"))
    goals["shared_prefix_ttft_p50_vllm_vs_modelfleet@32"] = ">= 0.9"
    for c in (1, 32):  # the same per CPU-second the servers used: what other work on the machine distorts least
        ratios[f"modelfleet_vs_vllm_per_cpu_s@{c}"] = ratio(median_tps("modelfleet", c, "tokens_per_cpu_s"),
                                                            median_tps("vllm", c, "tokens_per_cpu_s"))
        goals[f"modelfleet_vs_vllm_per_cpu_s@{c}"] = "-"
    if variant_args:
        for c in (1, 32):
            ratios[f"variant_vs_vllm@{c}"] = ratio(median_tps(variant, c), median_tps("vllm", c))
            ratios[f"modelfleet_vs_variant@{c}"] = ratio(median_tps("modelfleet", c), median_tps(variant, c))
            ratios[f"modelfleet_vs_variant_per_cpu_s@{c}"] = ratio(median_tps("modelfleet", c, "tokens_per_cpu_s"),
                                                                   median_tps(variant, c, "tokens_per_cpu_s"))
            goals[f"modelfleet_vs_variant_per_cpu_s@{c}"] = "-"
            goals[f"variant_vs_vllm@{c}"] = goals[f"modelfleet_vs_vllm@{c}"]
            goals[f"modelfleet_vs_variant@{c}"] = "-"
    print()
    print_table(rows, COLUMNS)
    for key, value in ratios.items():
        print(f"{key:30s} {value:>8}   goal {goals[key]:8s} {verdict(value, goals[key])} (medians over {rounds} rounds)")
    config = {"model": BENCH_SPEC.key(), "vllm": VLLM_VERSION, "max_tokens": max_tokens, "rounds": rounds,
              "omp_threads": 1, "goals": goals, "variant": list(variant_args)}

    def plot(ax) -> None:
        for system, _ in systems:
            for r in range(rounds):
                pts = [(x["concurrency"], x["tokens_per_s"]) for x in rows
                       if x["system"] == system and x["arrival"] == f"round-{r}"]
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{system} round {r}")
        finish_axes(ax, "concurrent clients", "generated tokens/s", f"modelfleet vs vLLM, {BENCH_SPEC.name}")

    path = write_results("worker_vs_vllm", config, rows, ratios, plot)
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 0


def long_prompt_stall(model, tok, budget: int, streams: int, prompt_tokens: int) -> dict[str, Any]:
    """`streams` streams decode; once each has a few tokens, a `prompt_tokens` prompt arrives.
    Returns the streams' longest inter-token gap while it was admitted, and the long prompt's TTFT."""
    from modelfleet.worker.engine import EngineConfig, GenerationEngine
    from modelfleet.worker.sampling import SamplingParams
    from modelfleet.worker.sequence import GenerationRequest

    engine = GenerationEngine(model, tok, EngineConfig(max_model_len=model.config.max_position_embeddings,
                                                       max_num_seqs=streams + 1, max_num_batched_tokens=budget,
                                                       enable_prefix_caching=False), [tok.eos_token_id])
    engine.start()
    long_ids = system_prompt_ids(tok)[:prompt_tokens]

    async def send(ids: list[int], tokens: int, ready: asyncio.Event | None = None) -> Sample:
        req = GenerationRequest(prompt_ids=ids, params=SamplingParams(temperature=1.0), max_tokens=tokens,
                                ignore_eos=True)
        s = Sample(tokens=0, started=time.perf_counter(), ended=0.0)
        async for event in engine.submit(req):
            for d in event.deltas:
                now = time.perf_counter()
                s.first_token = s.first_token or now
                s.token_times.append(now)
                s.tokens += len(d.token_ids)
                if ready is not None and s.tokens >= 4:
                    ready.set()
        s.ended = time.perf_counter()
        return s

    async def scenario() -> tuple[list[Sample], Sample]:
        ready = [asyncio.Event() for _ in range(streams)]
        running = [asyncio.create_task(send(tok(PROMPT.format(i=i))["input_ids"], 64, ready[i]))
                   for i in range(streams)]
        for event in ready:
            await event.wait()
        joined = await send(long_ids, 1)
        return list(await asyncio.gather(*running)), joined

    try:
        running, joined = asyncio.run(scenario())
    finally:
        engine.stop()
    pairs = [(a, b) for s in running for a, b in itertools.pairwise(s.token_times)]
    # while the long prompt was admitted (its prefill, up to its first token), and after it joined:
    # then every row of the slot cache is as wide as the long prompt, chunked or not
    during = [b - a for a, b in pairs if b > joined.started and a < joined.first_token]
    after = [b - a for a, b in pairs if a >= joined.first_token]
    chunks = sum(1 for r in engine.step_log if r.chunked)
    return {"budget": budget, "streams": streams, "prompt_tokens": len(long_ids),
            "max_gap_ms": round(max(during) * 1000, 1), "gap_p50_after_ms": round(statistics.median(after) * 1000, 1),
            "long_prompt_ttft_ms": round((joined.first_token - joined.started) * 1000, 1), "chunked_steps": chunks}


def main_long_prompt() -> int:
    from modelfleet.demo import BENCH_SPEC, ensure_demo_model

    os.environ["OMP_NUM_THREADS"] = "1"
    model, tok = load_model(ensure_demo_model(BENCH_SPEC))
    long_prompt_stall(model, tok, 256, 8, 300)  # warm-up: the first run pays the process's first allocations
    rows = []
    for budget in (256, 4096, 256, 4096):  # interleaved: this machine drifts
        row = long_prompt_stall(model, tok, budget, 8, SYSTEM_TOKENS)
        rows.append(row)
        print(f"  {row}", flush=True)
    by = {b: [r for r in rows if r["budget"] == b] for b in (256, 4096)}
    ratios = {"max_stall_unchunked_over_chunked": ratio(min(r["max_gap_ms"] for r in by[4096]),
                                                        max(r["max_gap_ms"] for r in by[256]))}
    print(ratios)
    path = write_results("worker_long_prompt", {"model": BENCH_SPEC.key(), "omp_threads": 1}, rows, ratios,
                         lambda ax: ax.bar([f"budget {r['budget']}" for r in rows], [r["max_gap_ms"] for r in rows]))
    print(f"\nwrote {path}")
    return 0


COLUMNS = ["system", "mode", "arrival", "concurrency", "tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms",
           "itl_p95_ms", "errors"]


# -- the run -------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, a few minutes per workload on 2 cores")
    parser.add_argument("--skip-fastchat", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true", help="leave out vLLM (needs `make vllm`)")
    parser.add_argument("--workload", choices=["all", "throughput", "shared-prefix", "vs-vllm", "long-prompt"],
                        default="all")
    parser.add_argument("--rounds", type=int, default=2, help="vs-vllm: rounds of both engines at 1 and 32")
    parser.add_argument("--variant-arg", action="append", default=[], metavar="ARG",
                        help="vs-vllm: also run a second worker with this argument (repeatable), e.g. "
                             "--variant-arg=--no-prepack-weights")
    args = parser.parse_args()
    if args.workload == "vs-vllm":
        return main_vs_vllm(args.quick, args.rounds, tuple(args.variant_arg))
    if args.workload == "long-prompt":
        return main_long_prompt()

    from modelfleet.demo import BENCH_SPEC, ensure_demo_model

    if args.workload == "shared-prefix":
        return main_shared_prefix(args.quick)
    # one OpenMP thread for every engine, vLLM's as bench/engines.py runs it: the other core
    # is the clients'. Set before torch starts, for the in-process baselines too.
    os.environ["OMP_NUM_THREADS"] = "1"
    levels = [1, 8, 32] if args.quick else [1, 8, 32, 64]
    max_tokens = 32 if args.quick else 64
    per_client = 1 if args.quick else 2
    config = {"model": BENCH_SPEC.key(), "levels": levels, "max_tokens": max_tokens, "per_client": per_client,
              "sampling": "temperature=1.0, EOS ignored", "quick": args.quick, "omp_threads": 1,
              "dtype": "worker default (bfloat16 here), vLLM bfloat16"}
    print(f"building/loading the bench model ({BENCH_SPEC.name})", flush=True)
    model_dir = ensure_demo_model(BENCH_SPEC)
    logs = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    rows: list[dict[str, Any]] = []

    def record(system: str, mode: str, arrival: str, concurrency: int, result: dict[str, Any]) -> None:
        row = {"system": system, "mode": mode, "arrival": arrival, "concurrency": concurrency, **result}
        rows.append(row)
        print(f"  {system:16s} {mode:6s} {arrival:9s} c={concurrency:<3d} {row['tokens_per_s']:8.1f} tok/s"
              + (f"  ttft p50 {row.get('ttft_p50_ms')} ms, itl p50 {row.get('itl_p50_ms')} ms"
                 if row.get("itl_p50_ms") else ""), flush=True)

    # This shared machine's speed drifts by 10-20% within minutes, so the comparisons the goals
    # rest on are measured side by side: the one-at-a-time worker runs right after the batching
    # worker at the same concurrency (both processes up, the idle one asleep), and plain
    # `generate` at 1 client runs before and after the workers.
    model, tok = load_model(model_dir)
    static_one = [static_batching(model, tok, 1, max_tokens, 4)]
    print("modelfleet worker (continuous batching), and the same worker one request at a time "
          "(--max-num-seqs 1)", flush=True)
    proc, url = start_worker(model_dir, "bench", "--max-num-seqs", "64", log=logs / "worker.log")
    serial, serial_url = start_worker(model_dir, "bench", "--max-num-seqs", "1", log=logs / "serial.log")
    vllm = vllm_url = None
    try:
        if not args.skip_vllm:
            from engines import VLLM_VERSION, start_vllm

            vllm, vllm_url = start_vllm(model_dir, 64, logs / "vllm.log")
            config["vllm"] = VLLM_VERSION
            asyncio.run(http_load(vllm_url, 32, 1, 8, False, 0))  # warm-up, at full width
        asyncio.run(http_load(url, 32, 1, 8, False, 0))  # warm-up: the KV cache grows to 32 rows
        asyncio.run(http_load(serial_url, 1, 1, 4, False, 0))
        for c in levels:
            record("modelfleet", "plain", "burst", c, asyncio.run(http_load(url, c, per_client * (4 if c == 1 else 1),
                                                                            max_tokens, False, 0)))
            if vllm_url and c in (1, 32):
                record("vllm", "plain", "burst", c, asyncio.run(
                    http_load(vllm_url, c, per_client * (4 if c == 1 else 1), max_tokens, False, 0)))
            if c in (1, 32):
                record("one-at-a-time", "plain", "burst", c, asyncio.run(
                    http_load(serial_url, c, 4 if c == 1 else 1, max_tokens, False, 0)))
            record("modelfleet", "stream", "burst", c, asyncio.run(http_load(url, c, per_client, max_tokens, True, 0)))
            if c > 1:
                record("modelfleet", "stream", "staggered", c,
                       asyncio.run(http_load(url, c, per_client, max_tokens, True, stagger=2.0)))
        if vllm_url and args.workload == "all":
            print("shared prefix over HTTP, both engines with their prefix cache", flush=True)
            tok_only = load_model(model_dir)[1]
            for system, target in (("modelfleet", url), ("vllm", vllm_url)):
                record(system, "prefix-on", "warm-http", 32, http_shared_prefix(target, tok_only, 16 if args.quick else 32))
    finally:
        stop(proc)
        stop(serial)
        if vllm is not None:
            stop(vllm)

    print("in-process baselines: static batching and transformers' continuous batching", flush=True)
    static_one.append(static_batching(model, tok, 1, max_tokens, 4))
    for c in levels:
        if c == 1:
            seconds = sum(r["seconds"] for r in static_one)
            tokens = sum(r["tokens"] for r in static_one)
            record("static", "plain", "burst", 1, {**static_one[-1], "seconds": round(seconds, 3), "tokens": tokens,
                                                   "tokens_per_s": round(tokens / seconds, 2),
                                                   "spread": [r["tokens_per_s"] for r in static_one]})
        else:
            record("static", "plain", "burst", c, static_batching(model, tok, c, max_tokens, per_client))
    for c in levels:
        try:
            record("transformers-cb", "plain", "burst", c, transformers_cb(model, tok, c, max_tokens, per_client))
        except Exception as exc:  # noqa: BLE001 - a baseline failing is reported, not fatal
            print(f"  transformers-cb failed at c={c}: {exc}", flush=True)
    print("KV memory in use at 32 short requests", flush=True)
    config["kv_in_use"] = kv = kv_in_use(model, tok, 32, max_tokens)
    print(f"  {kv}", flush=True)
    prefix_ratios = {}
    if args.workload == "all":
        print("shared prefix: the engine's prefix cache off and on", flush=True)
        prefix_ratios = run_shared_prefix(model, tok, args.quick, record)
    del model

    if not args.skip_fastchat:
        print("FastChat model_worker", flush=True)
        try:
            from common import free_port
            from fastchat_baseline import start_fastchat_worker
            port = free_port()
            fc = start_fastchat_worker(model_dir, port, logs / "fastchat.log")
            try:
                for c in (1, 32):
                    record("fastchat", "stream", "burst", c,
                           asyncio.run(fastchat_load(f"http://127.0.0.1:{port}", c, 1 if c > 1 else 4, max_tokens)))
            finally:
                stop(fc)
        except Exception as exc:  # noqa: BLE001 - reported in the results as missing
            print(f"  FastChat baseline unavailable: {exc}", flush=True)
            config["fastchat_error"] = str(exc)[:500]

    def tps(system: str, c: int, mode: str = "plain", arrival: str = "burst", key: str = "tokens_per_s"):
        for r in rows:
            if (r["system"], r["concurrency"], r["mode"], r["arrival"]) == (system, c, mode, arrival):
                return r[key]
        return None

    ratios = {
        "modelfleet_vs_one_at_a_time@32": ratio(tps("modelfleet", 32), tps("one-at-a-time", 32)),
        "modelfleet_vs_static@32": ratio(tps("modelfleet", 32), tps("static", 32)),
        "modelfleet_vs_transformers_cb@32": ratio(tps("modelfleet", 32), tps("transformers-cb", 32)),
        "modelfleet_vs_fastchat@32": ratio(tps("modelfleet", 32, "stream"), tps("fastchat", 32, "stream")),
        "token_cost_vs_generate@1": ratio(tps("static", 1), tps("modelfleet", 1)),
        **prefix_ratios,
        "modelfleet_vs_vllm@1": ratio(tps("modelfleet", 1), tps("vllm", 1)),
        "modelfleet_vs_vllm@32": ratio(tps("modelfleet", 32), tps("vllm", 32)),
        # vLLM's TTFT over ours: >= 0.9 means ours is at most 1/0.9 of vLLM's
        "ttft_p50_shared_prefix_vllm_over_modelfleet@32": ratio(
            tps("vllm", 32, "prefix-on", "warm-http", "ttft_p50_ms"),
            tps("modelfleet", 32, "prefix-on", "warm-http", "ttft_p50_ms")),
        "kv_in_use_vs_slot_reservation@32": kv["used_vs_reservation"],
        "kv_allocated_vs_slot_reservation@32": kv["allocated_vs_reservation"],
    }
    goals = {**PREFIX_GOALS, "modelfleet_vs_one_at_a_time@32": ">= 10", "modelfleet_vs_static@32": ">= 0.85",
             "modelfleet_vs_transformers_cb@32": ">= 1.8", "modelfleet_vs_fastchat@32": ">= 8",
             "token_cost_vs_generate@1": "<= 1.1", "modelfleet_vs_vllm@1": ">= 0.9", "modelfleet_vs_vllm@32": ">= 1.0",
             "ttft_p50_shared_prefix_vllm_over_modelfleet@32": ">= 0.9",
             "kv_in_use_vs_slot_reservation@32": "<= 0.125", "kv_allocated_vs_slot_reservation@32": "<= 0.125"}
    config["goals"] = goals
    print()
    print_table(rows, COLUMNS)
    print()
    config["verdicts"] = {key: verdict(value, goals[key]) for key, value in ratios.items()}
    for key, value in ratios.items():
        print(f"{key:46s} {value if value is not None else '-':>8}   goal {goals[key]:8s} {config['verdicts'][key]}")

    def plot(ax) -> None:
        for system in dict.fromkeys(r["system"] for r in rows):
            pts = [(r["concurrency"], r["tokens_per_s"]) for r in rows
                   if r["system"] == system and r["arrival"] == "burst"
                   and r["mode"] == ("stream" if system == "fastchat" else "plain")]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=system)
        finish_axes(ax, "concurrent clients", "generated tokens/s", f"worker throughput, {BENCH_SPEC.name}, {max_tokens} tokens/request")

    path = write_results("worker_throughput", config, rows, ratios, plot)
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
