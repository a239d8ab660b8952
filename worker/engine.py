"""The generation engine: one thread running continuous batching over a transformers causal LM.

Every iteration admits waiting requests (one batched prefill), runs one decode step for every
running sequence, samples each row with its own parameters, and retires finished rows, so
requests join and leave the batch at every step. A step computes at most `max_num_batched_tokens`
tokens, decodes first: a prompt longer than what is left is prefilled a chunk per step beside the
decodes (chunked.py). The HTTP side talks to it through `submit`,
which returns an async stream of `RequestOutput` events.

With prefix caching, a request whose prompt starts with full blocks another prompt already
prefilled takes their KV from the prefix cache (prefix_cache.py) and computes only the rest:
such requests prefill apart from the others, on top of a past made of the cached KV, laid out
so that every row ends up exactly as a full left-padded prefill would leave it.

transformers' own ContinuousBatchingManager packs the batch into one long sequence with a dense
mask and samples with one setting per batch; measured here it reaches about half of plain
padded batching, which is why the loop is ours, on transformers' model and cache classes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .chunked import ChunkedPrefill, StepRecord, chunk_end, prefill_budget
from .constraints import Constraint, MaskBatch
from .fastdecode import fused_decode
from .kvcache import (
    SLOT_ATTENTION,
    SharedPrefix,
    SlotPool,
    cache_over_past,
    decodes_by_matmul,
    default_kv_cache_bytes,
    shared_layout,
)
from .prefix_cache import PrefixCache, PrefixMatch
from .sampling import BatchParams, banned_by_bad_words, sample
from .scheduler import KvRoom, plan_admission, plan_prefill_groups, planned_length
from .sequence import GenerationRequest, RequestOutput, RequestState, SeqDelta, Sequence, TokenLogprob

log = logging.getLogger(__name__)

# Cascade attention (kvcache.shared_prefix_attention) pays when enough rows share a long enough
# prefix: it reads one copy of the prefix where every row read its own, for a few extra operators
# a layer. The same bar holds for a decode step and for a prefill of prefix hits (2 rows of 20
# tokens on 1,500 cached ones: even with SDPA; 4 rows: 1.5x; 32 rows: 2x).
CASCADE_MIN_ROWS = 4
CASCADE_MIN_TOKENS = 64


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per step: decodes, then prompt tokens (chunks past it)
    enable_prefix_caching: bool = True
    prefix_cache_block_size: int = 16
    prefix_cache_bytes: int = 1 << 30  # the KV copies of cached prompt blocks, at most
    kv_cache_bytes: int | None = None  # the running sequences' KV, at most; None: from free memory
    fused_decode: bool = True  # decode steps of Llama-family models as one function (fastdecode.py)


class EngineStats:
    """Counters the metrics module reads; written only by the engine thread."""

    def __init__(self) -> None:
        self.waiting = 0
        self.running = 0
        self.kv_usage = 0.0  # KV slots the running sequences hold over the budget's (vLLM's gauge)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens whose KV was reused
        self.preemptions = 0  # requests taken out of the batch for KV room, to be recomputed


Observer = Callable[[str, float], None]


class RequestStream:
    """The caller's handle: iterate for events; `cancel()` frees the request's rows."""

    def __init__(self, state: RequestState, queue: asyncio.Queue) -> None:
        self.state = state
        self.queue = queue

    def cancel(self) -> None:
        self.state.cancelled.set()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while True:
            event: RequestOutput = await self.queue.get()
            yield event
            if event.finished:
                return


class GenerationEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: EngineConfig,
        stop_token_ids: list[int],
        observe: Observer | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.eos_ids = list(dict.fromkeys(stop_token_ids))
        self.observe = observe or (lambda name, value: None)
        self.stats = EngineStats()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        mc = model.config
        heads = mc.num_attention_heads
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // heads
        kv_heads = getattr(mc, "num_key_value_heads", None) or heads
        self.matmul_decode = False  # decode attention as matmuls over whole rows (kvcache.slot_attention)
        attention = getattr(mc, "_attn_implementation", None)  # ours already: a second engine on this model
        if attention in ("sdpa", SLOT_ATTENTION) and decodes_by_matmul(mc, self.dtype, self.device):
            try:
                model.set_attn_implementation(SLOT_ATTENTION)
                self.matmul_decode = True
            except (ValueError, NotImplementedError) as exc:  # a model class that refuses it
                log.info("decode attention stays on SDPA: %s", exc)
        token_bytes = 2 * mc.num_hidden_layers * kv_heads * head_dim * self.dtype.itemsize
        budget = config.kv_cache_bytes if config.kv_cache_bytes is not None else default_kv_cache_bytes(self.device)
        # more than every row at full context could never be used
        self.kv_budget_tokens = min(budget // token_bytes, config.max_num_seqs * (config.max_model_len + 1))
        self.kv_token_bytes = token_bytes
        self.pool = SlotPool(
            num_layers=mc.num_hidden_layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_rows=config.max_num_seqs,
            max_columns=config.max_model_len + 1,
            dtype=self.dtype,
            device=self.device,
            budget_tokens=self.kv_budget_tokens,
            full_width=self.matmul_decode,
        )
        # decode steps without transformers' per-module overhead, where that is exact
        self.fused_decode = fused_decode(model, self.pool) if self.matmul_decode and config.fused_decode else None
        self.prefix_cache: PrefixCache | None = None
        if config.enable_prefix_caching:
            block_bytes = 2 * mc.num_hidden_layers * kv_heads * head_dim * config.prefix_cache_block_size
            block_bytes *= self.dtype.itemsize
            self.prefix_cache = PrefixCache(
                num_layers=mc.num_hidden_layers,
                kv_heads=kv_heads,
                head_dim=head_dim,
                block_size=config.prefix_cache_block_size,
                num_blocks=max(1, config.prefix_cache_bytes // block_bytes),
                dtype=self.dtype,
                device=self.device,
            )
        self.model_vocab = mc.vocab_size
        self.text_vocab = min(len(tokenizer), self.model_vocab)
        self.rows: list[Sequence] = []
        self.counts = torch.zeros((config.max_num_seqs, self.model_vocab), dtype=torch.int32)
        self.seen = torch.zeros((config.max_num_seqs, self.model_vocab), dtype=torch.bool)
        self.batch_params: BatchParams | None = None
        self.masks: MaskBatch | None = None  # built on the first constrained sequence
        self.waiting: deque[RequestState] = deque()
        self.inbox: deque[RequestState] = deque()
        self.jobs: deque[tuple[Callable[[], object], Callable[[object, BaseException | None], None]]] = deque()
        self.wakeup = threading.Condition()
        self.outbox: list[tuple[RequestState, RequestOutput]] = []
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.admitting: list[RequestState] = []  # popped from `waiting`, not yet in `rows`
        self.partial: ChunkedPrefill | None = None  # a prompt prefilled in chunks (chunked.py)
        self.step_log: deque[StepRecord] = deque(maxlen=4096)  # the latest steps' composition
        self.step_tokens = 0  # prompt tokens computed in the current step
        self.step_chunked = False  # and whether a chunk of a longer prompt was among them
        # vLLM refuses a budget under max_num_seqs (decodes alone could fill it); here it is raised
        self.token_budget = max(config.max_num_batched_tokens, config.max_num_seqs)
        if self.token_budget > config.max_num_batched_tokens:
            log.warning("max_num_batched_tokens raised to max_num_seqs (%d), so that prompts are never starved "
                        "by decodes", self.token_budget)
        self.last_progress = time.monotonic()  # the engine thread's heartbeat (see `healthy`)
        self.idle = True  # waiting for work, which is not stalling
        self.fatal: str | None = None  # why the engine thread stopped, if it did on its own
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.lora = None  # adapters.LoraAdapters: LoRA adapters, which set it themselves

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.thread:
            self.thread.join(timeout=10)

    def healthy(self, stall_seconds: float) -> str | None:
        """None when the engine serves; else why not, for `/health` and `/ready` to report.

        The engine thread is the worker: if it has died, or has held work without finishing a
        step for `stall_seconds`, the HTTP side must stop saying it is fine, so that the
        gateway ejects it and the kubelet restarts it instead of every request hanging."""
        if self.fatal is not None:
            return self.fatal
        if self.thread is not None and not self.thread.is_alive() and not self.stopping:
            return "the engine thread has stopped"
        stalled = time.monotonic() - self.last_progress
        if not self.idle and stalled > stall_seconds:
            return f"the engine has not finished a step in {stalled:.0f} s"
        return None

    # -- the caller's side (event loop thread) -----------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        state = RequestState(request, (loop, queue))
        with self.wakeup:
            self.inbox.append(state)
            self.wakeup.notify()
        return RequestStream(state, queue)

    async def run_job(self, fn: Callable[[], object]) -> object:
        """Runs `fn` on the engine thread between steps (torch work must not race the loop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(result: object, error: BaseException | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            loop.call_soon_threadsafe(settle)

        with self.wakeup:
            self.jobs.append((fn, done))
            self.wakeup.notify()
        return await future

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the thread is gone: say so rather than hang every caller
            self.fatal = f"the engine thread stopped: {exc!r}"
            log.critical("%s", self.fatal, exc_info=True)
            self._fail_all(self.fatal)
            self._publish()
            raise

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wakeup:
                self.idle = True
                while not (self.stopping or self.inbox or self.jobs or self.waiting or self.rows or self.partial):
                    self.wakeup.wait()
                self.idle = False
                self.last_progress = time.monotonic()
                if self.stopping:
                    break
                self.waiting.extend(self.inbox)
                self.inbox.clear()
                jobs = list(self.jobs)
                self.jobs.clear()
            try:
                self._run_jobs(jobs)
                self._drop_cancelled()
                decoding, self.step_tokens, self.step_chunked = len(self.rows), 0, False
                self._admit()
                if self.rows:
                    self._decode_step()
                if decoding or self.step_tokens:
                    self.step_log.append(StepRecord(decoding, self.step_tokens, self.step_chunked))
            except Exception as exc:  # a bug must fail the requests in flight, not hang them
                log.exception("engine step failed")
                self._fail_all(f"internal engine error: {exc}")
            self.last_progress = time.monotonic()
            self._publish()
        self._fail_all("the server is shutting down")
        self._publish()

    def _run_jobs(self, jobs) -> None:
        for fn, done in jobs:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                result, error = None, exc
            else:
                error = None
            # a finished job is progress, recorded before its caller can look at `healthy`
            self.last_progress = time.monotonic()
            done(result, error)

    def _emit(self, state: RequestState, output: RequestOutput) -> None:
        self.outbox.append((state, output))

    def _publish(self) -> None:
        """Hands this step's events to the event loops in one call per loop."""
        self.stats.waiting = len(self.waiting) + len(self.inbox)
        self.stats.running = len({id(s.owner) for s in self.rows}) + (self.partial is not None)
        self.stats.kv_usage = self.pool.used_tokens() / max(1, self.kv_budget_tokens)
        if not self.outbox:
            return
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
        for state, output in self.outbox:
            loop, queue = state.sink
            by_loop.setdefault(id(loop), (loop, []))[1].append((queue, output))
        self.outbox = []
        for loop, items in by_loop.values():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:
                pass  # that loop is closed: its clients are gone

    def _fail_all(self, message: str) -> None:
        """Ends every request the engine holds with `message`, and empties the KV pool whole:
        after a failed step the pool's rows and `self.rows` need not agree any more."""
        owners = {id(s.owner): s.owner for s in self.rows}
        owners.update({id(s): s for s in [*self.waiting, *self.admitting]})
        if self.partial is not None:
            owners[id(self.partial.state)] = self.partial.state
            self.partial = None
        for state in owners.values():
            self._emit(state, RequestOutput([], len(state.request.prompt_ids), state.completion_tokens,
                                            finished=True, error=message))
        self.rows.clear()
        self.pool.clear()
        self.batch_params = None
        self.waiting.clear()
        self.admitting = []

    def _drop_cancelled(self) -> None:
        self.waiting = deque(s for s in self.waiting if not s.cancelled.is_set())
        if self.partial is not None and self.partial.state.cancelled.is_set():
            self.partial, self.admitting = None, []
        for row in range(len(self.rows) - 1, -1, -1):
            if self.rows[row].owner.cancelled.is_set():
                self._remove_row(row)

    # -- admission and prefill ------------------------------------------------------------------

    def _longest(self, request: GenerationRequest) -> int:
        """The most tokens a sequence of `request` can hold: what it must fit in alone (kv_refusal),
        and the most admission plans it for (scheduler.planned_length)."""
        return min(len(request.prompt_ids) + request.max_tokens, self.config.max_model_len)

    def _kv_room(self) -> KvRoom:
        """The budget and the running rows at the lengths admission plans them for."""
        longest = max((planned_length(self.pool.row_length(r), self._longest(seq.owner.request))
                       for r, seq in enumerate(self.rows)), default=0)
        return KvRoom(self.kv_budget_tokens, len(self.rows), longest)

    def _make_kv_room(self, rows: int = 0, longest: int = 0) -> None:
        """Preempts the newest running requests until the running rows, one column longer, and
        `rows` more rows of up to `longest` tokens fit in the KV budget: what the pool's next
        growth needs (every row takes as many columns as the longest). Admission planned for
        the rows' next tokens, not their longest, so they can outgrow the budget; the oldest
        request always fits alone (kv_refusal), so this ends."""
        def fits() -> bool:  # the rows at their current length: the pool's compacted width
            span = self.pool.cursor - min(self.pool.starts, default=self.pool.cursor)
            return KvRoom(self.kv_budget_tokens, len(self.rows), span).admits(rows, longest)

        while self.rows and not fits():
            self._preempt(max({id(s.owner): s.owner for s in self.rows}.values(), key=lambda o: o.arrival))

    def _preempt(self, owner: RequestState) -> None:
        """Takes `owner`'s rows out of the batch and puts it first in line, to be recomputed
        (`_resume`) once there is room: vLLM's RECOMPUTE preemption. Its sequences keep their
        tokens, text, sampling generators and grammar state, so nothing it streamed changes."""
        for row in sorted((r for r, s in enumerate(self.rows) if s.owner is owner), reverse=True):
            self._remove_row(row)
        owner.preempted = True
        owner.shared_blocks = ()  # its recompute may compute what it had copied
        self.waiting.appendleft(owner)
        self.stats.preemptions += 1
        log.info("request %s preempted for KV room (%d sequences running)", owner.request.request_id or "-",
                 len(self.rows))

    def _resume(self, state: RequestState, budget: int) -> bool:
        """Starts recomputing a preempted request's KV: its prompt and every token each unfinished
        sequence generated but the last, which the next decode step feeds, as it would have. It is
        prefilled like a prompt, in chunks of the step's `budget` on top of what the prefix cache
        holds of it, and `_rejoin` puts the sequences back in the batch; no token is sampled. False,
        and nothing done, while they do not fit in the free rows and the KV budget."""
        seqs = [seq for seq in state.sequences if seq.finish_reason is None]
        tokens = [state.request.prompt_ids + seq.output_ids[:-1] for seq in seqs]
        if len(self.rows) + len(seqs) > self.config.max_num_seqs:
            return False
        longest = planned_length(len(tokens[0]), self._longest(state.request))
        if not self._kv_room().admits(len(seqs), longest):
            return False
        state.preempted = False
        matches = [self.prefix_cache.match(t, state.request.adapter) if self.prefix_cache is not None
                   else PrefixMatch() for t in tokens]
        try:
            self._start_chunked(state, matches, tokens, resumed=seqs)
        finally:
            if self.prefix_cache is not None:
                for match in matches:
                    self.prefix_cache.release(match)
        self._continue_chunked(budget)
        return True

    def _rejoin(self, part: ChunkedPrefill) -> None:
        """Seats a preempted request's sequences once their recompute (`_resume`) has finished its
        last chunk, keeping their blocks in the prefix cache (the next preemption reads them)."""
        rows = range(len(part.tokens))
        if self.prefix_cache is not None:
            for i in rows:
                self.prefix_cache.store(part.tokens[i], [layer.keys[i] for layer in part.cache.layers],
                                        [layer.values[i] for layer in part.cache.layers], part.state.request.adapter)
        self._make_kv_room(len(rows), part.total)  # the rows grew while it was recomputed
        for row, seq in zip(self.pool.add_rows(part.cache, [part.total] * len(rows), list(rows)), part.resumed,
                            strict=True):
            self._seat(row, seq)
        self.batch_params = None

    def kv_refusal(self, request: GenerationRequest) -> str | None:
        """Why `request` could never run within the KV budget, even alone (None if it can)."""
        if not KvRoom(self.kv_budget_tokens).never_fits(request.n, self._longest(request)):
            return None
        need = request.n * (self._longest(request) + 1)
        return (f"This request needs KV memory for {need} tokens ({request.n} x (prompt + max_tokens)), "
                f"more than this worker's KV budget of {self.kv_budget_tokens} tokens "
                f"({self.kv_budget_tokens * self.kv_token_bytes / (1 << 30):.2f} GiB, --kv-cache-memory). "
                "Lower max_tokens, n or the prompt.")

    def _refuse_oversized(self) -> None:
        """Ends waiting requests that could not fit in the KV budget even alone (the service
        refuses them before submitting; this keeps the engine safe for any other caller)."""
        for state in list(self.waiting):
            message = self.kv_refusal(state.request)
            if message is not None:
                self.waiting.remove(state)
                self._emit(state, RequestOutput([], len(state.request.prompt_ids), 0, finished=True, error=message))

    def _admit(self) -> None:
        """Admits waiting requests within this step's token budget (vLLM's: decodes first, then
        prefill): the prompt being prefilled in chunks first; then whole prompts that fit in the
        rest, batched; a first prompt over the rest starts in chunks (chunked.py)."""
        self._refuse_oversized()
        budget = prefill_budget(self.token_budget, len(self.rows))
        if self.partial is not None:
            budget -= self._continue_chunked(budget)
            if self.partial is not None:
                return  # one prompt in chunks at a time, and nothing overtakes it
        if budget <= 0:
            return
        if self.waiting and self.waiting[0].preempted:
            if self._resume(self.waiting[0], budget):
                self.waiting.popleft()
            return  # it goes first, nothing overtakes it, and its recompute is this step's prefill
        free = self.config.max_num_seqs - len(self.rows)
        candidates, rows = [], 0
        for state in self.waiting:
            rows += state.request.n
            if rows > free:
                break
            candidates.append(state)
        matches = [self._match(s) for s in candidates]
        try:
            uncached = [max(1, len(s.request.prompt_ids) - m.tokens) for s, m in zip(candidates, matches, strict=True)]
            count = plan_admission(
                [(tokens, s.request.n) for tokens, s in zip(uncached, candidates, strict=True)],
                free_rows=free,
                token_budget=budget,
                kv=self._kv_room(),
                longest=[planned_length(len(s.request.prompt_ids), self._longest(s.request)) for s in candidates],
            )
            if count == 0:
                return
            hit = [bool(m.tokens) for m in matches]
            while count > 1 and self._prefill_cost(uncached[:count], hit[:count]) > budget:
                count -= 1  # rows grouped on a cached prefix compute their group's longest tail
            if uncached[0] > budget:  # admitted alone (plan_admission's rule), over the step's rest
                self._start_chunked(self.waiting.popleft(), matches[:1])
                self._continue_chunked(budget)
                return
            self.admitting = [self.waiting.popleft() for _ in range(count)]
            # Rows with a cached prefix prefill together on top of it; the rest as before.
            admitted = list(zip(self.admitting, matches[:count], strict=True))
            misses = [s for s, m in admitted if not m.tokens]
            hits = [(s, m) for s, m in admitted if m.tokens]
            if misses:
                self._prefill(misses, [PrefixMatch()] * len(misses))
            tails = [len(s.request.prompt_ids) - m.tokens for s, m in hits]
            for group in plan_prefill_groups(tails, slack=self.config.prefix_cache_block_size):
                self._prefill([hits[i][0] for i in group], [hits[i][1] for i in group])
            self.admitting = []
        finally:
            if self.prefix_cache is not None:
                for m in matches:
                    self.prefix_cache.release(m)

    def _left_padded(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and position ids of a left-padded batch of `token_lists`."""
        width = max(map(len, token_lists))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(token_lists), width), pad, dtype=torch.long)
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            ids[i, width - len(tokens) :] = torch.tensor(tokens)
            mask[i, width - len(tokens) :] = 1
        return ids, mask, (mask.cumsum(-1) - 1).clamp_(min=0)

    def _prefill_cost(self, tails: list[int], hit: list[bool]) -> int:
        """Prompt tokens the prefills of these admitted requests compute (padding aside): each
        miss its prompt, each row of a prefix-hit group (plan_prefill_groups) its group's longest
        uncached tail."""
        hit_tails = [t for t, h in zip(tails, hit, strict=True) if h]
        groups = plan_prefill_groups(hit_tails, slack=self.config.prefix_cache_block_size)
        return (sum(t for t, h in zip(tails, hit, strict=True) if not h)
                + sum(len(g) * max(hit_tails[i] for i in g) for g in groups))

    def _match(self, state: RequestState) -> PrefixMatch:
        """The pinned cached prefix of a waiting request; none for prompt logprobs, which need
        the logits of every prompt position."""
        if self.prefix_cache is None or state.request.prompt_logprobs is not None:
            return PrefixMatch()
        return self.prefix_cache.match(state.request.prompt_ids, state.request.adapter)

    def _prefill(self, batch: list[RequestState], matches: list[PrefixMatch]) -> None:
        """One left-padded prefill of `batch`. With cached prefixes, the first `past` columns
        come from the prefix cache and only the last `width - past` are computed: as many as the
        longest uncached tail, and at least one, since the last prompt token's logits are needed."""
        started = time.monotonic()
        for state in batch:
            state.prefill_started = started
        lengths = [len(s.request.prompt_ids) for s in batch]
        width = max(lengths)
        computed = max(1, max(n - m.tokens for n, m in zip(lengths, matches, strict=True)))
        past = width - computed
        reused = [max(0, n - computed) for n in lengths]
        for state, match, count in zip(batch, matches, reused, strict=True):  # the whole blocks its rows copy
            state.shared_blocks = tuple(b.key for b in match.blocks[: count // self.config.prefix_cache_block_size])
        self.step_tokens += sum(n - r for n, r in zip(lengths, reused, strict=True))
        ids, mask, positions = self._left_padded([s.request.prompt_ids for s in batch])
        want_prompt_logprobs = any(s.request.prompt_logprobs is not None for s in batch)
        assert not (want_prompt_logprobs and past), "prompt logprobs never read the prefix cache"
        slots = None
        shared = self._prefill_shared_prefix(batch, lengths, computed) if past else None
        if past and all(s.request.n == 1 for s in batch):
            # in the rows' own slots: the cached prefix is copied once, into them, and the prefill
            # attends to it there (n > 1 copies a prefilled row into several: the buffer below)
            slots = self.pool.open_rows(lengths)
            cache = self.pool.prefill_cache(slots[0], len(slots), width, past)
            self.prefix_cache.write_past([cl.keys for cl in cache.layers], [cl.values for cl in cache.layers],
                                         matches, reused, past)
        elif past:
            cache = self._cache_over_prefixes(matches, reused, past, width)
        else:
            cache = DynamicCache(config=self.model.config)
        out = self._forward(s.request for s in batch)(
            input_ids=ids[:, past:].to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions[:, past:].to(self.device),
            use_cache=True,
            logits_to_keep=0 if want_prompt_logprobs else 1,
            **{self.cache_kwarg: cache},
            **({"shared_prefix": shared} if shared else {}),  # to kvcache.slot_attention
        )
        self._join(batch, cache, out.logits.float(), lengths, reused, width, started, slots)

    def _join(self, batch: list[RequestState], cache, logits: torch.Tensor, lengths: list[int], reused: list[int],
              width: int, started: float, slots: list[int] | None = None) -> None:
        """Puts prefilled requests into the running batch: caches their prompt blocks, copies their
        KV into the slot cache (unless they were prefilled in their `slots`, one row each), answers
        prompt logprobs, and samples each choice's first token. `cache` and `logits` are a
        left-padded prefill's, `width` columns wide."""
        if self.prefix_cache is not None:
            self._store_prefixes(batch, cache, lengths, reused, width)
        sources = [i for i, s in enumerate(batch) for _ in range(s.request.n)]
        sequences = [seq for state in batch for seq in state.make_sequences()]
        if slots is None:  # a chunked prompt joins steps after its admission: the rows grew since
            self._make_kv_room(len(sources), max(lengths))
        new_rows = self.pool.add_rows(cache, lengths, sources) if slots is None else slots
        for i, state in enumerate(batch):
            self.stats.prompt_tokens += lengths[i]
            state.cached_tokens = reused[i]
            if state.request.prompt_logprobs is not None:
                prompt_lp = self._prompt_logprobs(logits[i], state.request, width - lengths[i])
                self._emit(state, RequestOutput([], lengths[i], 0, prompt_logprobs=prompt_lp))
        for row, seq in zip(new_rows, sequences, strict=True):
            self._seat(row, seq)
        self.batch_params = None
        last = logits[:, -1, :]
        self._sample_and_advance(last[torch.tensor(sources)], new_rows)
        self.observe("prefill_seconds", time.monotonic() - started)

    def _seat(self, row: int, seq: Sequence) -> None:
        """Makes `seq` the batch's new last row, `row`, with the token counts its penalties read:
        its prompt seen, its output (none yet unless it was preempted) counted."""
        self.rows.append(seq)
        assert len(self.rows) - 1 == row
        self.counts[row].zero_()
        self.seen[row].zero_()
        self.seen[row, torch.tensor(seq.owner.request.prompt_ids)] = True
        if seq.output_ids:
            out = torch.tensor(seq.output_ids)
            self.counts[row].index_add_(0, out, torch.ones_like(out, dtype=self.counts.dtype))
            self.seen[row, out] = True

    def _start_chunked(self, state: RequestState, matches: list[PrefixMatch],
                       tokens: list[list[int]] | None = None, resumed: list[Sequence] | None = None) -> None:
        """Begins prefilling `tokens` (one row, `state`'s prompt, unless the rows of a preempted
        request's sequences, `resumed`, are recomputed) in chunks, in a buffer as wide as they are
        that starts with the prefix the prefix cache holds of every row (at most all but the last
        token: its logits are needed)."""
        if resumed is None:
            state.prefill_started = time.monotonic()
        tokens = [state.request.prompt_ids] if tokens is None else tokens
        total = len(tokens[0])
        assert all(len(t) == total for t in tokens), "the rows of one request are equally long"
        reused = min(min(m.tokens for m in matches), total - 1)
        if reused:
            cache = self._cache_over_prefixes(matches, [reused] * len(matches), reused, total)
        else:
            first = self.pool.keys[0]
            cache = cache_over_past(self.pool.num_layers, len(tokens), first.shape[1], total, first.shape[3], 0,
                                    self.dtype, self.device)
        self.partial = ChunkedPrefill(state, tokens, cache, done=reused, reused=reused, resumed=resumed or [])
        self.admitting = [state]  # what other readers (adapters.py, _fail_all) look at besides `rows`

    def _continue_chunked(self, budget: int) -> int:
        """Computes the next chunk, at most `budget` tokens, of the sequence in `self.partial`;
        after the last one it joins the batch. Returns the tokens computed."""
        part = self.partial
        req = part.state.request
        rows = len(part.tokens)
        end = chunk_end(part.done, part.total, budget // rows, self.config.prefix_cache_block_size)
        if end <= part.done:
            return 0
        started = time.monotonic()
        want_prompt_logprobs = req.prompt_logprobs is not None and not part.resumed
        out = self._forward([req] * rows)(
            input_ids=torch.tensor([t[part.done : end] for t in part.tokens], dtype=torch.long, device=self.device),
            attention_mask=torch.ones((rows, end), dtype=torch.long, device=self.device),
            position_ids=torch.arange(part.done, end, device=self.device)[None].expand(rows, -1),
            use_cache=True,
            logits_to_keep=0 if want_prompt_logprobs else 1,
            **{self.cache_kwarg: part.cache},
        )
        computed, part.done = (end - part.done) * rows, end
        self.step_tokens += computed
        self.step_chunked = True
        if want_prompt_logprobs:
            part.logits.append(out.logits[0].float())
        if end < part.total:
            if self.prefix_cache is not None:  # the blocks done so far, kept even if it is cancelled
                layers = part.cache.layers
                for i, row in enumerate(part.tokens):
                    self.prefix_cache.store(row[:end], [layer.keys[i, :, :end] for layer in layers],
                                            [layer.values[i, :, :end] for layer in layers], req.adapter)
            return computed
        self.partial = None
        if part.resumed:
            self._rejoin(part)
            self.admitting = []
            return computed
        logits = torch.cat(part.logits)[None] if want_prompt_logprobs else out.logits.float()
        self._join([part.state], part.cache, logits, [part.total], [part.reused], part.total, started)
        self.admitting = []
        return computed

    def _cache_over_prefixes(self, matches: list[PrefixMatch], reused: list[int], past: int, width: int):
        """A prefill cache whose first `past` columns hold each row's reused prefix, right-aligned
        there so that the row's tokens stay contiguous and end at `width`, as in a full prefill."""
        first = self.pool.keys[0]
        cache = cache_over_past(self.pool.num_layers, len(matches), first.shape[1], width, first.shape[3], past,
                                self.dtype, self.device)
        self.prefix_cache.write_past([cl.keys for cl in cache.layers], [cl.values for cl in cache.layers],
                                     matches, reused, past)
        return cache

    def _store_prefixes(self, batch: list[RequestState], cache, lengths: list[int], reused: list[int],
                        width: int) -> None:
        """Caches the full prompt blocks this prefill computed, and counts the lookups."""
        for i, state in enumerate(batch):
            if state.request.prompt_logprobs is None:
                self.stats.prefix_cache_queries += lengths[i]
                self.stats.prefix_cache_hits += reused[i]
            start = width - lengths[i]
            self.prefix_cache.store(state.request.prompt_ids, [layer.keys[i, :, start:] for layer in cache.layers],
                                    [layer.values[i, :, start:] for layer in cache.layers], state.request.adapter)

    def _prompt_logprobs(self, logits: torch.Tensor, request: GenerationRequest, offset: int):
        """Logprob of each prompt token given the tokens before it (the first has none)."""
        lp = torch.log_softmax(logits[offset:-1], dim=-1)
        targets = torch.tensor(request.prompt_ids[1:])
        chosen = lp.gather(-1, targets[:, None]).squeeze(-1).tolist()
        k = request.prompt_logprobs or 0
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if k > 0:
            values, idx = torch.topk(lp, k, dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), values.tolist(), strict=True)]
        result: list[TokenLogprob | None] = [None]
        result += [TokenLogprob(t, c, top) for t, c, top in zip(request.prompt_ids[1:], chosen, tops, strict=True)]
        return result

    # -- decoding -----------------------------------------------------------------------------

    def _decode_step(self) -> None:
        started = time.monotonic()
        self._make_kv_room()  # never empties the batch: its oldest request fits alone
        self.pool.ready_for_decode()
        rows = len(self.rows)
        ids = torch.tensor([[seq.last_token] for seq in self.rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[self.pool.row_length(r)] for r in range(rows)], device=self.device)
        logits = self._decode_logits(ids, positions, self.pool.decode_mask(self.dtype))
        self.pool.advance(1)
        self._sample_and_advance(logits.float(), list(range(rows)))
        self.stats.steps += 1
        self.observe("decode_step_seconds", time.monotonic() - started)

    def _decode_logits(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The next-token logits [rows, vocab] of every running row, its KV written at the cursor:
        the fused decode step when there is one and no row runs a LoRA adapter (its forwards are
        the base layers', which peft's LoRA layers wrap and leave as they were; its attention
        reads rows of very different lengths by groups), else the model's forward, through peft's
        layers for adapter rows."""
        requests = [seq.owner.request for seq in self.rows]
        if self.fused_decode is not None and not any(r.adapter for r in requests):
            shared = self._shared_prefix()
            return self.fused_decode(ids, positions, mask, None if shared else self.pool.decode_groups(), shared)
        out = self._forward(requests)(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                      logits_to_keep=1, **{self.cache_kwarg: self.pool.cache})
        return out.logits[:, -1, :]

    def _shared_prefix(self) -> SharedPrefix | None:
        """The layout of a decode step over one copy of the prefix every running row copied from
        the same prefix-cache blocks (a system prompt they share), or None (`_cascade_tokens`)."""
        tokens = self._cascade_tokens({seq.owner for seq in self.rows}, len(self.rows))
        return self.pool.shared_prefix(tokens, self.dtype) if tokens else None

    def _prefill_shared_prefix(self, batch: list[RequestState], lengths: list[int], computed: int) -> SharedPrefix | None:
        """The same for a prefill of prefix hits: the layout of the left-padded batch (`lengths`
        right-aligned, the last `computed` columns its queries), when the model's attention is
        `slot_attention`; else None (SDPA)."""
        tokens = self._cascade_tokens(batch, len(batch)) if self.matmul_decode else 0
        if not tokens:
            return None
        width = max(lengths)
        return shared_layout([width - n for n in lengths], width, computed, tokens, self.dtype, self.device)

    def _cascade_tokens(self, states: Iterable[RequestState], rows: int) -> int:
        """Tokens at the start of every one of `states` (in `rows` rows) copied from the same
        prefix-cache blocks, when there are enough rows and tokens for reading one copy of them
        (cascade attention, kvcache.shared_prefix_attention) to pay; else 0."""
        if rows < CASCADE_MIN_ROWS:
            return 0
        tokens = self._common_prefix(states)
        return tokens if tokens >= CASCADE_MIN_TOKENS else 0

    def _common_prefix(self, states: Iterable[RequestState]) -> int:
        """Tokens at the start of every one of `states` copied from the same prefix-cache blocks:
        the longest run of block keys (RequestState.shared_blocks) they all agree on."""
        chains = {state.shared_blocks for state in states}
        blocks = min(map(len, chains))
        while blocks and len({chain[blocks - 1] for chain in chains}) > 1:  # keys chain: one agreeing agrees all before
            blocks -= 1
        return blocks * self.config.prefix_cache_block_size

    def _peft_attached(self) -> bool:
        """Whether an adapter was ever loaded, which puts peft's LoRA layers into the model."""
        return self.lora is not None and self.lora.peft is not None

    def _forward(self, requests: Iterable[GenerationRequest]) -> Callable[..., Any]:
        """The model to run a batch whose rows belong to `requests`, in row order: with each
        row's LoRA adapter when any is loaded (adapters.py), else the model itself."""
        if not self._peft_attached():  # nothing per row
            return self.model
        return self.lora.forward([r.adapter for r in requests])

    def _sample_and_advance(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Samples one token for each of `rows` (aligned with `logits`), records it, emits
        events, and retires sequences that finished."""
        if self.text_vocab < self.model_vocab:
            logits[:, self.text_vocab :] = float("-inf")  # ids the tokenizer cannot print
        seqs = [self.rows[r] for r in rows]
        for i, seq in enumerate(seqs):
            req = seq.owner.request
            if len(seq.output_ids) < req.min_tokens and seq.constraint is None:
                logits[i, self.eos_ids + req.stop_token_ids] = float("-inf")
            if seq.params.bad_words:
                logits[i, banned_by_bad_words(seq.output_ids, seq.params.bad_words)] = float("-inf")
        self._constrain(logits, seqs)
        if self.batch_params is None or len(rows) != len(self.rows):
            bp = BatchParams.build([s.params for s in seqs], self.model_vocab)
            if len(rows) == len(self.rows):
                self.batch_params = bp
        else:
            bp = self.batch_params
        index = torch.tensor(rows)
        # the rows' token counts are a [rows, vocab] gather: only penalties read them (measured:
        # 4% of a 32-row decode step on the 56M bench model)
        penalised = bp.any_penalty or bp.any_repetition
        result = sample(logits, bp, [s.generator for s in seqs], self.counts[index] if penalised else None,
                        self.seen[index] if penalised else None)
        chosen = torch.tensor(result.tokens)
        self.counts[index, chosen] += 1
        self.seen[index, chosen] = True
        now = time.monotonic()
        finished_rows = []
        for i, (row, seq) in enumerate(zip(rows, seqs, strict=True)):
            token = result.tokens[i]
            lp = None
            if seq.params.want_logprobs and result.logprobs is not None:
                tops = result.top_logprobs[i][: seq.params.top_logprobs] if result.top_logprobs else []
                lp = TokenLogprob(token, result.logprobs[i], tops)
            if self._advance(seq, token, lp, now):
                finished_rows.append(row)
        self.stats.generation_tokens += len(rows)
        self._flush_requests({id(s.owner): s.owner for s in seqs}.values())
        for row in sorted(finished_rows, reverse=True):
            self._remove_row(row)

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Masks the rows of constrained sequences to what their grammars allow, in one step;
        a batch without any costs one pass over the row list."""
        constrained = [i for i, seq in enumerate(seqs) if seq.constraint is not None]
        if not constrained:
            return
        if self.masks is None:
            self.masks = MaskBatch(self.config.max_num_seqs, self.model_vocab)
        self.masks.apply(logits, constrained, [seqs[i].constraint for i in constrained])

    def _advance(self, seq: Sequence, token: int, lp: TokenLogprob | None, now: float) -> bool:
        """Records one sampled token; returns True when the sequence is finished."""
        req = seq.owner.request
        owner = seq.owner
        if owner.first_token_at is None:
            owner.first_token_at = now
            self.observe("time_to_first_token_seconds", now - owner.arrival)
        elif seq.last_token_at is not None:
            self.observe("inter_token_latency_seconds", now - seq.last_token_at)
        seq.last_token_at = now
        seq.last_token = token
        seq.output_ids.append(token)
        owner.completion_tokens += 1
        seq.pending_ids.append(token)
        if lp is not None:
            seq.pending_logprobs.append(lp)
        if seq.constraint is not None and not _constraint_accepts(seq.constraint, token):
            seq.finish_reason = "stop"
            return True
        # ignore_eos passes end-of-sequence tokens only; stop_token_ids always stop (as in vLLM)
        stops = token in req.stop_token_ids or (token in self.eos_ids and not req.ignore_eos)
        if stops and len(seq.output_ids) > req.min_tokens - 1:
            if req.include_stop_str_in_output:
                seq.text.add_token(self.tokenizer, token)
            seq.finish_reason = "stop"
            return True
        before = len(seq.text.text)
        seq.text.add_token(self.tokenizer, token)
        if seq.text.check_stop(len(seq.text.text) - before):
            seq.finish_reason = "stop"
        elif seq.constraint is not None and seq.constraint.is_complete():
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= req.max_tokens or seq.total_length() >= self.config.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _flush_requests(self, owners) -> None:
        for owner in owners:
            deltas = []
            for seq in owner.sequences:
                if seq.reported or (not seq.pending_ids and seq.finish_reason is None):
                    continue
                text = seq.text.release(finished=seq.finish_reason is not None)
                deltas.append(SeqDelta(seq.index, text, seq.pending_ids, seq.pending_logprobs or None, seq.finish_reason))
                seq.pending_ids, seq.pending_logprobs = [], []
                seq.reported = seq.finish_reason is not None
            if not deltas:
                continue
            owner.open_sequences = sum(1 for s in owner.sequences if s.finish_reason is None)
            finished = owner.open_sequences == 0
            self._emit(owner, RequestOutput(deltas, len(owner.request.prompt_ids), owner.completion_tokens,
                                            finished=finished))
            if finished:
                owner.finished_at = time.monotonic()
                self.observe("e2e_request_latency_seconds", owner.finished_at - owner.arrival)

    def _remove_row(self, row: int) -> None:
        moved = self.pool.remove_row(row)
        if moved is not None:
            self.rows[row] = self.rows[moved]
            self.counts[row] = self.counts[moved]
            self.seen[row] = self.seen[moved]
        self.rows.pop()
        self.batch_params = None


def _constraint_accepts(constraint: Constraint, token: int) -> bool:
    """Advances a grammar; a refusal (a bug: the mask allowed the token) ends the sequence."""
    if constraint.advance(token):
        return True
    log.error("grammar refused a token its own mask allowed: %s", constraint.error())
    return False


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)
