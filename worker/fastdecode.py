"""A decode step for Llama-family models in one function, without transformers' module overhead.

At one running sequence a decode step of the bench Llama (56M, bfloat16, one thread) reads its
83 MB of weights in about 12 ms, at what one core's memory bandwidth allows here; transformers'
forward around those matmuls took another 3 to 4 ms: nine module calls a layer with their
decorators and keyword plumbing, the causal-mask and output-capturing machinery of the model's
forward, and a rotary embedding of seven operators per tensor. vLLM's CPU build runs its own
model classes for the same reason. Here the same modules, weights and operators run as one loop
over the layers, so the logits are bit for bit those of the model's own forward (the component
tests pin it), 1.13x to 1.22x faster at one row, within noise at 32 (measured interleaved on
this machine; bench/profiles/engine-step.md):

- every layer's submodules are called through their `forward` (no hooks: a model with any is
  refused), so packed linears (fastlinear.py) and fused RMSNorms (fastops.py) run as loaded;
- the rotary embedding's `rotate_half(x) * sin` is `x.roll(d/2) * sin'` with the first half of
  `sin'` negated: the same products, since negation is exact, in four operators instead of seven;
- attention is the engine's own `decode_attention` over the slot pool's rows, written through
  `SlotPool.write`, as the model's forward does under `slot_attention`.

Only decode steps of models whose classes are known to compute exactly this (Llama, Mistral,
Qwen2 without sliding windows) take it, and only steps in which no row runs a LoRA adapter:
the layer parts are looked up before any adapter loads, so they stay the base layers that peft's
LoRA layers wrap (and leave unchanged), and a step with adapter rows runs the model as peft made
it. Prefills stay on the model's forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .kvcache import RowGroup, SharedPrefix, SlotPool, decode_attention

log = logging.getLogger(__name__)

FAMILIES = {  # CausalLM class: the classes its decoder layer, attention and MLP must be
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP"),
    "MistralForCausalLM": ("MistralDecoderLayer", "MistralAttention", "MistralMLP"),
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP"),
}


Step = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class _Layer:
    """One decoder layer's parts, looked up once: its modules' bound `forward`s."""

    input_norm: Step
    q: Step
    k: Step
    v: Step
    o: Step
    scaling: float
    post_norm: Step
    gate: Step
    up: Step
    down: Step
    act: Step


class FusedDecode:
    """`__call__(ids, positions, mask, groups)` is the logits [rows, vocab] of one decode step: the
    next token of every row of `pool`, its KV written at the pool's cursor, its attention over the
    rows whole, by `groups` (SlotPool.decode_groups) or over one copy of a prefix they all share
    (`shared`, SlotPool.shared_prefix)."""

    def __init__(self, model: nn.Module, pool: SlotPool) -> None:
        self.pool = pool
        inner = model.model
        self.embed = inner.embed_tokens.forward
        self.rotary = inner.rotary_emb.forward
        self.final_norm = inner.norm.forward
        self.head = model.lm_head.forward
        attn = inner.layers[0].self_attn
        self.heads = model.config.num_attention_heads
        self.kv_heads = getattr(model.config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.layers = [
            _Layer(layer.input_layernorm.forward, layer.self_attn.q_proj.forward, layer.self_attn.k_proj.forward,
                   layer.self_attn.v_proj.forward, layer.self_attn.o_proj.forward, layer.self_attn.scaling,
                   layer.post_attention_layernorm.forward, layer.mlp.gate_proj.forward, layer.mlp.up_proj.forward,
                   layer.mlp.down_proj.forward, layer.mlp.act_fn)
            for layer in inner.layers
        ]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 groups: list[RowGroup] | None = None, shared: SharedPrefix | None = None) -> torch.Tensor:
        rows, half = ids.shape[0], self.head_dim // 2
        x = self.embed(ids)  # [rows, 1, hidden]
        cos, sin = self.rotary(x, position_ids=positions)
        cos, sin = cos[:, None], sin[:, None]  # [rows, 1, 1, head_dim], against [rows, heads, 1, head_dim]
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        q_shape, kv_shape = (rows, 1, self.heads, self.head_dim), (rows, 1, self.kv_heads, self.head_dim)
        for i, layer in enumerate(self.layers):
            h = layer.input_norm(x)
            q = layer.q(h).view(q_shape).transpose(1, 2)
            k = layer.k(h).view(kv_shape).transpose(1, 2)
            v = layer.v(h).view(kv_shape).transpose(1, 2)
            q = q * cos + q.roll(half, -1) * signed_sin
            k = k * cos + k.roll(half, -1) * signed_sin
            keys, values = self.pool.write(i, k, v)
            attended = decode_attention(q, keys, values, mask, layer.scaling, groups, shared)
            x = x + layer.o(attended.reshape(rows, 1, -1))
            h = layer.post_norm(x)
            x = x + layer.down(layer.act(layer.gate(h)) * layer.up(h))
        return self.head(self.final_norm(x))[:, -1]


def fused_decode(model: nn.Module, pool: SlotPool) -> FusedDecode | None:
    """A FusedDecode for `model` over `pool`, or None (logged) when the model is not one whose
    decode step it computes exactly. The caller has put the model's decode attention on the
    pool's matmuls (kvcache.decodes_by_matmul)."""
    reason = _why_not(model)
    if reason:
        log.info("decode steps run the model's own forward: %s", reason)
        return None
    log.info("decode steps run as one fused function (%s)", type(model).__name__)
    return FusedDecode(model, pool)


def _why_not(model: nn.Module) -> str | None:
    """Why `FusedDecode` would not compute `model`'s decode step exactly, or None."""
    kind = type(model).__name__
    if kind not in FAMILIES:
        return f"{kind} is not one of {', '.join(FAMILIES)}"
    layer_cls, attn_cls, mlp_cls = FAMILIES[kind]
    hooked = [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        return f"modules have forward hooks ({hooked[0]})"
    for layer in model.model.layers:
        parts = (type(layer).__name__, type(layer.self_attn).__name__, type(layer.mlp).__name__)
        if parts != (layer_cls, attn_cls, mlp_cls):
            return f"a layer is {'/'.join(parts)}, not {'/'.join((layer_cls, attn_cls, mlp_cls))}"
    return None
