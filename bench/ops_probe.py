"""What `worker/fastops.py` buys one engine step: decode steps at 1 and 32 rows on the bench
model, one OpenMP thread, in one process, steps alternating and timed in thread CPU time
(forward_probe.py's rounds, reused). Variants, each its own copy of the model and its engine:

- `plain`: linears packed and RMSNorms fused (the loader), decode steps through the model's forward;
- `unfused`: linears packed only (the loader before fastops);
- `fused`: `plain` with decode steps through `worker/fastdecode.py` (the worker);
- `plain2`: a second `plain`, the control.

    OMP_NUM_THREADS=1 python bench/ops_probe.py [--dtype bfloat16|float32] [--steps 40] [--rounds 3]
        [--variants unfused,fused,plain2] [--rows 1,32] [--model bench|tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from forward_probe import probe  # noqa: E402

VARIANTS = ("plain", "unfused", "fused", "plain2")


def load(path: Path, dtype, variant: str):
    from transformers import AutoModelForCausalLM

    from modelfleet.worker.fastlinear import pack_linears
    from modelfleet.worker.fastops import fuse_small_ops

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    if variant != "unfused":
        fuse_small_ops(model)
    pack_linears(model)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--variants", default="unfused,fused,plain2", help=f"besides plain, of {', '.join(VARIANTS)}")
    parser.add_argument("--model", choices=["bench", "tiny"], default="bench",
                        help="tiny: the 1.5 MB demo model (hidden 64, 2 layers), where only per-call overhead counts")
    args = parser.parse_args()

    import torch

    from modelfleet.demo import BENCH_SPEC, DemoSpec, ensure_demo_model

    torch.set_grad_enabled(False)
    spec = BENCH_SPEC if args.model == "bench" else DemoSpec()
    path = ensure_demo_model(spec)
    probe(path, args, load, fused=frozenset({"fused"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
