"""The engine tests' demo engine and what they compare it with: generation engines on the demo
model (conftest's `tiny`), and the answers of transformers' own `generate` and of one full
forward pass, which a batched, cached or chunked prefill must not change.

Imported by the test modules beside it (`sys.path`, as pytest's importlib mode leaves it out).
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from modelfleet.worker.engine import EngineConfig, GenerationEngine
from modelfleet.worker.sequence import GenerationRequest


def make_engine(tiny, caching: bool = True, **config: Any) -> GenerationEngine:
    """A (not started) engine on the demo model: four rows, prefix caching on or off, and any
    other EngineConfig field (a step's token budget, a prefix cache size)."""
    model, tok = tiny
    settings = EngineConfig(max_model_len=2048, max_num_seqs=4, enable_prefix_caching=caching, **config)
    return GenerationEngine(model, tok, settings, [tok.eos_token_id])


def reference(tiny, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` from transformers' `generate`, alone in its batch."""
    model, _ = tiny
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def expected_logprobs(tiny, ids: list[int], tokens: list[int]) -> list[float]:
    """Each generated token's logprob from one full forward pass over prompt and output: the demo
    model's greedy tokens hardly depend on far context, its logprobs do, so the tests that must
    see a wrong prefix KV or a wrong chunk compare these."""
    model, _ = tiny
    logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1).tolist()


def run_staggered(engine: GenerationEngine, requests: list[GenerationRequest], stagger: float = 0.02,
                  delays: list[float] | None = None) -> list[tuple[list[int], list[float]]]:
    """Each request's tokens and their logprobs through `engine` (started and stopped here),
    each request submitted `stagger` seconds after the one before it, so that rows join a
    running batch (0: all at once), or each at its own delay in seconds (`delays`)."""

    async def one(req: GenerationRequest, delay: float):
        await asyncio.sleep(delay)
        tokens, lps = [], []
        async for event in engine.submit(req):
            assert event.error is None
            for d in event.deltas:
                tokens += d.token_ids
                lps += [lp.logprob for lp in d.logprobs or []]
        return tokens, lps

    async def main():
        when = delays or [stagger * i for i in range(len(requests))]
        return await asyncio.gather(*(one(req, delay) for req, delay in zip(requests, when, strict=True)))

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.stop()
