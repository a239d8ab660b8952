"""What a change to the model's forward buys one engine step: the engine's decode steps at 1 and
32 rows and a prefill, on the bench model, with the forward as loaded against variants of it
(`worker/fastlinear.py`'s prepacked linear layers: `packed` as `pack_linears` leaves them, `all`
with a tied LM head packed too (a copy; the embeddings keep the weight), `nohead` with a tied
head left as loaded, `head` only the LM head, `body` all but the LM head; `plain2`, a second copy
as loaded, is the control), one OpenMP thread, in one process.

Every variant runs its own engine on its own copy of the model; their steps alternate (the order
flipped every step), and each step is timed in the thread's CPU time, which other work on a
loaded machine inflates far less than wall time. Ratios are the plain forward's median over the
variant's (above 1: faster).

    OMP_NUM_THREADS=1 python bench/forward_probe.py [--dtype bfloat16|float32] [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

VARIANTS = ("plain", "packed", "all", "nohead", "head", "body", "plain2")


def load(path: Path, dtype, variant: str):
    import torch
    from transformers import AutoModelForCausalLM

    from modelfleet.worker.fastlinear import PackedLinear, pack_linears

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    head = model.get_output_embeddings()
    if variant in ("packed", "all", "nohead"):
        pack_linears(model)
    if variant == "all" and type(head) is torch.nn.Linear:
        head.__class__ = PackedLinear
        head.repack()
    elif variant == "nohead" and type(head) is PackedLinear and head.dense:
        head.__class__ = torch.nn.Linear
        del head.packed
    elif variant in ("head", "body"):
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and (name == "lm_head") == (variant == "head"):
                module.__class__ = PackedLinear
                module.repack()
    return model


def quartiles(values: list[float]) -> str:
    v = sorted(values)
    return f"{statistics.median(v) * 1000:.2f} ms [{v[len(v) // 4] * 1000:.1f}-{v[3 * len(v) // 4] * 1000:.1f}]"


def decode_round(models, tok, loop, rows: int, steps: int, fused: frozenset[str]) -> dict[str, list[float]]:
    from profile_engine import PROMPT, build, step, submit

    engines = {}
    for variant, model in models.items():
        engine, _ = build(model, tok, rows, 4096, variant in fused)
        for i in range(rows):
            submit(engine, loop, tok(PROMPT.format(i=i))["input_ids"], steps + 10)
        for _ in range(4):  # the prefill, then warm steps
            step(engine)
        engines[variant] = engine
    times: dict[str, list[float]] = {v: [] for v in models}
    for s in range(steps):
        for variant in (list(models) if s % 2 == 0 else list(models)[::-1]):
            started = time.thread_time()
            step(engines[variant])
            times[variant].append(time.thread_time() - started)
    return times



def prefill_round(models, tok, loop, prompts: list[list[int]], repeats: int,
                  fused: frozenset[str]) -> dict[str, list[float]]:
    from profile_engine import build, step, submit

    engines = {v: build(m, tok, len(prompts), 1 << 20, v in fused)[0] for v, m in models.items()}
    times: dict[str, list[float]] = {v: [] for v in models}
    for r in range(repeats + 1):
        for variant in (list(models) if r % 2 == 0 else list(models)[::-1]):
            for ids in prompts:
                submit(engines[variant], loop, ids, 1)
            started = time.thread_time()
            step(engines[variant])
            if r:  # the first grows the slot cache
                times[variant].append(time.thread_time() - started)
    return times


def report(label: str, times: dict[str, list[float]]) -> None:
    base = statistics.median(times["plain"])
    cells = [f"{v} {quartiles(t)} x{base / statistics.median(t):.2f}" for v, t in times.items()]
    print(f"{label} (load {os.getloadavg()[0]:.1f}) | " + " | ".join(cells), flush=True)


def probe(path: Path, args: argparse.Namespace, load_variant, prefill: bool = False,
          fused: frozenset[str] = frozenset()) -> None:
    """Load `plain` and each of `args.variants` with `load_variant`, then print `args.rounds`
    rounds of decode steps at each of `args.rows` (and a long and a batched prefill): the loop
    this probe and ops_probe.py share. The engines of the variants in `fused` decode through the
    fused decode step (worker/fastdecode.py), the others through the model's forward."""
    import torch
    from profile_engine import PROMPT
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    dtype = getattr(torch, args.dtype)
    variants = ["plain", *[v for v in args.variants.split(",") if v and v != "plain"]]
    # in float32 the copies ran in the order they were loaded (ops_probe's plain2 1.1-2.3x faster
    # than the identical plain, load 4-6, 2026-12-02; an untimed copy loaded first did not
    # help): read the control's column before any other
    models = {v: load_variant(path, dtype, v) for v in variants}
    loop = asyncio.new_event_loop()
    print(f"{path.name}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} thread; "
          "thread CPU time per step, median [quartiles]")
    for r in range(args.rounds):
        for rows in (int(x) for x in args.rows.split(",")):
            report(f"round {r} decode {rows:2d} rows", decode_round(models, tok, loop, rows, args.steps, fused))
        if prefill:
            long_ids = tok(" ".join(PROMPT.format(i=i) for i in range(40)))["input_ids"][:1024]
            report(f"round {r} prefill 1x1024", prefill_round(models, tok, loop, [long_ids], 2, fused))
            short = [tok(PROMPT.format(i=i))["input_ids"] for i in range(32)]
            report(f"round {r} prefill 32x~20", prefill_round(models, tok, loop, short, 2, fused))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    import torch

    from modelfleet.demo import BENCH_SPEC, ensure_demo_model

    torch.set_grad_enabled(False)
    path = ensure_demo_model(BENCH_SPEC)
    probe(path, args, load, prefill=args.prefill)
    return 0


if __name__ == "__main__":
    sys.exit(main())
