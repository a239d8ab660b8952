"""The engine on the real demo model: continuous batching must not change what a request gets."""

import asyncio

import pytest
import torch

from modelfleet.worker.engine import EngineConfig, GenerationEngine
from modelfleet.worker.sampling import SamplingParams
from modelfleet.worker.sequence import GenerationRequest

PROMPTS = ["Hello there", "def foo(x):\n    return", "A much longer prompt " * 20, "x", "import os\n" * 7]


@pytest.fixture
def engine(tiny):
    model, tok = tiny
    eng = GenerationEngine(model, tok, EngineConfig(max_model_len=2048, max_num_seqs=4), [tok.eos_token_id])
    eng.start()
    yield eng
    eng.stop()


def reference(tiny, prompt: str, n: int) -> list[int]:
    model, tok = tiny
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


async def until(check, what: str, timeout: float = 10) -> None:
    """Wait for the engine's state (read by `check`) instead of sleeping a guessed time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


async def generate(engine, tok, prompt, max_tokens, delay=0.0, **kw):
    await asyncio.sleep(delay)
    params = kw.pop("params", SamplingParams(temperature=0))
    req = GenerationRequest(prompt_ids=tok(prompt)["input_ids"], params=params, max_tokens=max_tokens,
                            ignore_eos=True, **kw)
    by_choice: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    async for event in engine.submit(req):
        assert event.error is None
        for d in event.deltas:
            by_choice.setdefault(d.index, []).extend(d.token_ids)
            texts[d.index] = texts.get(d.index, "") + d.text
    return by_choice, texts


def test_staggered_requests_match_solo_greedy_generation(engine, tiny):
    """More requests than rows, arriving at different times, with different prompt lengths:
    each gets exactly the tokens model.generate gives it alone."""
    _, tok = tiny

    async def main():
        jobs = [generate(engine, tok, p, 20 + 9 * i, delay=0.02 * i) for i, p in enumerate(PROMPTS)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for i, (prompt, (tokens, _)) in enumerate(zip(PROMPTS, results, strict=True)):
        assert tokens[0] == reference(tiny, prompt, 20 + 9 * i)


def test_same_seed_same_text_whatever_else_is_running(engine, tiny):
    _, tok = tiny
    params = SamplingParams(temperature=1.0, top_p=0.9)

    async def alone():
        return await generate(engine, tok, "Once upon a time", 30, params=params, seed=1234)

    async def crowded():
        noise = [generate(engine, tok, p, 25, params=SamplingParams(temperature=1.3)) for p in PROMPTS[:3]]
        results = await asyncio.gather(generate(engine, tok, "Once upon a time", 30, params=params, seed=1234,
                                                delay=0.01), *noise)
        return results[0]

    assert asyncio.run(alone())[0] == asyncio.run(crowded())[0]


def test_n_choices_share_a_prompt_but_differ(engine, tiny):
    _, tok = tiny
    tokens, texts = asyncio.run(generate(engine, tok, "Hi", 15, n=3, params=SamplingParams(temperature=1.0)))
    assert sorted(tokens) == [0, 1, 2]
    assert all(len(t) == 15 for t in tokens.values())
    assert len({tuple(t) for t in tokens.values()}) > 1


def test_stop_string_ends_generation_and_is_not_returned(engine, tiny):
    _, tok = tiny
    _, texts = asyncio.run(generate(engine, tok, "A much longer prompt", 40))
    full = texts[0]
    stop = full[10:13]
    tokens, texts = asyncio.run(generate(engine, tok, "A much longer prompt", 40, stop=[stop]))
    assert texts[0] == full[: full.index(stop)]
    assert stop not in texts[0]


def test_cancel_frees_rows_for_waiting_requests(engine, tiny):
    _, tok = tiny

    async def main():
        long_streams = [engine.submit(GenerationRequest(prompt_ids=tok("x")["input_ids"],
                                                        params=SamplingParams(temperature=0), max_tokens=1900,
                                                        ignore_eos=True)) for _ in range(4)]
        await until(lambda: engine.stats.running == 4, "the four long requests to take every row")
        waiting = asyncio.create_task(generate(engine, tok, "y", 5))
        await until(lambda: engine.stats.waiting == 1, "the fifth request to queue")
        assert not waiting.done() and engine.stats.running == 4  # every row is taken
        for s in long_streams:
            s.cancel()
        tokens, _ = await asyncio.wait_for(waiting, timeout=10)
        return tokens

    assert len(asyncio.run(main())[0]) == 5
    assert engine.stats.running == 0


def test_prompt_logprobs_score_each_prompt_token(engine, tiny):
    model, tok = tiny
    prompt = "The quick brown fox"
    ids = tok(prompt)["input_ids"]

    async def main():
        req = GenerationRequest(prompt_ids=ids, params=SamplingParams(temperature=0), max_tokens=1,
                                prompt_logprobs=2)
        async for event in engine.submit(req):
            if event.prompt_logprobs is not None:
                return event.prompt_logprobs

    entries = asyncio.run(main())
    assert entries[0] is None and len(entries) == len(ids)
    logits = model(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits[0], -1)[ids[1]].item()
    assert entries[1].logprob == pytest.approx(expected, abs=1e-4)
    assert len(entries[1].top) == 2


async def events_of(engine, req):
    return [event async for event in engine.submit(req)]


def test_a_request_that_fails_its_prefill_fails_alone_and_the_engine_keeps_serving(engine, tiny):
    """A request the model cannot run (a token id past the vocabulary) gets an error event; the
    requests after it are served exactly as before, and the engine reports itself healthy."""
    _, tok = tiny
    bad = GenerationRequest(prompt_ids=[10**7], params=SamplingParams(temperature=0), max_tokens=4)

    async def main():
        failed = await asyncio.wait_for(events_of(engine, bad), 30)
        after = await asyncio.wait_for(generate(engine, tok, PROMPTS[0], 12), 30)
        return failed, after

    failed, (tokens, _) = asyncio.run(main())
    assert failed[-1].finished and failed[-1].error
    assert tokens[0] == reference(tiny, PROMPTS[0], 12)
    assert engine.healthy(stall_seconds=60) is None


def test_seeds_at_the_int64_edges_sample_and_choices_differ(engine, tiny):
    """The largest and smallest int64 seeds work for every choice (choice i uses seed + i)."""
    _, tok = tiny
    params = SamplingParams(temperature=1.0)

    async def main():
        return [await asyncio.wait_for(generate(engine, tok, "Hi", 8, params=params, seed=seed, n=2), 30)
                for seed in (2**63 - 1, -(2**63))]

    for tokens, _ in asyncio.run(main()):
        assert len(tokens[0]) == len(tokens[1]) == 8


def test_an_engine_that_holds_work_without_stepping_reports_why(engine):
    """A step that never finishes makes `healthy` name the stall, so `/health` can fail."""
    import threading

    release = threading.Event()

    async def main():
        job = asyncio.ensure_future(engine.run_job(lambda: release.wait(30)))
        await until(lambda: engine.healthy(stall_seconds=0.2) is not None, "the stall to be reported")
        reason = engine.healthy(stall_seconds=0.2)
        release.set()
        await job
        return reason

    assert "has not finished a step" in asyncio.run(main())
    assert engine.healthy(stall_seconds=0.2) is None


def test_an_engine_whose_thread_died_says_so_and_fails_what_it_held(tiny):
    """The engine thread ending on its own (a bug past the per-step guard) is reported by
    `healthy`, which `/health` and `/ready` answer 503 with, instead of requests hanging."""
    model, tok = tiny
    eng = GenerationEngine(model, tok, EngineConfig(max_model_len=2048, max_num_seqs=2), [tok.eos_token_id])

    def broken_loop() -> None:
        raise RuntimeError("boom")

    eng._loop = broken_loop
    eng.start()
    eng.thread.join(timeout=10)
    reason = eng.healthy(stall_seconds=60)
    assert reason is not None and "boom" in reason
