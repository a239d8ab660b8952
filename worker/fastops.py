"""Transformers' small operators swapped for fused eager ones, for a Llama-family LM on a CPU.

A 1-row bfloat16 decode step of the bench Llama spends about 3.5 ms outside its matmuls, in
transformers' chains of small operators; RMSNorm's is the largest single kind (17 norms a step
on 8 layers, each a to/pow/mean/add/rsqrt/mul/to/mul chain of ~52 us of thread CPU time on one
thread). torch's `rms_norm` runs it as one fused CPU kernel (~21 us). torch.compile would fuse
it too, but its guards cost more than it saves here (bench/profiles/compile.md), so this stays
eager. The norm keeps transformers' rounding: the normalisation in float32, cast back to the
input's dtype, then multiplied by the weight in that dtype, so greedy tokens are unchanged.

Only norm classes whose forward is known to be exactly that (Llama, Mistral, Qwen2) are
swapped; any other model stays as loaded. Weights and module names do not change, so peft's
LoRA wrapping and state dicts are unaffected. Merged q/k/v and gate/up linears were measured
and not kept (bench/profiles/engine-step.md).
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

log = logging.getLogger(__name__)

RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})


def fused_rms_norm(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' Llama RMSNorm forward, its float32 chain as one fused kernel."""
    normed = torch.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), None, self.variance_epsilon)
    return self.weight * normed.to(hidden_states.dtype)


def fuse_small_ops(model: nn.Module) -> int:
    """Swaps the forward of each known RMSNorm in `model` for the fused one; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(fused_rms_norm, module)
            count += 1
    if count:
        log.info("%d RMSNorm layers on torch's fused rms_norm", count)
    return count
