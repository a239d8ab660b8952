"""Prefix caching on the real demo model: reusing a cached prompt prefix must not change what a
request gets, only how much of its prompt is computed."""

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from modelfleet.worker.sampling import SamplingParams
from modelfleet.worker.sequence import GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_engine, beside this file
from demo_engine import expected_logprobs, make_engine, reference  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer briefly and cite the manual where you can. " * 3
QUESTIONS = ["What is a pod?", "How do I scale a deployment to three replicas?", "Why?",
             "Explain the difference between a Service and an Ingress in one long paragraph."]


@pytest.fixture(params=[True, False], ids=["cache-on", "cache-off"])
def engine(request, tiny):
    eng = make_engine(tiny, request.param)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture
def cached_engine(tiny):
    eng = make_engine(tiny, True)
    eng.start()
    yield eng
    eng.stop()


async def generate(engine, ids, max_tokens, delay=0.0, params=None, seed=None, logprobs=None):
    """(tokens of choice 0, the request's cached_tokens); logprobs, if given, collects theirs."""
    await asyncio.sleep(delay)
    params = params or SamplingParams(temperature=0, want_logprobs=True)
    req = GenerationRequest(prompt_ids=ids, params=params, max_tokens=max_tokens, ignore_eos=True, seed=seed)
    stream = engine.submit(req)
    tokens = []
    async for event in stream:
        assert event.error is None
        for d in event.deltas:
            tokens.extend(d.token_ids)
            if logprobs is not None:
                logprobs.extend(lp.logprob for lp in d.logprobs or [])
    return tokens, stream.state.cached_tokens


def ids_of(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def test_shared_prefix_requests_match_solo_greedy_generation(engine, tiny):
    """Requests sharing a system prompt, arriving staggered and then again in a burst (when the
    prefix is cached): each gets exactly the tokens model.generate gives it alone."""
    _, tok = tiny
    prompts = [ids_of(tok, SYSTEM + q) for q in QUESTIONS]

    async def main():
        first = await asyncio.gather(*(generate(engine, p, 12, delay=0.05 * i) for i, p in enumerate(prompts)))
        again = await asyncio.gather(*(generate(engine, p, 12, logprobs=lps) for p, lps in zip(prompts, warm_lps, strict=True)))
        return first, again

    warm_lps: list[list[float]] = [[] for _ in prompts]
    first, again = asyncio.run(main())
    for ids, (a, _), (b, cached), lps in zip(prompts, first, again, warm_lps, strict=True):
        expected = reference(tiny, ids, 12)
        assert a == expected and b == expected
        assert lps == pytest.approx(expected_logprobs(tiny, ids, b), abs=1e-4)
        if engine.prefix_cache is not None:
            assert 0 < cached < len(ids)
        else:
            assert cached == 0
    stats = engine.stats
    if engine.prefix_cache is not None:
        assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries >= 2 * sum(map(len, prompts))
    else:
        assert stats.prefix_cache_hits == stats.prefix_cache_queries == 0


def test_a_prompt_of_whole_blocks_still_computes_its_last_token(cached_engine, tiny):
    _, tok = tiny
    ids = (ids_of(tok, SYSTEM) * 2)[:48]
    assert len(ids) % cached_engine.config.prefix_cache_block_size == 0

    warm_lps: list[float] = []

    async def main():
        return [await generate(cached_engine, ids, 10), await generate(cached_engine, ids, 10, logprobs=warm_lps)]

    (cold, cold_cached), (warm, warm_cached) = asyncio.run(main())
    assert cold == warm == reference(tiny, ids, 10)
    assert warm_lps == pytest.approx(expected_logprobs(tiny, ids, warm), abs=1e-4)
    assert cold_cached == 0 and warm_cached == len(ids) - 1


def test_seeded_sampling_is_the_same_cold_alone_and_warm_in_a_crowd(cached_engine, tiny):
    _, tok = tiny
    params = SamplingParams(temperature=1.0, top_p=0.9)
    ids = ids_of(tok, SYSTEM + QUESTIONS[1])

    async def alone():
        return await generate(cached_engine, ids, 20, params=params, seed=99)

    async def crowded():
        noise = [generate(cached_engine, ids_of(tok, SYSTEM + q), 15, params=SamplingParams(temperature=1.3))
                 for q in QUESTIONS]
        results = await asyncio.gather(generate(cached_engine, ids, 20, params=params, seed=99, delay=0.01), *noise)
        return results[0]

    (cold, cold_cached), (warm, warm_cached) = asyncio.run(alone()), asyncio.run(crowded())
    assert cold == warm
    assert cold_cached == 0 and warm_cached > 0


def test_a_pinned_prefix_survives_eviction_by_a_batch_mate(tiny):
    """The pool holds exactly one prompt's blocks. A request that hits them is admitted in the same
    step as one whose prompt is new and would evict them to be stored: the reader's blocks are
    pinned, so the newcomer stores nothing and the reader still reads the right KV."""
    model, tok = tiny
    mc = model.config
    kv_heads = mc.num_key_value_heads or mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    block_bytes = 2 * mc.num_hidden_layers * kv_heads * head_dim * 16 * 4
    prefix = ids_of(tok, SYSTEM)[:64]
    eng = make_engine(tiny, True, prefix_cache_bytes=4 * block_bytes)
    assert eng.prefix_cache.num_blocks == 4
    reader = prefix + ids_of(tok, QUESTIONS[0])
    other = ids_of(tok, "import os\n" * 40)
    eng.start()
    try:
        release = threading.Event()
        reader_logprobs: list[float] = []

        async def main():
            await generate(eng, prefix, 2)  # caches the prefix's 4 blocks (the pool is full)
            held = asyncio.ensure_future(eng.run_job(lambda: release.wait(30)))
            await asyncio.sleep(0.1)
            jobs = [asyncio.ensure_future(generate(eng, other, 8)),
                    asyncio.ensure_future(generate(eng, reader, 8, logprobs=reader_logprobs))]
            await asyncio.sleep(0.1)
            release.set()  # both are admitted in the step after the job
            await held
            return await asyncio.gather(*jobs)

        (other_tokens, other_cached), (reader_tokens, reader_cached) = asyncio.run(main())
    finally:
        eng.stop()
    assert reader_cached == 64
    assert reader_tokens == reference(tiny, reader, 8)
    assert reader_logprobs == pytest.approx(expected_logprobs(tiny, reader, reader_tokens), abs=1e-4)
    assert other_cached == 0 and other_tokens == reference(tiny, other, 8)
    assert eng.prefix_cache.cached_blocks == 4  # the evictions the newcomer wanted were refused
    assert eng.prefix_cache.match(prefix).tokens == 64


def test_an_evicted_prefix_is_recomputed(tiny):
    """With room for one prompt, a second prompt evicts the first; the first then runs cold and
    still matches model.generate."""
    model, tok = tiny
    mc = model.config
    kv_heads = mc.num_key_value_heads or mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    block_bytes = 2 * mc.num_hidden_layers * kv_heads * head_dim * 16 * 4
    eng = make_engine(tiny, True, prefix_cache_bytes=4 * block_bytes)
    first = ids_of(tok, SYSTEM)[:70]
    second = ids_of(tok, "import os\n" * 40)[:70]
    eng.start()
    try:
        async def main():
            return [await generate(eng, p, 6) for p in (first, second, first)]

        results = asyncio.run(main())
    finally:
        eng.stop()
    assert [cached for _, cached in results] == [0, 0, 0]
    for ids, (tokens, _) in zip((first, second, first), results, strict=True):
        assert tokens == reference(tiny, ids, 6)


def test_batch_mates_with_different_prefixes_and_tails_prefill_together(tiny):
    """Admitted in one step: rows whose cached prefixes differ in length, and one whose cached
    block is shorter than what its batch must compute (it reuses nothing, and pads its past)."""
    _, tok = tiny
    eng = make_engine(tiny, True)
    system = ids_of(tok, SYSTEM)
    short = system[:16]
    # uncached tails 16, 40 and 20 make one batch that computes 40 columns: the first reuses nothing
    prompts = [short + ids_of(tok, QUESTIONS[3] * 3)[:16], system[:48] + ids_of(tok, "import os\n" * 20)[:40],
               system[:32] + ids_of(tok, QUESTIONS[1] * 2)[:20]]
    eng.start()
    try:
        release = threading.Event()
        lps: list[list[float]] = [[] for _ in prompts]

        async def main():
            await generate(eng, system, 1)  # caches the system prompt's blocks
            held = asyncio.ensure_future(eng.run_job(lambda: release.wait(30)))
            await asyncio.sleep(0.1)
            jobs = [asyncio.ensure_future(generate(eng, p, 6, logprobs=lp)) for p, lp in zip(prompts, lps, strict=True)]
            await asyncio.sleep(0.1)
            release.set()
            await held
            return await asyncio.gather(*jobs)

        results = asyncio.run(main())
    finally:
        eng.stop()
    for ids, (tokens, cached), lp in zip(prompts, results, lps, strict=True):
        assert tokens == reference(tiny, ids, 6)
        assert lp == pytest.approx(expected_logprobs(tiny, ids, tokens), abs=1e-4)
        assert 0 <= cached < len(ids)
    assert [cached for _, cached in results] == [0, 48, 12]


def test_n_choices_of_a_cached_prompt_each_get_the_prompt(cached_engine, tiny):
    _, tok = tiny
    ids = ids_of(tok, SYSTEM + QUESTIONS[2])

    async def main():
        await generate(cached_engine, ids, 1)
        req = GenerationRequest(prompt_ids=ids, params=SamplingParams(temperature=0), max_tokens=8, n=3,
                                ignore_eos=True)
        stream = cached_engine.submit(req)
        by_choice: dict[int, list[int]] = {}
        async for event in stream:
            for d in event.deltas:
                by_choice.setdefault(d.index, []).extend(d.token_ids)
        return by_choice, stream.state.cached_tokens

    by_choice, cached = asyncio.run(main())
    assert cached > 0
    assert [by_choice[i] for i in range(3)] == [reference(tiny, ids, 8)] * 3


def test_the_api_reports_cached_prompt_tokens_in_every_usage_shape(api):
    """A second request with the same long prompt reuses its full blocks: chat, completions
    (streamed too) and Responses say how many prompt tokens came from the cache."""
    system = "You are a careful assistant. " * 40  # several full blocks of the demo tokenizer
    chat = {"model": "tiny-chat", "messages": [{"role": "system", "content": system},
                                               {"role": "user", "content": "Hi"}], "max_tokens": 2}
    first = api.ok("/v1/chat/completions", chat)["usage"]
    second = api.ok("/v1/chat/completions", chat)["usage"]
    assert second["prompt_tokens"] == first["prompt_tokens"]
    assert 16 <= second["prompt_tokens_details"]["cached_tokens"] < second["prompt_tokens"]
    streamed = api.events("/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})[-1]["usage"]
    assert streamed["prompt_tokens_details"]["cached_tokens"] >= 16
    prompt = {"model": "tiny-chat", "prompt": system, "max_tokens": 2}
    api.ok("/v1/completions", prompt)
    assert api.ok("/v1/completions", prompt)["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    responses = {"model": "tiny-chat", "input": system, "max_output_tokens": 2}
    api.ok("/v1/responses", responses)
    assert api.ok("/v1/responses", responses)["usage"]["input_tokens_details"]["cached_tokens"] >= 16
