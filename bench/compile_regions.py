"""Does torch.compile of parts of the model's forward make the engine's decode steps faster?

Regional compilation on the worker's own engine (the bench model, bfloat16, one OpenMP thread):
the engine's step changes shape every step (rows join and leave, the slot cache grows a column
per step, its cursor a Python int), so only the regions that see nothing but hidden states are
compiled, with dynamic shapes, one graph shared by the 8 layers (their weights are graph inputs):

  plain     the worker as it serves: linear layers on oneDNN-packed weights, eager
  mlp       plain + each layer's two RMSNorms and MLP, and the final norm, compiled (25 calls a step)
  layer     plain + each decoder layer compiled whole but for its attention module, which stays
            eager (a graph break: two compiled calls per layer, the residual adds fused in)
  unpacked  eager on the weights as loaded (what inductor can fuse linears with)
  mlp-u, layer-u   mlp and layer on the weights as loaded

Inductor lowers `mkldnn._linear_pointwise` (the packed layers, worker/fastlinear.py) only for a
weight that is a frozen graph constant ("weight must be a graph constant"); here the weights are
graph inputs, so the packed product goes in as an opaque custom op (`packed_linear`).

Every variant runs its own engine on its own copy of the model on the same workload: `rows`
requests of staggered lengths, each one that finishes replaced by a new one (so rows join and
leave, and the columns grow), with greedy sampling. Steps alternate between the variants (the
order flipped every step) and are timed in the thread's CPU time; a warm-up pass over both row
counts compiles every shape class first, then the measured rounds report recompiles (dynamo's
count of graphs compiled during them: 0 is wanted). Ratios are plain's median over the variant's
(above 1: faster).

    OMP_NUM_THREADS=1 python bench/compile_regions.py [--variants mlp,layer] [--steps 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

VARIANTS = ("plain", "mlp", "layer", "unpacked", "mlp-u", "layer-u")
PROMPT = "Request {i}: write a long story about the sea, the ships and the people who sail them."


@torch.library.custom_op("modelfleet_bench::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fastlinear.PackedLinear's product, opaque to inductor (see the module docstring)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _opaque_forward(self, input: torch.Tensor) -> torch.Tensor:
    return packed_linear(input, self.packed, self.bias)


def _opaque_packed(region: nn.Module) -> None:
    from modelfleet.worker.fastlinear import PackedLinear

    for module in region.modules():
        if isinstance(module, PackedLinear):
            module.forward = types.MethodType(_opaque_forward, module)


def compile_regions(model: nn.Module, regions: str) -> int:
    """Compiles `model`'s cache-free regions in place (see the module docstring); returns how
    many modules run compiled."""
    count = 0
    for layer in model.model.layers:
        if regions == "layer":
            layer.self_attn.forward = torch.compiler.disable(layer.self_attn.forward)
            _opaque_packed(layer)
            layer.compile(dynamic=True)
            count += 1
            continue
        for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            _opaque_packed(module)
            module.compile(dynamic=True)
            count += 1
    model.model.norm.compile(dynamic=True)
    return count + 1


def load(path: Path, variant: str):
    from transformers import AutoModelForCausalLM

    from modelfleet.worker.fastlinear import pack_linears

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    if variant != "unpacked" and not variant.endswith("-u"):
        pack_linears(model)
    if variant not in ("plain", "unpacked"):
        compile_regions(model, variant.removesuffix("-u"))
    return model


class Workload:
    """One engine kept at `rows` running requests of staggered lengths: every request that
    finishes is replaced by a new one, so rows leave and join while the columns grow."""

    def __init__(self, model, tok, loop, rows: int) -> None:
        from modelfleet.worker.engine import EngineConfig, GenerationEngine

        self.engine = GenerationEngine(model, tok, EngineConfig(max_model_len=2048, max_num_seqs=rows,
                                                                enable_prefix_caching=False), [tok.eos_token_id])
        self.tok, self.loop, self.rows, self.submitted = tok, loop, rows, 0
        self.decode_times: list[float] = []
        decode = self.engine._decode_step

        def timed_decode() -> None:
            started = time.thread_time()
            decode()
            self.decode_times.append(time.thread_time() - started)

        self.engine._decode_step = timed_decode

    def step(self) -> None:
        from modelfleet.worker.sampling import SamplingParams
        from modelfleet.worker.sequence import GenerationRequest, RequestState

        engine = self.engine
        while len(engine.rows) + len(engine.waiting) < self.rows:
            i = self.submitted
            self.submitted += 1
            req = GenerationRequest(prompt_ids=self.tok(PROMPT.format(i=i))["input_ids"], ignore_eos=True,
                                    params=SamplingParams(temperature=0), max_tokens=16 + (i * 37) % 96)
            engine.waiting.append(RequestState(req, (self.loop, asyncio.Queue())))
        engine._admit()
        if engine.rows:
            engine._decode_step()
        engine.outbox.clear()


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def quartiles(values: list[float]) -> str:
    v = sorted(values)
    return f"{statistics.median(v) * 1000:.2f} ms [{v[len(v) // 4] * 1000:.1f}-{v[3 * len(v) // 4] * 1000:.1f}]"


def run_round(models: dict, tok, loop, rows: int, steps: int) -> dict[str, Workload]:
    loads = {v: Workload(m, tok, loop, rows) for v, m in models.items()}
    for s in range(steps):
        for variant in (list(models) if s % 2 == 0 else list(models)[::-1]):
            loads[variant].step()
    return loads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mlp,layer", help=f"of {', '.join(VARIANTS[1:])}")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", default="1,32")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from modelfleet.demo import BENCH_SPEC, ensure_demo_model

    torch.set_grad_enabled(False)
    path = ensure_demo_model(BENCH_SPEC)
    tok = AutoTokenizer.from_pretrained(path)
    variants = ["plain", *[v for v in args.variants.split(",") if v and v != "plain"]]
    models = {v: load(path, v) for v in variants}
    loop = asyncio.new_event_loop()
    row_counts = [int(x) for x in args.rows.split(",")]
    print(f"{BENCH_SPEC.name}, bfloat16, torch {torch.__version__}, {torch.get_num_threads()} thread, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    for variant, model in models.items():  # warm-up, one variant at a time: its compile time
        before, started = graphs(), time.perf_counter()
        for rows in row_counts:
            run_round({variant: model}, tok, loop, rows, 12)
        print(f"warm-up {variant}: {time.perf_counter() - started:.1f} s wall, {graphs() - before} graphs compiled",
              flush=True)
    for r in range(args.rounds):
        for rows in row_counts:
            before = graphs()
            loads = run_round(models, tok, loop, rows, args.steps)
            base = statistics.median(loads["plain"].decode_times)
            cells = [f"{v} {quartiles(w.decode_times)} x{base / statistics.median(w.decode_times):.2f}"
                     for v, w in loads.items()]
            print(f"round {r} decode {rows:2d} rows (load {os.getloadavg()[0]:.1f}, columns up to "
                  f"{loads['plain'].engine.pool.columns}, {graphs() - before} recompiles) | " + " | ".join(cells),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
