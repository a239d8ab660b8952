"""A prefill on top of a cached prefix writes the prefix once, into its rows' own slots, and
attends to it there: the rows must end up as a full prefill would leave them, beside rows that
are decoding, whether the newcomers are longer than those rows or shorter."""

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from modelfleet.worker.prefix_cache import PrefixCache, PrefixMatch
from modelfleet.worker.sampling import SamplingParams
from modelfleet.worker.sequence import GenerationRequest, RequestState

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_engine, beside this file
from demo_engine import expected_logprobs, make_engine, reference  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer briefly and cite the manual where you can. " * 4
QUESTIONS = ["What is a pod?", "How do I scale a deployment to three replicas, and why would I?"]


def submit(engine, loop, ids: list[int], max_tokens: int, n: int = 1) -> RequestState:
    req = GenerationRequest(prompt_ids=ids, params=SamplingParams(temperature=0, want_logprobs=True),
                            max_tokens=max_tokens, ignore_eos=True, n=n)
    state = RequestState(req, (loop, asyncio.Queue()))
    engine.waiting.append(state)
    return state


def run(engine, outputs: dict[int, tuple[list[int], list[float]]]) -> None:
    """Steps the (not started) engine until nothing is left, collecting choice 0's tokens and
    logprobs per request."""
    while engine.waiting or engine.rows or engine.partial:
        engine._admit()
        if engine.rows:
            engine._decode_step()
        for state, event in engine.outbox:
            assert event.error is None
            tokens, lps = outputs.setdefault(id(state), ([], []))
            for d in event.deltas:
                if d.index == 0:
                    tokens.extend(d.token_ids)
                    lps.extend(lp.logprob for lp in d.logprobs or [])
        engine.outbox.clear()


@pytest.mark.parametrize("running", ["longer", "shorter"])
def test_prefix_hits_prefill_in_their_slots_beside_decoding_rows(tiny, running):
    """A running row longer than the newcomers (they fit left of the cursor) or shorter (every
    row moves right to make room): each newcomer's tokens and logprobs are a full prefill's, and
    nothing is copied into the slot cache after their prefill."""
    _, tok = tiny
    loop = asyncio.new_event_loop()
    eng = make_engine(tiny)
    system = tok(SYSTEM)["input_ids"]
    other = tok("import os\n" * (80 if running == "longer" else 2))["input_ids"]
    prompts = [system + tok(q)["input_ids"] for q in QUESTIONS]
    outputs: dict[int, tuple[list[int], list[float]]] = {}
    submit(eng, loop, system + tok(" Ready?")["input_ids"], 1)
    run(eng, outputs)  # caches the system prompt
    runner = submit(eng, loop, other, 24)
    for _ in range(3):
        eng._admit()
        eng._decode_step()
    copied = []
    add_rows = eng.pool.add_rows
    eng.pool.add_rows = lambda *a: copied.append(a) or add_rows(*a)
    states = [submit(eng, loop, ids, 8) for ids in prompts]
    eng._admit()
    assert not copied and len(eng.rows) == 3
    assert max(s.cached_tokens for s in states) == len(system) // 16 * 16  # the longer one reuses all
    run(eng, outputs)
    for state, ids in zip(states, prompts, strict=True):
        tokens, lps = outputs[id(state)]
        assert tokens == reference(tiny, ids, 8)
        assert lps == pytest.approx(expected_logprobs(tiny, ids, tokens), abs=1e-4)
    assert outputs[id(runner)][0] == reference(tiny, other, 24)


def test_n_choices_of_a_prefix_hit_still_copy_from_a_prefill_buffer(tiny):
    _, tok = tiny
    loop = asyncio.new_event_loop()
    eng = make_engine(tiny)
    ids = tok(SYSTEM + QUESTIONS[0])["input_ids"]
    outputs: dict[int, tuple[list[int], list[float]]] = {}
    submit(eng, loop, ids, 1)
    run(eng, outputs)
    state = submit(eng, loop, ids, 6, n=2)
    run(eng, outputs)
    assert state.cached_tokens > 0
    assert outputs[id(state)][0] == reference(tiny, ids, 6)


def test_write_past_places_each_rows_blocks_as_read_gives_them():
    """One gather per layer for every row: rows with the same chain read it once, rows sharing
    only its head, a partial last block, a row that reuses nothing, and a wider buffer dtype than
    the cache's."""
    torch.manual_seed(0)
    cache = PrefixCache(num_layers=2, kv_heads=2, head_dim=4, block_size=4, num_blocks=32,
                        dtype=torch.bfloat16, device=torch.device("cpu"))
    base = list(range(100, 116))
    prompts = [base, base[:8] + [7] * 8, base]
    for ids in prompts:
        kv = [torch.randn(2, len(ids), 4) for _ in range(2)]
        cache.store(ids, kv, [k + 1 for k in kv])
    matches = [cache.match(ids) for ids in prompts] + [PrefixMatch(block_size=4)]
    reused, past = [14, 15, 16, 0], 17
    keys = [torch.full((4, 2, 20, 4), float("nan")) for _ in range(2)]
    values = [torch.full((4, 2, 20, 4), float("nan")) for _ in range(2)]
    cache.write_past(keys, values, matches, reused, past)
    for layer in range(2):
        for i, count in enumerate(reused):
            start = past - count
            for buf, want in zip((keys[layer], values[layer]),
                                 cache.read(matches[i], layer, count) if count else (None, None), strict=True):
                assert torch.equal(buf[i, :, :start], torch.zeros(2, start, 4))
                if count:
                    assert torch.equal(buf[i, :, start:past], want.float())
                assert torch.isnan(buf[i, :, past:]).all()
    for m in matches:
        cache.release(m)
