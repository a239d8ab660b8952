"""Linear layers on prepacked oneDNN weights, for a causal LM served on a CPU.

transformers' modules run every linear layer as `F.linear`, which on a CPU hands oneDNN
(bfloat16) or MKL (float32) the weight in PyTorch's plain row-major layout on every call. vLLM's
CPU build reorders each weight once at load into the blocked layout oneDNN's kernels read best
(`create_onednn_mm`); PyTorch offers the same without vLLM: `mkldnn._reorder_linear_weight`
packs a weight once and `mkldnn._linear_pointwise` multiplies by it (what inductor's freezing pass
emits for a frozen linear; used here without compiling, since the engine's step changes shape
every step). `pack_linears` turns a loaded model's `nn.Linear` modules into
`PackedLinear` in place (their class, not the module objects, changes), so the model, tied
weights, and peft's LoRA wrappers (which call their base layer) stay what they were.

The packed copy is taken once: a weight changed afterwards (merging an adapter into it,
`load_state_dict`) must call `repack`. It costs the weights' memory once more.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward multiplies by a oneDNN-packed copy of its weight."""

    packed: torch.Tensor
    one_row_plain = False  # one input row: F.linear on the weight as loaded (see pack_linears)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.one_row_plain and input.numel() == self.in_features:
            return F.linear(input, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(input, self.packed, self.bias, "none", [], "")

    def repack(self) -> None:
        # no batch-size hint: packing for 1 row was slower at 32 rows and no faster at 1
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)


def packable(model: nn.Module) -> str | None:
    """None when `pack_linears` can run on `model`'s weights; else why not."""
    return _why_not(next(model.parameters()))


def _why_not(weight: torch.Tensor) -> str | None:
    if weight.device.type != "cpu":
        return f"weights on {weight.device.type}"
    if not torch.backends.mkldnn.is_available():
        return "PyTorch was built without oneDNN"
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bfloat16"
    if weight.dtype not in (torch.bfloat16, torch.float32):
        return f"weights in {weight.dtype}"  # oneDNN's half kernels need AVX512-FP16 or AMX-FP16
    return None


def pack_linears(model: nn.Module) -> int:
    """Turns every plain nn.Linear of `model` into a PackedLinear; returns how many.

    Measured on the 56M bench Llama, one thread, AVX512-BF16 (bench/forward_probe.py, thread CPU
    time of the engine's decode steps): in bfloat16 every layer gains, 7-11% of a step at 1 row
    and 10-14% at 32. In float32 the packed layers gain 32-34% at 32 rows, but MKL's plain sgemv
    beats them at one row (a 1-row step 4-6% slower), except in the 32,000-wide LM head: so in
    float32 a one-row call of the other layers stays on the weight as loaded."""
    why = packable(model)
    if why is not None:
        log.info("linear layers not prepacked: %s", why)
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear and _why_not(module.weight) is None:
                module.__class__ = PackedLinear
                module.repack()
                module.one_row_plain = module.weight.dtype == torch.float32 and module is not head
                count += 1
    log.info("%d linear layers on oneDNN-packed weights", count)
    return count
