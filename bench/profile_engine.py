"""Where the milliseconds of one engine step go: a decode step at 1 and at 32 sequences (and at 32
with one or four 1,500-token rows among them, read by groups or whole, and at 32 on one cached
system prompt, with and without cascade attention), and a prefill, on the
bench model (worker_throughput.py's 56M Llama), in-process, one OpenMP thread.

The engine's own loop is driven step by step from this thread (its thread is never started), so
that wall-clock timers around the parts of a step (model forward, sampling, the rest) and
torch's profiler (operator self-times) see exactly one step at a time. Writes a markdown summary.

    OMP_NUM_THREADS=1 python bench/profile_engine.py [--out bench/profiles/engine-step.md] [--steps 30]
                                                     [--no-prepack-weights]

The model runs as the worker loads it: linear layers on oneDNN-packed weights
(worker/fastlinear.py), RMSNorms fused (worker/fastops.py) and decode steps through the fused
decode function (worker/fastdecode.py), unless `--no-prepack-weights`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

PROMPT = "Request {i}: write a long story about the sea, the ships and the people who sail them."


class Timers:
    """Wall time per label, per engine step."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - started
        return timed


class TimedModel:
    """The model, its calls timed; every other attribute is the model's."""

    def __init__(self, model, timers: Timers) -> None:
        self.__dict__["_model"], self.__dict__["_call"] = model, timers.wrap("model forward", model)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def build(model, tok, max_num_seqs: int, budget: int, fused: bool):
    from modelfleet.worker import engine as engine_module
    from modelfleet.worker.engine import EngineConfig, GenerationEngine

    engine = GenerationEngine(model, tok, EngineConfig(max_model_len=2048, max_num_seqs=max_num_seqs,
                                                       max_num_batched_tokens=budget,
                                                       enable_prefix_caching=False, fused_decode=fused),
                              [tok.eos_token_id])
    timers = Timers()
    engine.model = TimedModel(model, timers)
    if engine.fused_decode is not None:  # decode steps of a Llama-family model (worker/fastdecode.py)
        engine.fused_decode = timers.wrap("model forward", engine.fused_decode)
    engine_module.sample = timers.wrap("sample()", engine_module.sample)
    return engine, timers


def submit(engine, loop, ids: list[int], max_tokens: int) -> None:
    from modelfleet.worker.sampling import SamplingParams
    from modelfleet.worker.sequence import GenerationRequest, RequestState

    req = GenerationRequest(prompt_ids=ids, params=SamplingParams(temperature=1.0), max_tokens=max_tokens,
                            ignore_eos=True)
    engine.waiting.append(RequestState(req, (loop, asyncio.Queue())))


def step(engine) -> None:
    engine._admit()
    if engine.rows:
        engine._decode_step()
    engine.outbox.clear()


def op_table(prof, limit: int = 14) -> str:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    lines = ["| operator | calls | self CPU ms | share |", "| --- | ---: | ---: | ---: |"]
    for e in events[:limit]:
        lines.append(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1000:.1f} | {e.self_cpu_time_total / total:.0%} |")
    return "\n".join(lines)


def profile_decode(model, tok, loop, rows: int, steps: int, fused: bool) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine, timers = build(model, tok, max(rows, 1), 4096, fused)
    for i in range(rows):
        submit(engine, loop, tok(PROMPT.format(i=i))["input_ids"], steps * 3 + 20)
    step(engine)  # the prefill, and the first decode
    for _ in range(5):
        step(engine)
    timers.total.clear()
    walls, cpus = [], []
    for _ in range(steps):
        started, cpu = time.perf_counter(), time.thread_time()
        step(engine)
        walls.append(time.perf_counter() - started)
        cpus.append(time.thread_time() - cpu)
    wall = sum(walls)
    forward = timers.total["model forward"]
    sampling = timers.total["sample()"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(engine)
    del torch
    rest = wall - forward - sampling
    per = 1000 / steps
    out = [f"### Decode step, {rows} sequence{'s' if rows > 1 else ''} (columns ~{engine.pool.cursor})", "",
           f"Median step {statistics.median(walls) * 1000:.1f} ms ({rows / statistics.median(walls):.0f} tokens/s), "
           f"{statistics.median(cpus) * 1000:.1f} ms of the thread's CPU time (what other work on the machine "
           "inflates least); "
           f"mean {wall * per:.1f} ms, of which model forward {forward * per:.1f} ms ({forward / wall:.0%}), "
           f"sample() {sampling * per:.1f} ms ({sampling / wall:.0%}), the engine's own Python and tensor "
           f"bookkeeping (inputs, mask, penalties bookkeeping, detokenising, events) {rest * per:.1f} ms "
           f"({rest / wall:.0%}).", "",
           f"torch.profiler over {steps} further steps (self CPU time, all operators):", "", op_table(prof), ""]
    return "\n".join(out)


def profile_mixed(model, tok, loop, long_rows: int, steps: int, fused: bool) -> str:
    """32 decoding rows of which `long_rows` hold a 1,500-token prompt: the step with the rows read
    by groups (SlotPool.decode_groups, what the worker does) against whole rows, interleaved."""
    from worker_throughput import system_prompt_ids

    engine, _ = build(model, tok, 32, 4096, fused)
    long_ids = system_prompt_ids(tok)
    for i in range(32):
        ids = long_ids + tok(f" Question {i}?")["input_ids"] if i < long_rows else tok(PROMPT.format(i=i))["input_ids"]
        submit(engine, loop, ids, 2 * steps + 40)
    while len(engine.rows) < 32:
        step(engine)
    for _ in range(3):
        step(engine)
    grouped = engine.pool.decode_groups
    groups = grouped()
    cpus: dict[str, list[float]] = {"grouped": [], "whole": []}
    for i in range(2 * steps):
        mode = ("grouped", "whole")[i % 2]
        engine.pool.decode_groups = grouped if mode == "grouped" else (lambda: None)
        cpu = time.thread_time()
        step(engine)
        cpus[mode].append(time.thread_time() - cpu)
    whole, by_groups = (statistics.median(cpus[m]) * 1000 for m in ("whole", "grouped"))
    sizes = "whole rows (no grouping pays)" if groups is None else " and ".join(f"{len(g.rows)} rows over "
                                                                                  f"{g.end - g.start} columns"
                                                                                  for g in groups)
    return "\n".join([
        f"### Decode step, 32 sequences, {long_rows} of them 1,500 tokens long (columns {engine.pool.columns})", "",
        f"Attention by groups ({sizes}): median {by_groups:.1f} ms of the thread's CPU time a step, against "
        f"{whole:.1f} ms reading every row whole ({whole / by_groups:.2f}x), {steps} steps each, interleaved.", ""])


def profile_shared_prefix(model, tok, loop, steps: int) -> str:
    """32 decoding rows on one cached 1,500-token system prompt: the step with cascade attention
    (one copy of the prefix read for all rows, engine._shared_prefix, what the worker does)
    against every row reading its own, interleaved."""
    from worker_throughput import system_prompt_ids

    from modelfleet.worker.engine import EngineConfig, GenerationEngine

    engine = GenerationEngine(model, tok, EngineConfig(max_model_len=2048, max_num_seqs=32), [tok.eos_token_id])
    system = system_prompt_ids(tok)
    submit(engine, loop, system, 1)  # cached first, as a warm server has it
    while engine.waiting or engine.rows or engine.partial:
        step(engine)
    for i in range(32):
        submit(engine, loop, system + tok(f" Question {i}: when is high tide at pier {i}?")["input_ids"], 2 * steps + 40)
    while len(engine.rows) < 32:
        step(engine)
    cascade = engine._shared_prefix
    shared = cascade()
    cpus: dict[str, list[float]] = {"cascade": [], "whole": []}
    for i in range(2 * steps):
        mode = ("cascade", "whole")[i % 2]
        engine._shared_prefix = cascade if mode == "cascade" else (lambda: None)
        cpu = time.thread_time()
        step(engine)
        cpus[mode].append(time.thread_time() - cpu)
    whole, by_cascade = (statistics.median(cpus[m]) * 1000 for m in ("whole", "cascade"))
    return "\n".join([
        f"### Decode step, 32 sequences on one cached 1,500-token system prompt (columns {engine.pool.columns})", "",
        f"Cascade attention (one copy of the {shared.length if shared else 0} shared tokens read for all rows): "
        f"median {by_cascade:.1f} ms of the thread's CPU time a step, against {whole:.1f} ms with every row "
        f"reading its own copy ({whole / by_cascade:.2f}x), {steps} steps each, interleaved.", ""])


def profile_prefill(model, tok, loop, label: str, prompts: list[list[int]], fused: bool) -> str:
    from torch.profiler import ProfilerActivity, profile

    engine, timers = build(model, tok, len(prompts), 1 << 20, fused)
    for ids in prompts:  # warm-up: the slot cache grows to its size
        submit(engine, loop, ids, 1)
    step(engine)
    timers.total.clear()
    for ids in prompts:
        submit(engine, loop, ids, 1)
    started = time.perf_counter()
    step(engine)
    wall = time.perf_counter() - started
    forward = timers.total["model forward"]
    for ids in prompts:
        submit(engine, loop, ids, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(engine)
    tokens = sum(len(p) for p in prompts)
    out = [f"### Prefill, {label}", "",
           f"{wall * 1000:.0f} ms for {tokens} prompt tokens ({tokens / wall:.0f} tokens/s): model forward "
           f"{forward * 1000:.0f} ms ({forward / wall:.0%}), the rest (copy into the slot cache, first sample) "
           f"{(wall - forward) * 1000:.0f} ms.", "", "torch.profiler, the same prefill again:", "", op_table(prof, 10), ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "profiles" / "engine-step.md"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prepack-weights", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    from worker_throughput import load_model

    from modelfleet.demo import BENCH_SPEC, ensure_demo_model

    model, tok = load_model(ensure_demo_model(BENCH_SPEC))
    import torch

    from modelfleet.worker.fastlinear import pack_linears
    from modelfleet.worker.fastops import fuse_small_ops

    packed = 0
    if args.prepack_weights:
        fuse_small_ops(model)
        packed = pack_linears(model)

    loop = asyncio.new_event_loop()
    sections = [
        "# Where an engine step's time goes", "",
        f"`OMP_NUM_THREADS=1 python bench/profile_engine.py --steps {args.steps}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{BENCH_SPEC.name}: hidden 512, 8 layers, vocab 32,000; weights {model.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread; {packed} linear layers on oneDNN-packed weights). Prompts of ~20 "
        "tokens, sampling at temperature 1 (the bench's). "
        f"This machine is shared (load average {os.getloadavg()[0]:.1f} at the start): absolute times drift "
        "10-20%, shares less.", ""]
    for rows in (1, 32):
        print(f"decode, {rows} rows", flush=True)
        sections.append(profile_decode(model, tok, loop, rows, args.steps, args.prepack_weights))
    print("decode, 32 rows on a shared prefix", flush=True)
    sections.append(profile_shared_prefix(model, tok, loop, args.steps))
    for long_rows in (1, 4):
        print(f"decode, 32 rows, {long_rows} long", flush=True)
        sections.append(profile_mixed(model, tok, loop, long_rows, args.steps, args.prepack_weights))
    long_ids = (tok(" ".join(PROMPT.format(i=i) for i in range(40)))["input_ids"])[:1024]
    print("prefill", flush=True)
    sections.append(profile_prefill(model, tok, loop, "one prompt of 1,024 tokens", [long_ids], args.prepack_weights))
    sections.append(profile_prefill(model, tok, loop, "32 prompts of ~20 tokens (one batch)",
                                    [tok(PROMPT.format(i=i))["input_ids"] for i in range(32)], args.prepack_weights))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
