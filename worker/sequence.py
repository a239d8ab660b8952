"""What the engine tracks per request and per generated sequence, and what it sends back.

A request with `n` choices owns `n` sequences; each sequence is one row of the running batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import SamplingParams
from .stops import TextState


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SeqDelta:
    """New output of one choice since the last event."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """One event for a request: deltas of any of its choices, with running token counts."""

    deltas: list[SeqDelta]
    prompt_tokens: int
    completion_tokens: int
    finished: bool = False
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


@dataclass
class GenerationRequest:
    """A validated request as the engine sees it: token ids and per-choice settings."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    prompt_logprobs: int | None = None  # top-k per prompt position (echo, vLLM's prompt_logprobs)
    request_id: str = ""
    grammar: Any = None  # constraints.Grammar: each choice decodes under its own matcher
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    adapter: str | None = None  # the LoRA adapter's peft key (worker/adapters.py); None: the base model


class RequestState:
    """Engine-side life of one request; `sink` receives events on the caller's event loop."""

    def __init__(self, request: GenerationRequest, sink: Any) -> None:
        self.request = request
        self.sink = sink
        self.cancelled = threading.Event()
        self.arrival = time.monotonic()
        self.prefill_started: float | None = None  # arrival to here: the queue (trace spans, modelfleet/tracing.py)
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.sequences: list[Sequence] = []
        self.completion_tokens = 0
        self.open_sequences = request.n
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.preempted = False  # out of the batch for KV room, waiting to be recomputed (engine._resume)
        # the chained keys of the prefix-cache blocks its rows copied their first tokens' KV from:
        # rows whose keys agree up to a block hold the same KV up to there (engine._shared_prefix)
        self.shared_blocks: tuple[int, ...] = ()

    def make_sequences(self) -> list[Sequence]:
        self.sequences = [Sequence(self, i) for i in range(self.request.n)]
        return self.sequences


class Sequence:
    """One choice: its generator, output tokens, text and finish state."""

    def __init__(self, owner: RequestState, index: int) -> None:
        req = owner.request
        self.owner = owner
        self.index = index
        self.generator = torch.Generator()
        if req.seed is not None:
            # torch takes seeds in [-2**63, 2**64); the API allows any int64, so choice n of a
            # request seeded near the top wraps instead of failing.
            self.generator.manual_seed((req.seed + index) % 2**64)
        else:
            self.generator.seed()
        self.output_ids: list[int] = []
        self.text = TextState(stops=req.stop, include_stop=req.include_stop_str_in_output,
                              skip_special=req.skip_special_tokens)
        self.finish_reason: str | None = None
        self.reported = False  # the final delta (with finish_reason) has been emitted
        self.last_token = -1
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprob] = []
        self.last_token_at: float | None = None
        self.constraint = req.grammar.matcher() if req.grammar is not None else None

    @property
    def params(self) -> SamplingParams:
        return self.owner.request.params

    def total_length(self) -> int:
        return len(self.owner.request.prompt_ids) + len(self.output_ids)
