"""What torch.compile could buy the bench model's decode, at most: transformers' own generate
with a static cache (fixed shapes, the case torch.compile handles best) compiled against eager,
greedy, 48 new tokens, at 1 and 32 rows, one thread. The engine's decode step has shapes that
change every step (rows join and leave, columns grow), which compiles worse, so this is an
upper bound on what compiling the step would gain; bench/compile_regions.py measures the engine's
own step compiled by regions (bench/profiles/compile.md).

    OMP_NUM_THREADS=1 python bench/compile_probe.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    import torch
    from transformers import CompileConfig, GenerationConfig
    from worker_throughput import load_model, prompts

    from modelfleet.demo import BENCH_SPEC, ensure_demo_model

    model, tok = load_model(ensure_demo_model(BENCH_SPEC))
    tok.padding_side = "left"
    for rows in (1, 32):
        batch = tok(prompts(rows), return_tensors="pt", padding=True)
        for _ in range(2):  # twice, interleaved: this machine drifts
            for compiled in (False, True):
                compile_config = CompileConfig(mode="default")  # reduce-overhead means CUDA graphs
                compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked
                config = GenerationConfig(max_new_tokens=48, min_new_tokens=48, do_sample=False,
                                          pad_token_id=tok.pad_token_id, cache_implementation="static",
                                          disable_compile=not compiled, compile_config=compile_config)
                started = time.perf_counter()
                model.generate(**batch, generation_config=config)  # warm-up (compiles the first time)
                first = time.perf_counter() - started
                started = time.perf_counter()
                model.generate(**batch, generation_config=config)
                wall = time.perf_counter() - started
                print(f"rows={rows:<3d} compiled={compiled!s:5s} first call {first:5.1f} s, then {wall:5.2f} s "
                      f"({rows * 48 / wall:5.0f} tokens/s)", flush=True)
    del torch
    return 0


if __name__ == "__main__":
    sys.exit(main())
