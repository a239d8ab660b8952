"""The KV memory budget on the real demo model: requests wait for room instead of running the
worker out of memory, keep their exact output, and the usage gauge is KV held over the budget."""

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from modelfleet.worker.engine import EngineConfig, GenerationEngine
from modelfleet.worker.sampling import SamplingParams
from modelfleet.worker.sequence import GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_engine, beside this file
from demo_engine import expected_logprobs, reference  # noqa: E402

PROMPTS = ["Hello there", "def foo(x):\n    return", "import os\n" * 3, "x", "The quick brown fox"]
MAX_TOKENS = 24


def budget_engine(tiny, budget_tokens: int, **config) -> GenerationEngine:
    model, tok = tiny
    mc = model.config
    token_bytes = 2 * mc.num_hidden_layers * mc.num_key_value_heads * (mc.hidden_size // mc.num_attention_heads)
    token_bytes *= model.dtype.itemsize
    config = EngineConfig(max_model_len=2048, max_num_seqs=8, kv_cache_bytes=budget_tokens * token_bytes, **config)
    return GenerationEngine(model, tok, config, [tok.eos_token_id])


async def run(engine, ids: list[int], max_tokens: int, params: SamplingParams | None = None, seed: int | None = None,
              n: int = 1):
    req = GenerationRequest(prompt_ids=ids, params=params or SamplingParams(temperature=0), max_tokens=max_tokens,
                            ignore_eos=True, seed=seed, n=n)
    return [event async for event in engine.submit(req)]


def tokens_of(events) -> list[int]:
    return [t for e in events for d in e.deltas for t in d.token_ids]


def run_all(engine, prompts: list[list[int]], max_tokens: int, watch=None, **kwargs) -> list:
    """Runs every prompt at once on `engine` (started and stopped here); `watch` sees each step."""
    if watch is not None:
        engine.observe = watch
    engine.start()
    try:
        async def main():
            return await asyncio.wait_for(
                asyncio.gather(*(run(engine, p, max_tokens, **kwargs) for p in prompts)), 180)

        return asyncio.run(main())
    finally:
        engine.stop()


PREEMPT_TOKENS = 48  # past scheduler.KV_LOOKAHEAD: admission plans for less than the longest


def preempting_budget(prompts: list[list[int]]) -> int:
    """A budget that admits three of `prompts` (planned at the longest prompt plus the lookahead)
    where only two fit at their longest, so that the three outgrow it while decoding."""
    from modelfleet.worker.scheduler import KV_LOOKAHEAD

    longest_prompt = max(len(p) for p in prompts)
    budget = 3 * (longest_prompt + KV_LOOKAHEAD + 1)
    assert budget // (longest_prompt + PREEMPT_TOKENS + 1) == 2
    return budget


def test_requests_beyond_the_budget_wait_and_keep_their_output(tiny):
    """A budget that holds two of these sequences at their longest: five requests all finish
    with model.generate's tokens, never more than two run at once, and the cache's buffers
    never take more than the budget."""
    _, tok = tiny
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    longest = max(len(p) for p in prompts) + MAX_TOKENS
    engine = budget_engine(tiny, 2 * (longest + 1))
    seen = {"running": 0, "allocated": 0, "usage": 0.0}

    def watch(name: str, value: float) -> None:  # called on the engine thread after each step
        seen["running"] = max(seen["running"], len(engine.rows))
        seen["allocated"] = max(seen["allocated"], engine.pool.allocated_tokens())
        seen["usage"] = max(seen["usage"], engine.pool.used_tokens() / engine.kv_budget_tokens)

    engine.observe = watch
    engine.start()
    try:
        async def main():
            return await asyncio.wait_for(asyncio.gather(*(run(engine, p, MAX_TOKENS) for p in prompts)), 120)

        results = asyncio.run(main())
    finally:
        engine.stop()
    for ids, events in zip(prompts, results, strict=True):
        assert events[-1].error is None
        assert [t for e in events for d in e.deltas for t in d.token_ids] == reference(tiny, ids, MAX_TOKENS)
    assert seen["running"] == 2
    assert seen["allocated"] <= engine.kv_budget_tokens
    assert 0.5 < seen["usage"] <= 1.0
    assert engine.stats.kv_usage == 0.0  # all finished: nothing held


def test_rows_that_outgrow_the_budget_preempt_the_newest_which_resumes_with_the_same_output(tiny):
    """Admission plans for the next tokens, not the longest (vLLM's way): three sequences run
    where two fit at their longest; as they outgrow the budget the newest is preempted and later
    recomputed, and every request still ends with model.generate's tokens and the logprobs of one
    full forward pass (so the recomputed KV is the right one), the buffers never past the budget."""
    _, tok = tiny
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    engine = budget_engine(tiny, preempting_budget(prompts))
    seen = {"running": 0, "allocated": 0}

    def watch(name: str, value: float) -> None:
        seen["running"] = max(seen["running"], len(engine.rows))
        seen["allocated"] = max(seen["allocated"], engine.pool.allocated_tokens())

    results = run_all(engine, prompts, PREEMPT_TOKENS, watch,
                      params=SamplingParams(temperature=0, want_logprobs=True))
    assert engine.stats.preemptions >= 1
    assert seen["running"] == 3 and seen["allocated"] <= engine.kv_budget_tokens
    for ids, events in zip(prompts, results, strict=True):
        assert events[-1].error is None and events[-1].completion_tokens == PREEMPT_TOKENS
        tokens = tokens_of(events)
        assert tokens == reference(tiny, ids, PREEMPT_TOKENS)
        logprobs = [lp.logprob for e in events for d in e.deltas for lp in d.logprobs or []]
        assert logprobs == pytest.approx(expected_logprobs(tiny, ids, tokens), abs=1e-4)
    assert engine.stats.kv_usage == 0.0


def test_a_preempted_request_samples_as_if_it_had_never_left(tiny):
    """Seeded sampling with penalties: the same tokens whether the requests were preempted and
    recomputed or ran under an ample budget (the generator, the grammar-free penalties' counts
    and the text carry over; only the KV is recomputed)."""
    _, tok = tiny
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    params = SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3)
    tight = budget_engine(tiny, preempting_budget(prompts))
    ample = budget_engine(tiny, 1 << 16)
    outputs = []
    for engine in (tight, ample):
        outputs.append([tokens_of(events) for events in run_all(engine, prompts, PREEMPT_TOKENS, params=params,
                                                                seed=7)])
    assert tight.stats.preemptions >= 1 and ample.stats.preemptions == 0
    assert outputs[0] == outputs[1]


def test_preemption_beside_chunked_prompts_and_cached_prefixes_keeps_every_output(tiny):
    """Preemption among the engine's other paths: a prompt prefilled in chunks of 16 tokens, two
    that share a cached prefix, short ones, all under a budget they outgrow; each still ends with
    model.generate's tokens."""
    _, tok = tiny
    shared = "def handler(event, context):\n    return event\n" * 3
    prompts = [tok(p)["input_ids"] for p in [*PROMPTS[:3], shared + "# one", shared + "# two", shared * 2]]
    engine = budget_engine(tiny, preempting_budget(prompts), max_num_batched_tokens=16)
    results = run_all(engine, prompts, PREEMPT_TOKENS)
    assert engine.stats.preemptions >= 1 and engine.stats.prefix_cache_hits > 0
    assert any(record.chunked for record in engine.step_log)
    for ids, events in zip(prompts, results, strict=True):
        assert events[-1].error is None
        assert tokens_of(events) == reference(tiny, ids, PREEMPT_TOKENS)


@pytest.mark.parametrize("n", [1, 2])
def test_a_preempted_request_is_recomputed_in_chunks_on_its_cached_blocks(tiny, n):
    """A preempted request's recompute is a prefill too: no step computes more than the step's
    budget beside the running streams, and it reads what the prefix cache holds of its sequences
    (their prompt's blocks, at least), computing only the rest, every choice's rows together;
    each choice's seeded tokens and logprobs are those of an engine that never preempted."""
    from modelfleet.worker.scheduler import KV_LOOKAHEAD

    _, tok = tiny
    topics = ("tides", "pilots", "berths", "customs")
    prompts = [tok(f"{t.title()}: the harbour office answers questions about {t} for every ship in port today.")
               ["input_ids"] for t in topics]
    longest, budget = max(map(len, prompts)), 40
    assert 16 < min(map(len, prompts)) and longest < budget < 2 * min(map(len, prompts))  # a block; one a step
    # three admitted one step apart (8 tokens of slack for the first ones' decodes), two fit at the longest
    kv_budget = 3 * n * (longest + KV_LOOKAHEAD + 1 + 8)
    assert kv_budget // (n * (longest + PREEMPT_TOKENS + 1)) == 2
    tight = budget_engine(tiny, kv_budget, max_num_batched_tokens=budget)
    ample = budget_engine(tiny, 1 << 16, max_num_batched_tokens=budget)
    rejoined = []
    rejoin = tight._rejoin
    tight._rejoin = lambda part: (rejoined.append((len(part.tokens), part.total, part.reused)), rejoin(part))
    params = SamplingParams(temperature=1.0, want_logprobs=True)
    outputs = []
    for engine in (tight, ample):
        results = run_all(engine, prompts, PREEMPT_TOKENS, params=params, seed=7, n=n)
        outputs.append([[(d.index, t, lp.logprob) for e in events for d in e.deltas
                         for t, lp in zip(d.token_ids, d.logprobs, strict=True)] for events in results])
        assert all(events[-1].error is None for events in results)
    assert tight.stats.preemptions >= 1 and ample.stats.preemptions == 0
    assert len(rejoined) == tight.stats.preemptions
    for rows, total, reused in rejoined:
        assert rows == n and total > budget and reused >= 16
    for record in tight.step_log:
        assert record.prefill_tokens + record.decode_rows <= budget, record
    for preempted, unpreempted in zip(*outputs, strict=True):
        assert len(preempted) == n * PREEMPT_TOKENS
        assert [(i, t) for i, t, _ in preempted] == [(i, t) for i, t, _ in unpreempted]
        assert [lp for *_, lp in preempted] == pytest.approx([lp for *_, lp in unpreempted], abs=1e-4)


def test_a_request_that_can_never_fit_gets_a_clear_error_and_others_are_served(tiny):
    _, tok = tiny
    engine = budget_engine(tiny, 100)
    engine.start()
    try:
        async def main():
            big = run(engine, tok("Hello")["input_ids"], 500)
            small = run(engine, tok("Hello")["input_ids"], 8)
            return await asyncio.wait_for(asyncio.gather(big, small), 60)

        big, small = asyncio.run(main())
    finally:
        engine.stop()
    assert big[-1].finished and "more than this worker's KV budget of 100 tokens" in big[-1].error
    assert "--kv-cache-memory" in big[-1].error
    assert small[-1].error is None and small[-1].completion_tokens == 8


def test_usage_is_kv_held_over_the_budget_not_rows_times_context(tiny):
    """At 4 short requests in a large budget, the gauge reads the tokens the rows hold over the
    budget (vLLM's meaning), and the buffers hold a small part of the old rows x context."""
    _, tok = tiny
    engine = budget_engine(tiny, 8 * 2049)
    held = []
    engine.observe = lambda name, value: held.append((engine.pool.used_tokens(), engine.pool.allocated_tokens()))
    engine.start()
    try:
        async def main():
            return await asyncio.gather(*(run(engine, tok(p)["input_ids"], 16) for p in PROMPTS[:4]))

        asyncio.run(main())
    finally:
        engine.stop()
    used, allocated = max(held)
    assert used <= sum(len(tok(p)["input_ids"]) + 16 for p in PROMPTS[:4])
    assert allocated * 8 <= 8 * 2048  # at most 1/8 of what max_num_seqs x max_model_len reserved


def test_a_bfloat16_model_on_cpu_keeps_bfloat16_kv_and_generates_as_eager_generate_does(tiny):
    """bfloat16 weights, bfloat16 KV, decode attention as matmuls (kvcache.decode_attention):
    greedy tokens stay those of model.generate on the same bfloat16 model under transformers'
    eager attention (the same math), and the budget counts 2-byte slots."""
    import copy

    model, tok = tiny
    half = copy.deepcopy(model).to(torch.bfloat16)
    eager = copy.deepcopy(half)
    eager.set_attn_implementation("eager")
    engine = GenerationEngine(half, tok, EngineConfig(max_model_len=2048, max_num_seqs=4,
                                                      kv_cache_bytes=1 << 20), [tok.eos_token_id])
    assert engine.matmul_decode and engine.pool.keys[0].dtype == torch.bfloat16
    mc = half.config
    assert engine.kv_token_bytes == 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 2
    assert engine.kv_budget_tokens == (1 << 20) // engine.kv_token_bytes
    engine.start()
    try:
        async def main():
            return await asyncio.wait_for(asyncio.gather(*(run(engine, tok(p)["input_ids"], 16) for p in PROMPTS)), 120)

        results = asyncio.run(main())
    finally:
        engine.stop()
    for prompt, events in zip(PROMPTS, results, strict=True):
        ids = tok(prompt)["input_ids"]
        assert [t for e in events for d in e.deltas for t in d.token_ids] == reference((eager, tok), ids, 16)


def test_the_api_refuses_a_request_past_the_budget_with_a_400_naming_max_tokens(demo_path):
    """Through the worker's app, a request that could never fit is the client's to fix: a 400
    in OpenAI's format that names max_tokens and the flag, not a 500, and the worker serves on."""
    from modelfleet.worker.app import WorkerSettings, create_app, load_service

    from .conftest import Api

    service, metrics = load_service(WorkerSettings(source=str(demo_path), served_names=["tiny-chat"],
                                                   max_num_seqs=4, kv_cache_gib=0.00025))
    service.engine.start()
    try:
        api = Api(create_app(service, metrics))
        budget = service.engine.kv_budget_tokens
        body = {"model": "tiny-chat", "prompt": "Hello", "max_tokens": budget + 10}
        err = api.error("/v1/completions", body, param="max_tokens")
        assert err["code"] == "kv_cache_exceeded" and "--kv-cache-memory" in err["message"]
        chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": budget + 10}
        assert api.error("/v1/chat/completions", chat, param="max_tokens")["code"] == "kv_cache_exceeded"
        ok = api.ok("/v1/completions", {**body, "max_tokens": 4})
        assert ok["usage"]["completion_tokens"] >= 1
    finally:
        service.engine.stop()
