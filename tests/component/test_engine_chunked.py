"""Chunked prefill on the real demo model: a prompt longer than the step's token budget is
prefilled a chunk per step between the running streams' decodes, and that must change nothing a
request gets, only when its prompt is computed."""

import asyncio
import math
import sys
from pathlib import Path

import pytest

from modelfleet.worker.chunked import chunk_end, prefill_budget
from modelfleet.worker.sampling import SamplingParams
from modelfleet.worker.sequence import GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_engine, beside this file
from demo_engine import expected_logprobs, make_engine, reference  # noqa: E402

BUDGET = 32  # tokens a step may compute: the long prompts below take 6 to 10 steps
LONG = ("The harbour master assigns each berth to the ships of one convoy, logs their cargo and "
        "answers questions about tides, pilots, fees and customs in plain words. ") * 6
GREEDY = SamplingParams(temperature=0, want_logprobs=True)


@pytest.fixture(params=[True, False], ids=["cache-on", "cache-off"])
def engine(request, tiny):
    eng = make_engine(tiny, request.param, max_num_batched_tokens=BUDGET)
    eng.start()
    yield eng
    eng.stop()


def ids_of(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


async def run(engine, ids, max_tokens, params=GREEDY, seed=None, first_token: asyncio.Event | None = None,
              prompt_logprobs=None):
    """(tokens, logprobs, the finished stream's state) of choice 0."""
    req = GenerationRequest(prompt_ids=ids, params=params, max_tokens=max_tokens, ignore_eos=True, seed=seed,
                            prompt_logprobs=prompt_logprobs)
    stream = engine.submit(req)
    tokens, logprobs, prompt_lp = [], [], None
    async for event in stream:
        assert event.error is None
        prompt_lp = event.prompt_logprobs or prompt_lp
        for d in event.deltas:
            tokens.extend(d.token_ids)
            logprobs.extend(lp.logprob for lp in d.logprobs or [])
        if tokens and first_token is not None:
            first_token.set()
    stream.state.prompt_lp = prompt_lp
    return tokens, logprobs, stream.state


def assert_within_budget(engine, budget: int = BUDGET) -> None:
    """No step fed the model more than the budget: decodes first, prompt tokens in the rest."""
    assert engine.step_log
    for record in engine.step_log:
        assert record.prefill_tokens + record.decode_rows <= budget, record


def test_chunk_end_cuts_on_block_boundaries_unless_the_rest_fits():
    assert chunk_end(0, 100, 40, 16) == 32  # cut down to a block boundary
    assert chunk_end(32, 100, 40, 16) == 64
    assert chunk_end(64, 100, 40, 16) == 100  # the rest fits: no cut
    assert chunk_end(0, 100, 10, 16) == 10  # less than a block of room: what there is
    assert chunk_end(10, 100, 10, 16) == 16  # back on a boundary as soon as it can
    assert chunk_end(5, 100, 0, 16) == 5  # no room, no chunk
    assert prefill_budget(32, 4) == 28 and prefill_budget(32, 40) == 0


def test_prompts_longer_than_several_chunks_match_generate(engine, tiny):
    """A long prompt (about 7 chunks) and short ones in one burst: each gets model.generate's
    tokens, and the long one's logprobs equal a full forward pass over it."""
    _, tok = tiny
    long_ids = ids_of(tok, LONG + "What does the master log?")
    assert len(long_ids) > 6 * BUDGET
    prompts = [long_ids, ids_of(tok, "What is a pod?"), ids_of(tok, "Scale it to three replicas.")]

    async def burst():
        return await asyncio.gather(*(run(engine, ids, 12) for ids in prompts))

    results = asyncio.run(burst())
    for ids, (tokens, _, _) in zip(prompts, results, strict=True):
        assert tokens == reference(tiny, ids, 12)
    tokens, logprobs, _ = results[0]
    assert logprobs == pytest.approx(expected_logprobs(tiny, long_ids, tokens), abs=1e-4)
    assert any(r.chunked for r in engine.step_log)
    assert_within_budget(engine)


def test_a_running_stream_waits_at_most_one_budget_per_step_while_a_long_prompt_joins(engine, tiny):
    """The step records show it: while a stream decodes, no step computes more prompt tokens
    than the budget leaves beside its decodes, and the long prompt is spread over the steps of
    the stream instead of being computed in one."""
    _, tok = tiny
    stream_ids = ids_of(tok, "Tell me a long story about the sea.")
    long_ids = ids_of(tok, LONG)

    async def scenario():
        started = asyncio.Event()
        streaming = asyncio.create_task(run(engine, stream_ids, 40, first_token=started))
        await started.wait()
        joined = await run(engine, long_ids, 4)
        return await streaming, joined

    (stream_tokens, _, _), (long_tokens, long_logprobs, _) = asyncio.run(scenario())
    assert stream_tokens == reference(tiny, stream_ids, 40)
    assert long_tokens == reference(tiny, long_ids, 4)
    assert long_logprobs == pytest.approx(expected_logprobs(tiny, long_ids, long_tokens), abs=1e-4)
    beside_decodes = [r for r in engine.step_log if r.decode_rows and r.prefill_tokens]
    assert_within_budget(engine)
    # the long prompt took one chunk per step beside the stream, not one step
    assert sum(r.prefill_tokens for r in beside_decodes) >= len(long_ids) - BUDGET
    assert len(beside_decodes) >= math.ceil(len(long_ids) / BUDGET) - 1


def test_seeded_sampling_is_the_same_beside_a_chunked_prompt(tiny):
    _, tok = tiny
    ids = ids_of(tok, "Write a poem about ships.")
    params = SamplingParams(temperature=1.0)
    eng = make_engine(tiny, max_num_batched_tokens=BUDGET)
    eng.start()
    try:
        alone = asyncio.run(run(eng, ids, 16, params=params, seed=7))[0]

        async def beside():
            # Mine decodes first, so the long prompt's chunks are computed in the same steps
            # (a prompt queued behind a chunked one would only wait for it).
            started = asyncio.Event()
            mine = asyncio.create_task(run(eng, ids, 16, params=params, seed=7, first_token=started))
            await started.wait()
            await run(eng, ids_of(tok, LONG), 8, params=params, seed=1)
            return (await mine)[0]

        assert asyncio.run(beside()) == alone
        assert any(r.chunked for r in eng.step_log)
        assert any(r.decode_rows and r.prefill_tokens for r in eng.step_log), "no step held both"
    finally:
        eng.stop()


def test_chunks_start_after_a_cached_prefix_and_stay_exact(tiny):
    """A long prompt that extends a cached one: the cached blocks are skipped, the rest comes in
    chunks, and the output's logprobs still equal a full forward pass."""
    _, tok = tiny
    first = ids_of(tok, LONG)
    longer = first + ids_of(tok, " Now the second part of the question, which is itself long: " * 4)
    eng = make_engine(tiny, max_num_batched_tokens=BUDGET)
    eng.start()
    try:
        asyncio.run(run(eng, first, 1))
        eng.step_log.clear()  # its last step was recorded before its last event went out
        tokens, logprobs, state = asyncio.run(run(eng, longer, 8))
    finally:
        eng.stop()
    assert state.cached_tokens == len(first) // 16 * 16
    assert tokens == reference(tiny, longer, 8)
    assert logprobs == pytest.approx(expected_logprobs(tiny, longer, tokens), abs=1e-4)
    tail = len(longer) - state.cached_tokens
    chunks = [r for r in eng.step_log if r.chunked]
    assert sum(r.prefill_tokens for r in chunks) == tail  # nothing cached was computed again
    assert len(chunks) >= math.ceil(tail / BUDGET)


def test_prompt_logprobs_of_a_chunked_prompt_equal_an_unchunked_one(tiny):
    _, tok = tiny
    ids = ids_of(tok, LONG)
    results = []
    for budget in (BUDGET, 4096):
        eng = make_engine(tiny, max_num_batched_tokens=budget)
        eng.start()
        try:
            results.append(asyncio.run(run(eng, ids, 2, prompt_logprobs=1)))
        finally:
            eng.stop()
    (chunked_tokens, _, chunked), (whole_tokens, _, whole) = results
    assert chunked_tokens == whole_tokens
    assert len(chunked.prompt_lp) == len(ids) and chunked.prompt_lp[0] is None
    assert [lp.logprob for lp in chunked.prompt_lp[1:]] == pytest.approx(
        [lp.logprob for lp in whole.prompt_lp[1:]], abs=1e-4)


def test_requests_on_a_cached_prefix_are_admitted_within_the_budget(tiny):
    """Requests that share a cached system prompt and differ in questions of very different
    lengths arrive beside a running stream: rows grouped on the prefix compute their group's
    longest tail, and that too stays within the step's budget."""
    _, tok = tiny
    system = ids_of(tok, LONG)
    questions = [" Why?", " What does the master log for each ship, and who reads it?",
                 " Explain tides, pilots, fees and customs, one paragraph each, with examples of every one."]
    eng = make_engine(tiny, max_num_batched_tokens=48)
    eng.start()
    try:
        asyncio.run(run(eng, system, 1))

        async def scenario():
            started = asyncio.Event()
            streaming = asyncio.create_task(run(eng, ids_of(tok, "Tell me a story."), 30, first_token=started))
            await started.wait()
            answers = await asyncio.gather(*(run(eng, system + ids_of(tok, q), 6) for q in questions))
            return await streaming, answers

        (stream_tokens, _, _), answers = asyncio.run(scenario())
    finally:
        eng.stop()
    assert stream_tokens == reference(tiny, ids_of(tok, "Tell me a story."), 30)
    for q, (tokens, _, state) in zip(questions, answers, strict=True):
        assert state.cached_tokens > 0
        assert tokens == reference(tiny, system + ids_of(tok, q), 6)
    assert_within_budget(eng, 48)


def test_a_request_cancelled_between_chunks_frees_its_place_and_leaves_its_blocks(tiny):
    """Driven step by step on this thread (the engine's thread is not started), so that the
    cancellation lands between two chunks: the next request runs, and the same prompt again
    reuses the blocks the cancelled one had computed."""
    from modelfleet.worker.sequence import RequestState

    _, tok = tiny
    eng = make_engine(tiny, max_num_batched_tokens=BUDGET)
    loop = asyncio.new_event_loop()
    ids = ids_of(tok, LONG)

    def submit(prompt: list[int]) -> RequestState:
        state = RequestState(GenerationRequest(prompt_ids=prompt, params=GREEDY, max_tokens=4, ignore_eos=True),
                             (loop, asyncio.Queue()))
        eng.waiting.append(state)
        return state

    def step() -> list:
        eng._drop_cancelled()
        eng._admit()
        if eng.rows:
            eng._decode_step()
        events, eng.outbox = eng.outbox, []
        return events

    def finish(state: RequestState) -> list[int]:
        tokens = []
        for _ in range(100):
            for owner, event in step():
                if owner is state:
                    assert event.error is None
                    tokens += [t for d in event.deltas for t in d.token_ids]
                    if event.finished:
                        return tokens
        raise AssertionError("the request never finished")

    try:
        cancelled = submit(ids)
        step()
        step()
        assert eng.partial is not None and eng.partial.state is cancelled and eng.partial.done == 2 * BUDGET
        cancelled.cancelled.set()
        behind = submit(ids_of(tok, "What is a pod?"))
        assert finish(behind) == reference(tiny, ids_of(tok, "What is a pod?"), 4)
        assert eng.partial is None and eng.admitting == []
        again = submit(ids)
        assert finish(again) == reference(tiny, ids, 4)
        assert again.cached_tokens == 2 * BUDGET  # the two chunks it had computed
    finally:
        loop.close()
