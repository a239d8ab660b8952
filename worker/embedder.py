"""Embeddings with dynamic batching: concurrent requests share one forward pass.

Sentence-transformers models run through the library's own module pipeline (its tokenizer
settings, pooling and Normalize modules), so results match `SentenceTransformer.encode`.
Causal LMs give the mean of the last hidden states over the prompt's tokens, L2-normalised: mean
pooling needs no special token at the end, which random and chat models do not reliably have,
and normalising makes cosine similarity a dot product, as with OpenAI's embeddings.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from modelfleet.protocol import OpenAIError

EmbedInput = str | list[int]


@dataclass
class EmbedResult:
    vectors: list[torch.Tensor]
    tokens: int


@dataclass
class LoopQueue:
    """The requests one event loop has submitted, and how its last batch went."""

    pending: list[tuple[list[EmbedInput], asyncio.Future]] = field(default_factory=list)
    draining: asyncio.Task | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    last_size: int = 0
    last_finished: float = 0.0

    def pending_items(self) -> int:
        return sum(len(items) for items, _ in self.pending)


class DynamicBatcher:
    """Collects what arrives while a batch runs and sends it as the next batch.

    After a batch of N finishes, its N clients answer and send their next requests over a few
    milliseconds. Starting the next batch on the first of them splits N clients into a batch of 1
    and a batch of N-1, and a batch of 1 costs three times as much per item as a batch of 32 on a
    CPU. So the batcher lingers for arrivals until it has a target number of items, no arrival
    has come for `quiet` seconds, or `linger` seconds have passed; a lone client (last batch 1) or
    an idle worker never waits.

    The target is the last batch's size, or half of it once halves hold at least `half_min`
    items: two half batches then take turns, one computing while the other's clients are
    answered and send again, so the model never idles on HTTP. On MiniLM here a batch of 16
    costs about the same per item as one of 32, and one of 8 about 15% more.

    Written by hand: the few batching libraries on PyPI add a server of their own, where this
    needs a few dozen lines on the event loop the worker already runs. Each event loop that
    submits gets a queue of its own (LoopQueue), so a caller that starts a loop per call (a
    sync wrapper around asyncio.run, a test) is served rather than left waiting on another loop.
    """

    def __init__(self, run_batch: Callable[[list[EmbedInput]], Awaitable[tuple[list[torch.Tensor], list[int]]]],
                 max_items: int = 64, linger: float = 0.02, quiet: float = 0.004,
                 half_min: int = 8) -> None:
        self.run_batch = run_batch
        self.max_items = max_items
        self.linger = linger
        self.quiet = quiet
        self.half_min = half_min
        # Per event loop: asyncio's futures, tasks and events belong to the loop that made them,
        # and a caller may run a loop per call (asyncio.run in a sync wrapper, or tests).
        self.queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopQueue] = weakref.WeakKeyDictionary()

    def queue(self) -> LoopQueue:
        """The running loop's queue, made on its first request."""
        loop = asyncio.get_running_loop()
        queue = self.queues.get(loop)
        if queue is None:
            queue = self.queues[loop] = LoopQueue()
        return queue

    async def submit(self, items: list[EmbedInput]) -> EmbedResult:
        queue = self.queue()
        future = asyncio.get_running_loop().create_future()
        queue.pending.append((items, future))
        queue.arrived.set()
        if queue.draining is None or queue.draining.done():
            queue.draining = asyncio.create_task(self._drain(queue))
        return await future

    async def _await_arrivals(self, queue: LoopQueue) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - queue.last_finished > self.linger:
            return  # idle before this request: nobody else is about to arrive
        expected = min(queue.last_size, self.max_items)
        if expected >= 2 * self.half_min:
            expected //= 2
        deadline = queue.last_finished + self.linger
        while queue.pending_items() < expected and (left := deadline - loop.time()) > 0:
            queue.arrived.clear()
            try:
                await asyncio.wait_for(queue.arrived.wait(), min(self.quiet, left))
            except TimeoutError:
                return

    async def _drain(self, queue: LoopQueue) -> None:
        pending = queue.pending
        while pending:
            await self._await_arrivals(queue)
            jobs, count = [], 0
            while pending and (not jobs or count + len(pending[0][0]) <= self.max_items):
                items, future = pending.pop(0)
                jobs.append((items, future))
                count += len(items)
            flat = [item for items, _ in jobs for item in items]
            try:
                vectors, tokens = await self._forward(flat)
            except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                queue.last_size, queue.last_finished = count, asyncio.get_running_loop().time()
            at = 0
            for items, future in jobs:
                n = len(items)
                if not future.done():
                    future.set_result(EmbedResult(vectors[at : at + n], sum(tokens[at : at + n])))
                at += n


    async def _forward(self, flat: list[EmbedInput]) -> tuple[list[torch.Tensor], list[int]]:
        """At most `max_items` a forward pass: one request may bring 2,048 inputs, and attention
        over a batch of 2,048 texts of 512 tokens would not fit in memory."""
        vectors: list[torch.Tensor] = []
        tokens: list[int] = []
        for start in range(0, len(flat), self.max_items):
            part_vectors, part_tokens = await self.run_batch(flat[start : start + self.max_items])
            vectors += part_vectors
            tokens += part_tokens
        return vectors, tokens


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


class SentenceEmbedder:
    """A sentence-transformers model, run on one thread of its own."""

    def __init__(self, model: Any, max_items: int = 64) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_len = model.get_max_seq_length() or 512
        self.normalized = any(type(m).__name__ == "Normalize" for m in model)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.batcher = DynamicBatcher(self._run, max_items)

    async def embed(self, items: list[EmbedInput]) -> EmbedResult:
        return await self.batcher.submit(items)

    async def _run(self, items: list[EmbedInput]) -> tuple[list[torch.Tensor], list[int]]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._forward, items)

    def _features(self, items: list[EmbedInput]) -> dict[str, torch.Tensor]:
        if all(isinstance(i, str) for i in items):
            prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # renamed in v6
            return prepare(items)
        sequences = []
        for item in items:
            ids = self.tokenizer(item, truncation=True, max_length=self.max_len)["input_ids"] if isinstance(
                item, str) else item[: self.max_len]
            sequences.append(ids)
        ids, mask = _pad(sequences, self.tokenizer.pad_token_id or 0)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    def _forward(self, items: list[EmbedInput]) -> tuple[list[torch.Tensor], list[int]]:
        features = self._features(items)
        device = self.model.device
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.inference_mode():
            out = self.model(features)["sentence_embedding"].float().cpu()
        tokens = features["attention_mask"].sum(dim=1).tolist()
        return list(out), tokens


class CrossEncoderScorer:
    """A sentence-transformers CrossEncoder (a `*ForSequenceClassification` checkpoint with one
    label): each (query, document) pair read together gives one logit. Pairs of concurrent
    requests share a forward pass through the same batcher as embeddings; results are logits,
    and `activate` applies the model's activation (sigmoid unless its config names another),
    as `CrossEncoder.predict` does, only when a request wants it (vLLM's `use_activation`)."""

    def __init__(self, model: Any, max_items: int = 64) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self.batcher = DynamicBatcher(self._run, max_items)

    async def score(self, pairs: list[tuple[str, str]]) -> EmbedResult:
        return await self.batcher.submit(pairs)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return self.model.activation_fn(logits)

    async def _run(self, pairs: list[tuple[str, str]]) -> tuple[list[torch.Tensor], list[int]]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._forward, pairs)

    def _forward(self, pairs: list[tuple[str, str]]) -> tuple[list[torch.Tensor], list[int]]:
        """One forward pass (the batcher keeps it to `max_items` pairs)."""
        # preprocess tokenizes each pair together, truncated to the model's max_seq_length.
        features = self.model.preprocess([list(p) for p in pairs])
        features = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.inference_mode():
            scores = list(self.model(features)["scores"].float().cpu()[:, 0])
        return scores, features["attention_mask"].sum(dim=1).tolist()


class CausalEmbedder:
    """Pooled hidden states of a causal LM, computed on the generation engine's thread."""

    def __init__(self, engine: Any, max_model_len: int, max_items: int = 32) -> None:
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.max_len = max_model_len
        self.normalized = True
        self.batcher = DynamicBatcher(self._run, max_items)

    async def embed(self, items: list[EmbedInput]) -> EmbedResult:
        """Every input of the request is tokenized and checked before any is computed: one too
        long late in a long list fails the request at once, naming its index in the request,
        and never fails a batch that other requests share."""
        return await self.batcher.submit([self._tokens(i, item) for i, item in enumerate(items)])

    def _tokens(self, index: int, item: EmbedInput) -> list[int]:
        ids = self.tokenizer(item, add_special_tokens=True)["input_ids"] if isinstance(item, str) else item
        if not ids:
            raise OpenAIError(f"Input {index} is empty.", param="input")
        if len(ids) > self.max_len:
            raise OpenAIError(
                f"Input {index} has {len(ids)} tokens, more than this model's maximum context length of "
                f"{self.max_len}.", param="input", code="context_length_exceeded")
        return ids

    async def _run(self, sequences: list[list[int]]) -> tuple[list[torch.Tensor], list[int]]:
        return await self.engine.run_job(lambda: self._forward(sequences))

    def _forward(self, sequences: list[list[int]]) -> tuple[list[torch.Tensor], list[int]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = _pad(sequences, pad)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            hidden = self.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            weights = mask.to(device, hidden.dtype)[:, :, None]
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        return list(pooled), [len(s) for s in sequences]


def shape_vector(vector: torch.Tensor, dimensions: int | None, normalized: bool) -> torch.Tensor:
    """Applies OpenAI's `dimensions`: keep the first N values, then re-normalise if the model's
    output was normalised (as sentence-transformers' `truncate_dim` does)."""
    if dimensions is None or dimensions >= vector.shape[-1]:
        return vector
    cut = vector[:dimensions]
    return torch.nn.functional.normalize(cut, dim=-1) if normalized else cut
