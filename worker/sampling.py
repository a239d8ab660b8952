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

    temperature: torch.Tensor  # [B] (greedy rows hold 1.0; see `greedy`)
    greedy: torch.Tensor  # [B] bool
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

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int) -> BatchParams:
        def col(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype)

        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        bias_rows = []
        for row, p in enumerate(params):
            ids = [t for t in p.logit_bias if 0 <= t < vocab_size]
            if ids:
                bias_rows.append((row, ids, [p.logit_bias[t] for t in ids]))
        return cls(
            temperature=col([1.0 if p.greedy else p.temperature for p in params]),
            greedy=col([p.greedy for p in params], torch.bool),
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


def filter_logits(logits: torch.Tensor, bp: BatchParams) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p per row; filtered entries become -inf.

    A full sort of the vocabulary costs more than a small model's decode step on a CPU, so each
    filter finds a per-row threshold instead: top-k from one `topk`, top-p from the most likely
    few hundred tokens, sorting the whole row only where those do not hold the requested mass.
    """
    logits = logits / bp.temperature[:, None]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype)
    if bp.any_min_p:
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * bp.min_p[:, None]
        logits = logits.masked_fill(probs < threshold, neg_inf)
    if bp.any_top_k:
        k_max = int(bp.top_k.max())
        best = torch.topk(logits, k_max, dim=-1).values
        kth = best.gather(-1, (bp.top_k.clamp(min=1) - 1)[:, None])
        kth = torch.where(bp.top_k[:, None] > 0, kth, neg_inf)
        logits = logits.masked_fill(logits < kth, neg_inf)
    if bp.any_top_p:
        probs = torch.softmax(logits, dim=-1)
        threshold = top_p_threshold(probs, bp.top_p)
        logits = logits.masked_fill(probs < threshold[:, None], neg_inf)
    return logits


def _cutoff(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probability of the last token kept: keep a token while the mass before it is < top_p."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep = (mass_before < top_p[:, None]).sum(dim=-1).clamp(min=1)
    return sorted_probs.gather(-1, (keep - 1)[:, None]).squeeze(-1)


def top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row probability below which top-p (nucleus) filtering drops a token."""
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    head = torch.topk(probs, k, dim=-1).values
    threshold = _cutoff(head, top_p)
    spread = head.sum(dim=-1) < top_p  # the candidates do not reach the mass: sort those rows
    if bool(spread.any()):
        rows = spread.nonzero().squeeze(-1)
        full = torch.sort(probs[rows], dim=-1, descending=True).values
        threshold[rows] = _cutoff(full, top_p[rows])
    return torch.where(top_p >= 1.0, torch.zeros_like(threshold), threshold)


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse CDF, each row with its own generator, so that a seeded
    request draws the same numbers whatever else shares its batch."""
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    cdf[:, -1] = 1.0 + 1e-9  # guards against rounding leaving the total a hair under u
    return torch.searchsorted(cdf, uniforms[:, None]).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float] | None  # logprob of each chosen token
    top_logprobs: list[list[tuple[int, float]]] | None


def sample(
    logits: torch.Tensor,
    bp: BatchParams,
    generators: list[torch.Generator],
    output_counts: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> SampleOutput:
    """The whole pipeline for one decode step of a batch. `logits` is [B, V] float32.

    Logprobs are those of the model's own distribution (before penalties and temperature), the
    choice vLLM makes by default, so they stay comparable across sampling settings.
    """
    logprobs_all = torch.log_softmax(logits, dim=-1) if bp.any_logprobs else None
    work = logits.clone()
    apply_logit_bias(work, bp.bias_rows)
    apply_allowed(work, bp.allowed_rows)
    if (bp.any_penalty or bp.any_repetition) and output_counts is not None and seen is not None:
        apply_penalties(work, output_counts, seen, bp)
    greedy_tokens = torch.argmax(work, dim=-1)
    if bool(bp.greedy.all()):
        tokens = greedy_tokens
    else:
        probs = torch.softmax(filter_logits(work, bp), dim=-1)
        tokens = torch.where(bp.greedy, greedy_tokens, draw(probs, generators))
    token_list = tokens.tolist()
    if logprobs_all is None:
        return SampleOutput(token_list, None, None)
    chosen = logprobs_all.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in token_list]
    if bp.max_top_logprobs > 0:
        values, ids = torch.topk(logprobs_all, bp.max_top_logprobs, dim=-1)
        for row, (vs, ts) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
            tops[row] = list(zip(ts, vs, strict=True))
    return SampleOutput(token_list, chosen, tops)
