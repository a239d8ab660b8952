"""Per-row sampling inside one batch: each row gets exactly the settings it asked for."""

import math

import pytest
import torch

from modelfleet.worker.sampling import BatchParams, SamplingParams, draw, filtered_probs, sample

V = 50


def logits_for(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rows, V), generator=g) * 3


def kept(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Which tokens each row may draw: the non-zero weights `sample` hands to `draw`, which
    never picks a zero one (test_draw_never_picks_a_filtered_token)."""
    return filtered_probs(logits, BatchParams.build(params, V)) > 0


def gens(rows: int, seed: int = 1) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(rows)]


def run(params: list[SamplingParams], logits: torch.Tensor, generators=None, counts=None, seen=None):
    bp = BatchParams.build(params, V)
    rows = len(params)
    counts = counts if counts is not None else torch.zeros((rows, V), dtype=torch.int32)
    seen = seen if seen is not None else torch.zeros((rows, V), dtype=torch.bool)
    return sample(logits.clone(), bp, generators or gens(rows), counts, seen)


def test_greedy_rows_take_the_argmax_while_other_rows_sample():
    logits = logits_for(4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0)]
    out = run(params, logits)
    assert out.tokens[0] == int(logits[0].argmax())
    assert out.tokens[2] == int(logits[2].argmax())


@pytest.mark.parametrize("setting", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_filters_that_leave_one_token_equal_greedy(setting):
    logits = logits_for(8, seed=3)
    params = [SamplingParams(temperature=1.0, **setting)] * 8
    out = run(params, logits)
    assert out.tokens == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_only_the_k_best():
    logits = logits_for(1)
    row = kept(logits, [SamplingParams(top_k=5)])[0]
    assert row.sum() == 5
    assert set(row.nonzero().flatten().tolist()) == set(logits[0].topk(5).indices.tolist())


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    assert kept(logits, [SamplingParams(top_p=0.7)])[0].nonzero().flatten().tolist() == [0, 1]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    g = torch.Generator().manual_seed(0)
    counts = [0, 0, 0]
    for _ in range(4000):
        counts[int(draw(probs, [g])[0])] += 1
    assert counts[0] / 4000 == pytest.approx(0.7, abs=0.03)
    assert counts[2] / 4000 == pytest.approx(0.1, abs=0.02)


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    base = logits_for(1, seed=7)
    alone = run([SamplingParams(temperature=0.9)], base, [torch.Generator().manual_seed(42)])
    crowd = torch.cat([logits_for(5, seed=8), base])
    params = [SamplingParams(temperature=t) for t in (0.3, 1.2, 0.0, 0.7, 1.9)] + [SamplingParams(temperature=0.9)]
    gs = gens(5, seed=100) + [torch.Generator().manual_seed(42)]
    together = run(params, crowd, gs)
    assert together.tokens[-1] == alone.tokens[0]


def test_logit_bias_forces_and_bans_tokens_per_row():
    logits = logits_for(2)
    params = [SamplingParams(temperature=0, logit_bias={7: 100.0}),
              SamplingParams(temperature=0, logit_bias={int(logits[1].argmax()): -100.0})]
    out = run(params, logits)
    assert out.tokens[0] == 7
    assert out.tokens[1] != int(logits[1].argmax())


def test_frequency_penalty_only_hits_the_row_that_asked():
    logits = torch.zeros((2, V))
    logits[:, 3] = 1.0
    counts = torch.zeros((2, V), dtype=torch.int32)
    counts[:, 3] = 5
    params = [SamplingParams(temperature=0, frequency_penalty=1.0), SamplingParams(temperature=0)]
    out = run(params, logits, counts=counts)
    assert out.tokens[0] != 3
    assert out.tokens[1] == 3


def test_repetition_penalty_covers_prompt_tokens():
    logits = torch.zeros((1, V))
    logits[0, 9] = 2.0
    logits[0, 4] = 1.5
    seen = torch.zeros((1, V), dtype=torch.bool)
    seen[0, 9] = True
    out = run([SamplingParams(temperature=0, repetition_penalty=2.0)], logits, seen=seen)
    assert out.tokens == [4]


def test_logprobs_are_the_models_own_distribution():
    logits = logits_for(1)
    out = run([SamplingParams(temperature=0, want_logprobs=True, top_logprobs=3)], logits)
    lp = torch.log_softmax(logits[0], -1)
    assert out.logprobs[0] == pytest.approx(float(lp.max()), abs=1e-5)
    assert [t for t, _ in out.top_logprobs[0]] == lp.topk(3).indices.tolist()
    assert all(math.isfinite(v) for _, v in out.top_logprobs[0])


@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])  # flat (falls back to a sort) to peaked (candidates only)
def test_top_p_threshold_matches_the_sorted_definition(scale):
    from modelfleet.worker.sampling import top_p_threshold

    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn((6, 4000), generator=g) * scale, dim=-1)
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.95, 0.99, 1.0])
    got = top_p_threshold(probs, top_p)
    for row in range(6):
        ordered = torch.sort(probs[row], descending=True).values
        before = torch.cumsum(ordered, 0) - ordered
        kept = ordered[before < top_p[row]]
        expected = 0.0 if top_p[row] >= 1 else float(kept[-1])
        assert float(got[row]) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_draw_over_many_blocks_matches_the_full_inverse_cdf():
    """The two-level draw picks the token that a float64 cumulative sum over the whole row (the
    method before it) picks for the same uniform, so seeded outputs stay as they were, up to
    rounding at the edges of a token's interval."""
    from modelfleet.worker.sampling import DRAW_BLOCK

    vocab = 3 * DRAW_BLOCK + 17  # padded to whole blocks
    probs = torch.softmax(torch.randn((1, vocab), generator=torch.Generator().manual_seed(2)) * 2, dim=-1)
    for seed in range(300):
        u = torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        expected = int(torch.searchsorted(torch.cumsum(probs[0].double(), 0), u * probs[0].double().sum(),
                                          side="right"))
        assert int(draw(probs, [torch.Generator().manual_seed(seed)])[0]) == expected


def test_draw_never_picks_a_filtered_token():
    weights = torch.zeros((1, 1000))
    weights[0, [0, 255, 256, 999]] = torch.tensor([0.5, 2.0, 1.0, 0.5])  # unnormalised, across blocks
    g = torch.Generator().manual_seed(0)
    counts: dict[int, int] = {}
    for _ in range(4000):
        token = int(draw(weights, [g])[0])
        counts[token] = counts.get(token, 0) + 1
    assert set(counts) == {0, 255, 256, 999}
    assert counts[255] / 4000 == pytest.approx(0.5, abs=0.03)


def test_filters_apply_only_to_the_rows_that_ask():
    logits = logits_for(3, seed=4)
    params = [SamplingParams(top_p=0.5), SamplingParams(), SamplingParams(top_k=3, min_p=0.0)]
    counts = kept(logits, params).sum(dim=-1).tolist()
    alone = kept(logits[:1], params[:1]).sum().item()
    assert counts[0] == alone < V
    assert counts[1:] == [V, 3]


def test_logprobs_are_reported_for_the_rows_that_ask_only():
    logits = logits_for(3)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, want_logprobs=True, top_logprobs=2),
              SamplingParams(temperature=0)]
    out = run(params, logits)
    lp = torch.log_softmax(logits[1], -1)
    assert out.logprobs[0] is None and out.logprobs[2] is None
    assert out.logprobs[1] == pytest.approx(float(lp[out.tokens[1]]), abs=1e-5)
    assert [t for t, _ in out.top_logprobs[1]] == lp.topk(2).indices.tolist()
    assert out.tokens[0] == int(logits[0].argmax()) and out.tokens[2] == int(logits[2].argmax())
