"""Chunked prefill: a prompt longer than one step's token budget is prefilled over several steps,
a chunk per step, between the running sequences' decodes, so that a long prompt delays each
running stream by one budget's worth of compute at most instead of its whole prefill.

The budget is vLLM's `--max-num-batched-tokens` with vLLM's meaning: the tokens one step may
feed the model, decodes first (one token per running row), prefill chunks in what is left. As
in vLLM's default (one partial prefill at a time), one prompt at a time is prefilled in chunks,
and requests queued behind it wait for it (arrival order, no overtaking).

A chunked prompt computes its chunks into one prompt-wide buffer (kvcache.cache_over_past),
whose first columns are its cached prefix, if any, read once when the prefill starts; each chunk
attends to everything before it there, exactly as the whole prompt would. A chunk that is not
the last ends on a prefix-cache block boundary where it can, so that each chunk's blocks are
complete and cached as soon as they are computed (a request cancelled halfway leaves them for the
next with the same prompt; the store after the last chunk skips them). When the last chunk is
done the sequence joins the slot cache as any prefilled one does. The buffer, like any
prefill's, lives outside `--kv-cache-memory`; the budget counts the sequence's slot-cache KV from
the step it was admitted in (scheduler.KvRoom), and when it joins, the newest running requests
are preempted if the rows have outgrown the room planned for it (engine._make_kv_room).

A preempted request's recompute takes the same path (vLLM recomputes through its scheduler's
chunked prefill too): its sequences' tokens so far are prefilled in chunks on top of whatever of
them the prefix cache holds, so taking long sequences back into the batch delays the running
streams by one budget a step at most, as a long prompt does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sequence import RequestState, Sequence


@dataclass(frozen=True)
class StepRecord:
    """What one engine step fed the model: for checking (and reading) the step budget."""

    # rows that were decoding when the step began: the streams it delayed (rows admitted in the
    # step take their first decode in it too, as one more row of the same batched forward)
    decode_rows: int
    prefill_tokens: int  # prompt tokens computed (cached prefix and padding not counted)
    chunked: bool = False  # a chunk of a longer prompt was among them


def prefill_budget(token_budget: int, decode_rows: int) -> int:
    """Prompt tokens one step may compute next to `decode_rows` decodes (vLLM's accounting: a
    decode costs one token of `--max-num-batched-tokens`)."""
    return max(0, token_budget - decode_rows)


def chunk_end(done: int, total: int, room: int, block_size: int) -> int:
    """Where the next chunk of a prompt ends: at most `room` tokens after `done`, the whole rest
    if it fits; otherwise cut down to a block boundary where that still leaves a chunk, so that
    each chunk's blocks are complete when it is stored in the prefix cache."""
    end = min(total, done + max(0, room))
    if end < total and block_size > 0:
        aligned = end - end % block_size
        if aligned > done:
            end = aligned
    return end


@dataclass(eq=False)
class ChunkedPrefill:
    """A prefill in progress: the token rows it computes, its buffer as wide as they are, how
    much of them is computed (`done`, the reused prefix included), and, for prompt logprobs, each
    chunk's logits. A new request's prefill computes one row, its prompt; the recompute of a
    preempted one a row per unfinished sequence (`resumed`), its prompt and all it generated but
    the last token, which the next decode step feeds, and samples nothing when it joins. The
    sequences of one request decode in lockstep, so its rows are equally long and chunk as one."""

    state: RequestState
    tokens: list[list[int]]  # one list per row, all as long
    cache: object  # transformers Cache over a prompt-wide buffer (kvcache.PastLayer layers)
    done: int
    reused: int  # of `done`, tokens whose KV came from the prefix cache
    resumed: list[Sequence] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.tokens[0])
