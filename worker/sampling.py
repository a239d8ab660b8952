"""Pure sampling: a batch of logits plus each row's own parameters -> next tokens and logprobs.

Every row in a continuous batch may ask for different parameters, so each transform here takes
per-row tensors and leaves rows that did not ask for it untouched. transformers' LogitsProcessor
classes apply one setting to a whole batch, which is why they do not fit this loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling settings, in the OpenAI meaning of each field."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int = 0
    want_logprobs: bool = False
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's: when set, only these are sampled
    bad_words: tuple[tuple[int, ...], ...] = ()  # vLLM's, as token ids: see `banned_by_bad_words`

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class BatchParams:
    """The per-row tensors that the transforms below read, built once per batch change."""

    temperature: torch.Tensor  # [B] (greedy rows hold 1.0; see `greedy_rows`)
    top_p: torch.Tensor  # [B]
    top_k: torch.Tensor  # [B] long, 0 = off
    min_p: torch.Tensor  # [B]
    presence: torch.Tensor  # [B]
    frequency: torch.Tensor  # [B]
    repetition: torch.Tensor  # [B]
    bias_rows: list[tuple[int, list[int], list[float]]]
    allowed_rows: list[tuple[int, list[int]]]
    any_top_p: bool
    any_top_k: bool
    any_min_p: bool
    any_penalty: bool
    any_repetition: bool
    max_top_logprobs: int
    any_logprobs: bool
    greedy_rows: torch.Tensor  # [G] long: the greedy rows
    sampled_rows: torch.Tensor | None  # [S] long: the sampled rows, None when that is every row
    logprob_rows: torch.Tensor | None  # [L] long: the rows that want logprobs, None when all do

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int) -> BatchParams:
        def col(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype)

        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]

        def subset(picked: list[int]) -> torch.Tensor | None:
            return None if len(picked) == len(params) else torch.tensor(picked, dtype=torch.long)

        greedy = [row for row, p in enumerate(params) if p.greedy]
        bias_rows = []
        for row, p in enumerate(params):
            ids = [t for t in p.logit_bias if 0 <= t < vocab_size]
            if ids:
                bias_rows.append((row, ids, [p.logit_bias[t] for t in ids]))
        return cls(
            temperature=col([1.0 if p.greedy else p.temperature for p in params]),
            top_p=col([p.top_p for p in params]),
            top_k=col(top_k, torch.long),
            min_p=col([p.min_p for p in params]),
            presence=col([p.presence_penalty for p in params]),
            frequency=col([p.frequency_penalty for p in params]),
            repetition=col([p.repetition_penalty for p in params]),
            bias_rows=bias_rows,
            allowed_rows=[(row, list(p.allowed_token_ids)) for row, p in enumerate(params) if p.allowed_token_ids],
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_top_k=any(k > 0 for k in top_k),
            any_min_p=any(p.min_p > 0.0 for p in params),
            any_penalty=any(p.presence_penalty or p.frequency_penalty for p in params),
            any_repetition=any(p.repetition_penalty != 1.0 for p in params),
            max_top_logprobs=max((p.top_logprobs for p in params), default=0),
            any_logprobs=any(p.want_logprobs for p in params),
            greedy_rows=torch.tensor(greedy, dtype=torch.long),
            sampled_rows=subset([row for row, p in enumerate(params) if not p.greedy]),
            logprob_rows=subset([row for row, p in enumerate(params) if p.want_logprobs]),
        )


def apply_logit_bias(logits: torch.Tensor, bias_rows: list[tuple[int, list[int], list[float]]]) -> None:
    for row, ids, values in bias_rows:
        logits[row, ids] += torch.tensor(values, dtype=logits.dtype)


def apply_allowed(logits: torch.Tensor, allowed_rows: list[tuple[int, list[int]]]) -> None:
    """vLLM's allowed_token_ids: every other id of the row becomes -inf."""
    for row, ids in allowed_rows:
        keep = torch.full_like(logits[row], float("-inf"))
        keep[ids] = logits[row, ids]
        logits[row] = keep


def banned_by_bad_words(output_ids: list[int], bad_words: tuple[tuple[int, ...], ...]) -> list[int]:
    """vLLM's bad_words: the last token of each word, where the tokens before it end the output
    so far (a one-token word is always banned). transformers' NoBadWordsLogitsProcessor does
    this for one word list per batch; here each row has its own."""
    banned = []
    for word in bad_words:
        head = word[:-1]
        if not head or (len(output_ids) >= len(head) and tuple(output_ids[len(output_ids) - len(head):]) == head):
            banned.append(word[-1])
    return banned


def apply_penalties(
    logits: torch.Tensor, output_counts: torch.Tensor, seen: torch.Tensor, bp: BatchParams
) -> None:
    """OpenAI presence/frequency penalties over generated tokens; HF-style repetition penalty
    over prompt and generated tokens (divide positive logits, multiply negative ones)."""
    if bp.any_penalty:
        counts = output_counts.to(logits.dtype)
        logits -= bp.frequency[:, None] * counts
        logits -= bp.presence[:, None] * (counts > 0).to(logits.dtype)
    if bp.any_repetition:
        rep = bp.repetition[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits.copy_(torch.where(seen, penalised, logits))


TOP_P_CANDIDATES = 256
DRAW_BLOCK = 256


def _rows(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return values if rows is None else values[rows]


def filtered_probs(logits: torch.Tensor, bp: BatchParams, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature, then top-k, min-p and top-p per row, as unnormalised probabilities: each
    row's softmax numerator exp((logit - max) / temperature), whose largest entry is 1, with
    filtered entries set to 0. `draw` scales its uniform by each row's total, so normalising
    would be a wasted pass. `rows` selects the parameter rows that `logits` holds.

    This is one [B, V] allocation and a handful of passes, in place: a step's sampling work is
    comparable to a small model's forward on a CPU. Filters multiply by a keep mask instead of
    `masked_fill` (several times slower there), and top-k and top-p run only on the rows that
    ask. Top-k and min-p each keep a head of the same ordering, so their order does not matter;
    top-p then reads the mass of what they kept, as in vLLM. A full sort of the vocabulary costs
    more than a decode step, so each filter finds a per-row threshold instead: top-k from one
    `topk`, top-p from the most likely few hundred tokens (see `top_p_threshold`).
    """
    weights = logits - logits.amax(dim=-1, keepdim=True)
    temperature = _rows(bp.temperature, rows)
    if bool((temperature != 1.0).any()):
        weights /= temperature[:, None]
    keep_k = None
    if bp.any_top_k:
        top_k = _rows(bp.top_k, rows)
        asking = (top_k > 0).nonzero().squeeze(-1)
        if len(asking) == len(weights):
            kth = torch.topk(weights, int(top_k.max()), dim=-1).values.gather(-1, (top_k - 1)[:, None])
            keep_k = weights >= kth
        elif len(asking):
            subset = weights[asking]
            kth = torch.topk(subset, int(top_k.max()), dim=-1).values.gather(-1, (top_k[asking] - 1)[:, None])
            keep_k = subset >= kth
    weights.exp_()
    if keep_k is not None:
        if len(keep_k) == len(weights):
            weights *= keep_k
        else:
            weights[asking] = weights[asking] * keep_k
    if bp.any_min_p:  # min-p keeps weights >= min_p x the largest, which is 1
        weights *= weights >= _rows(bp.min_p, rows)[:, None]
    if bp.any_top_p:
        top_p = _rows(bp.top_p, rows)
        asking = (top_p < 1.0).nonzero().squeeze(-1)
        if len(asking) == len(weights):
            weights *= weights >= top_p_threshold(weights, top_p)[:, None]
        elif len(asking):
            subset = weights[asking]
            weights[asking] = subset * (subset >= top_p_threshold(subset, top_p[asking])[:, None])
    return weights


def _cutoff(sorted_probs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Probability of the last token kept: keep a token while the mass before it is < `mass`."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep = (mass_before < mass[:, None]).sum(dim=-1).clamp(min=1)
    return sorted_probs.gather(-1, (keep - 1)[:, None]).squeeze(-1)


def top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row probability below which top-p (nucleus) filtering drops a token. `probs` need not
    sum to one (earlier filters zero entries without renormalising): `top_p` is read as a share
    of each row's total."""
    mass = top_p * probs.sum(dim=-1)
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    head = torch.topk(probs, k, dim=-1).values
    threshold = _cutoff(head, mass)
    spread = head.sum(dim=-1) < mass  # the candidates do not reach the mass: sort those rows
    if bool(spread.any()):
        rows = spread.nonzero().squeeze(-1)
        full = torch.sort(probs[rows], dim=-1, descending=True).values
        threshold[rows] = _cutoff(full, mass[rows])
    return torch.where(top_p >= 1.0, torch.zeros_like(threshold), threshold)


def draw(weights: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse CDF over `weights` (probabilities, not necessarily summing to
    one), each row with its own generator, so that a seeded request draws the same numbers
    whatever else shares its batch: one float64 uniform per row per step.

    The CDF has two levels, because a cumulative sum over the whole vocabulary is a sequential
    scan (with the float64 copy it needs, the costliest op of a sampled step): block totals, a
    vectorised reduction, locate the block of DRAW_BLOCK tokens that holds the uniform, and a
    cumulative sum over that one block locates the token. Searching with side="right" and a
    target strictly below the total never lands on a zero-weight (filtered) token.
    """
    rows, vocab = weights.shape
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    pad = -vocab % DRAW_BLOCK
    blocks = torch.nn.functional.pad(weights, (0, pad)) if pad else weights
    blocks = blocks.reshape(rows, -1, DRAW_BLOCK)
    sums = blocks.sum(dim=-1).to(torch.float64)
    cdf = torch.cumsum(sums, dim=-1)
    total = cdf[:, -1]
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(cdf, target[:, None], side="right").clamp_(max=cdf.shape[-1] - 1)
    inner = torch.cumsum(blocks[torch.arange(rows), block.squeeze(-1)].to(torch.float64), dim=-1)
    rest = (target[:, None] - (cdf.gather(-1, block) - sums.gather(-1, block))).clamp_(min=0.0)
    rest = torch.minimum(rest, torch.nextafter(inner[:, -1:], torch.zeros_like(rest)))
    offset = torch.searchsorted(inner, rest, side="right").clamp_(max=DRAW_BLOCK - 1)
    return (block * DRAW_BLOCK + offset).squeeze(-1).clamp_(max=vocab - 1)


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float | None] | None  # logprob of each chosen token (None: the row did not ask)
    top_logprobs: list[list[tuple[int, float]]] | None


def sample(
    logits: torch.Tensor,
    bp: BatchParams,
    generators: list[torch.Generator],
    output_counts: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> SampleOutput:
    """The whole pipeline for one decode step of a batch. `logits` is [B, V] float32, left as given.

    Logprobs are those of the model's own distribution (before penalties and temperature), the
    choice vLLM makes by default, so they stay comparable across sampling settings; they are
    computed for the rows that ask only (the others hold None). Greedy rows take the argmax and
    sampled rows go through `filtered_probs` and `draw`, each part on its own rows only, so an
    all-greedy batch never computes a softmax.
    """
    logprobs_all = None
    if bp.any_logprobs:
        logprobs_all = torch.log_softmax(_rows(logits, bp.logprob_rows), dim=-1)
    work = logits
    penalised = (bp.any_penalty or bp.any_repetition) and output_counts is not None and seen is not None
    if bp.bias_rows or bp.allowed_rows or penalised:
        work = logits.clone()
        apply_logit_bias(work, bp.bias_rows)
        apply_allowed(work, bp.allowed_rows)
        if penalised:
            apply_penalties(work, output_counts, seen, bp)
    if bp.sampled_rows is None:  # every row samples
        tokens = draw(filtered_probs(work, bp), generators)
    elif not len(bp.sampled_rows):  # every row is greedy
        tokens = torch.argmax(work, dim=-1)
    else:
        tokens = torch.empty(len(generators), dtype=torch.long)
        tokens[bp.greedy_rows] = torch.argmax(work[bp.greedy_rows], dim=-1)
        tokens[bp.sampled_rows] = draw(filtered_probs(work[bp.sampled_rows], bp, bp.sampled_rows),
                                       [generators[i] for i in bp.sampled_rows.tolist()])
    token_list = tokens.tolist()
    if logprobs_all is None:
        return SampleOutput(token_list, None, None)
    asking = range(len(token_list)) if bp.logprob_rows is None else bp.logprob_rows.tolist()
    chosen_ids = _rows(tokens, bp.logprob_rows)
    chosen: list[float | None] = [None] * len(token_list)
    for row, value in zip(asking, logprobs_all.gather(-1, chosen_ids[:, None]).squeeze(-1).tolist(), strict=True):
        chosen[row] = value
    tops: list[list[tuple[int, float]]] = [[] for _ in token_list]
    if bp.max_top_logprobs > 0:
        values, ids = torch.topk(logprobs_all, bp.max_top_logprobs, dim=-1)
        for row, vs, ts in zip(asking, values.tolist(), ids.tolist(), strict=True):
            tops[row] = list(zip(ts, vs, strict=True))
    return SampleOutput(token_list, chosen, tops)
