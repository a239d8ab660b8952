"""One served model: turns OpenAI requests into engine work and OpenAI-shaped results.

Routes stay thin by calling this; it owns no HTTP. A generative model serves chat, completions,
the Responses and Edits APIs (both through the chat path) and pooled embeddings; an embedding
model serves embeddings only, and says so for the rest.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelfleet.openai_types import Embedding, EmbeddingList, ModelCard, ModelPermission, PoolingUsage
from modelfleet.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
    model_not_found,
    now,
    score_texts,
)

from .adapters import LoraAdapters
from .constraints import GrammarCompiler
from .embedder import shape_vector
from .engine import GenerationEngine, RequestStream
from .extras import refuse_unsupported
from .formatting import ChoiceState, TokenText
from .loader import ModelInfo
from .prompts import TemplateOptions, completion_prompts, render_chat
from .requests import (
    Limits,
    check_token_ids,
    generation_request,
    output_budget,
    sampling_params,
    truncate_prompt,
)
from .scoring import cosine_scores, pairs, rerank_response, score_response
from .sequence import GenerationRequest, RequestOutput
from .structured import OutputPlan, plan_output
from .tool_calls import functions_from_tools

# How an error names a model that cannot serve an API.
TASK_KINDS = {"generate": "a generation model", "embed": "an embedding model", "score": "a cross-encoder"}


@dataclass
class Choice:
    """One finished choice of a non-streamed request."""

    state: ChoiceState
    prompt_index: int


class ModelService:
    def __init__(self, names: list[str], info: ModelInfo, tokenizer: Any, engine: GenerationEngine | None,
                 embedder: Any, max_num_seqs: int, dtype: str, device: str, scorer: Any = None) -> None:
        self.names = names
        self.info = info
        self.tokenizer = tokenizer
        self.engine = engine
        self.embedder = embedder
        self.scorer = scorer  # a cross-encoder's; an embedding model scores by cosine
        self.created = now()
        self.text_of = TokenText(tokenizer)
        vocab = engine.model_vocab if engine else len(tokenizer)
        self.limits = Limits(max_model_len=info.max_model_len, vocab_size=vocab, max_num_seqs=max_num_seqs)
        # The most characters one token can stand for (see check_fits).
        self.longest_token = max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
        self.grammars = GrammarCompiler(tokenizer, vocab)
        digest = hashlib.sha256(f"{info.path}|{info.architecture}|{dtype}|{device}|{info.max_model_len}|"
                                f"{max_num_seqs}|modelfleet-0.1".encode()).hexdigest()
        self.fingerprint = "fp_" + digest[:10]
        self.draining = False
        # A step that holds work this long without finishing means a wedged engine (a decode
        # step of the largest batch on a CPU takes well under a second).
        self.engine_stall_seconds = 60.0
        self.lora: LoraAdapters | None = None  # a generation model's LoRA adapters (adapters.py)

    # -- identity -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.names[0]

    def check_model(self, requested: str | None, adapters: bool = True) -> None:
        """Refuses a model this worker does not serve; with `adapters`, a LoRA adapter's name
        is one it serves (generation runs with it), else it gets a clear 400."""
        if requested is None or requested in self.names:
            return
        if self.lora is None or self.lora.resolve(requested) is None:
            raise model_not_found(requested)
        if not adapters:
            raise OpenAIError(f"The model `{requested}` is a LoRA adapter of `{self.name}`; LoRA adapters serve "
                              f"chat, completions and responses only. Use `{self.name}` for this endpoint.",
                              param="model", code="model_not_supported")

    def adapter_of(self, requested: str | None) -> str | None:
        """The peft key of the LoRA adapter `requested` names, None for the base model; read
        right before submitting, so an adapter unloaded since `check_model` is a 404 too."""
        if requested is None or requested in self.names:
            return None
        adapter = self.lora.resolve(requested) if self.lora is not None else None
        if adapter is None:
            raise model_not_found(requested)
        return adapter.key

    def capabilities(self) -> dict[str, bool]:
        generate = self.engine is not None
        return {"chat": generate and self.info.has_chat_template, "completion": generate,
                "embedding": self.embedder is not None, "score": self.info.task in ("embed", "score")}

    def model_cards(self) -> list[ModelCard]:
        return [
            ModelCard.of(name, self.name, created=self.created, max_model_len=self.info.max_model_len,
                         task=self.info.task, capabilities=self.capabilities(),
                         permission=[ModelPermission(id=f"modelperm-{name}", created=self.created)])
            for name in self.names
        ] + [
            ModelCard.of_adapter(a.name, a.path, self.name, created=a.created, max_model_len=self.info.max_model_len,
                                 task=self.info.task, capabilities={**self.capabilities(), "embedding": False, "score": False},
                                 permission=[ModelPermission(id=f"modelperm-{a.name}", created=a.created)])
            for a in (self.lora.by_name.values() if self.lora is not None else ())
        ]

    def failure(self) -> str | None:
        """Why this worker cannot serve (its engine died or stalled), or None: what `/health`
        and `/ready` report, so that the gateway ejects it and the kubelet restarts it."""
        return self.engine.healthy(self.engine_stall_seconds) if self.engine else None

    def require_generation(self, what: str) -> GenerationEngine:
        if self.engine is None:
            self.unsupported(what)
        if self.draining:
            raise OpenAIError("This server is shutting down.", status=503, type="service_unavailable",
                              headers={"retry-after": "1"})
        failure = self.failure()
        if failure is not None:
            raise OpenAIError(f"This worker cannot generate: {failure}.", status=503, type="service_unavailable",
                              headers={"retry-after": "1"})
        return self.engine

    # -- prompts ------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[ChatMessage], options: TemplateOptions | None = None,
                    tools: list[dict[str, Any]] | None = None, param: str = "messages") -> list[int]:
        if not self.info.has_chat_template:
            raise OpenAIError(
                f"The model `{self.name}` has no chat template, so it cannot serve chat requests; "
                "use /v1/completions with a prompt instead.", param=param, code="chat_template_missing")
        return render_chat(self.tokenizer, messages, options or TemplateOptions(), tools, param)

    def check_fits(self, texts: list[str], param: str) -> None:
        """Refuses text that cannot fit the context, before tokenizing it. A token stands for
        at most `longest_token` characters, so text longer than that many times the context is
        too long whatever it says; tokenizing megabytes takes seconds on the event loop, which
        would stall every other request of this worker, its readiness probe included."""
        least = -(-sum(len(t) for t in texts) // self.longest_token)
        if least >= self.limits.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.limits.max_model_len} tokens. However, your "
                f"prompt has at least {least} tokens. Please reduce the length of the prompt.",
                param=param, code="context_length_exceeded")

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The request's prompts as the engine runs them: tokenized, then truncated if asked."""
        if req.truncate_prompt_tokens is None:
            texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
            for text in texts:
                self.check_fits([text], "prompt")
        prompts = completion_prompts(self.tokenizer, req.prompt, req.add_special_tokens is not False)
        return [truncate_prompt(p, req, self.limits) for p in prompts]

    # -- generation ---------------------------------------------------------------------------

    def start_chat(self, req: ChatCompletionRequest, request_id: str) -> tuple[RequestStream, OutputPlan]:
        """Submits a chat request; the plan says how its text is constrained and read back. The
        prompt the engine runs is the stream's `state.request.prompt_ids`."""
        engine = self.require_generation("chat completions")
        refuse_unsupported(req, "chat")
        plan = plan_output(req, self.grammars)
        if req.truncate_prompt_tokens is None:
            self.check_fits([m.text() for m in req.messages], "messages")
        prompt = truncate_prompt(self.chat_prompt(req.messages, TemplateOptions.of(req), plan.tools), req, self.limits)
        limit, limit_param = req.output_limit()
        max_tokens = output_budget(len(prompt), limit, self.limits, "messages", limit_param)
        params = sampling_params(req, self.info.generation_defaults, self.limits, want_logprobs=bool(req.logprobs),
                                 top_logprobs=req.top_logprobs or 0, tokenizer=self.tokenizer)
        gen = generation_request(req, prompt, params, max_tokens, self.limits, n=req.n or 1,
                                 prompt_logprobs=req.prompt_logprobs, request_id=request_id)
        gen.grammar = plan.grammar
        gen.adapter = self.adapter_of(req.model)
        return self._submit(engine, gen), plan

    @staticmethod
    def _submit(engine: GenerationEngine, request: GenerationRequest) -> RequestStream:
        """Submits `request`, or refuses it with a 400 when it could never fit in the KV budget."""
        refusal = engine.kv_refusal(request)
        if refusal is not None:
            raise OpenAIError(refusal, param="max_tokens", code="kv_cache_exceeded")
        return engine.submit(request)

    def start_completions(self, req: CompletionRequest, request_id: str) -> list[RequestStream]:
        engine = self.require_generation("completions")
        refuse_unsupported(req, "completions")
        if req.suffix:
            raise OpenAIError("`suffix` (fill-in-the-middle) is not supported by this model.", param="suffix",
                              code="unsupported_parameter")
        n = req.n or 1
        best_of = req.best_of or n
        if best_of < n:
            raise OpenAIError("best_of must be greater than or equal to n.", param="best_of")
        if best_of > n and req.stream:
            raise OpenAIError("best_of cannot be used with stream.", param="best_of")
        plan = plan_output(req, self.grammars)
        prompts = self.completion_prompts(req)
        top = req.logprobs or 0
        want = req.logprobs is not None or best_of > n
        params = sampling_params(req, self.info.generation_defaults, self.limits, want_logprobs=want,
                                 top_logprobs=top, tokenizer=self.tokenizer)
        echo_lp = top if (req.echo and req.logprobs is not None) else None
        prompt_lp = max((k for k in (echo_lp, req.prompt_logprobs) if k is not None), default=None)
        gens = []
        for prompt in prompts:
            # OpenAI allows max_tokens=0 with echo, to score a prompt; the engine needs one step.
            max_tokens = output_budget(len(prompt), max(req.max_tokens or 0, 1) if req.max_tokens is not None
                                       else None, self.limits, "prompt")
            gen = generation_request(req, prompt, params, max_tokens, self.limits, n=best_of,
                                     n_param="best_of" if best_of > n else "n", prompt_logprobs=prompt_lp,
                                     request_id=request_id)
            gen.grammar = plan.grammar
            gen.adapter = self.adapter_of(req.model)
            gens.append(gen)
        return [self._submit(engine, g) for g in gens]

    @staticmethod
    async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Events of several requests (one per completions prompt) in arrival order."""
        if len(streams) == 1:
            async for event in streams[0]:
                yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for event in stream:
                    await queue.put((i, event))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        open_streams = len(streams)
        try:
            while open_streams:
                i, event = await queue.get()
                if event is None:
                    open_streams -= 1
                    continue
                yield i, event
        finally:
            for t in tasks:
                t.cancel()

    @staticmethod
    async def collect(streams: list[RequestStream], n: int) -> tuple[list[Choice], int, int, dict[int, Any]]:
        """Runs requests to the end: (choices, prompt tokens, completion tokens, prompt logprobs)."""
        choices: dict[tuple[int, int], ChoiceState] = {}
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        prompt_lps: dict[int, Any] = {}
        async for i, event in ModelService.merge(streams):
            if event.error:
                raise OpenAIError(event.error, status=500, type="server_error")
            prompt_tokens[i] = event.prompt_tokens
            completion_tokens[i] = event.completion_tokens
            if event.prompt_logprobs is not None:
                prompt_lps[i] = event.prompt_logprobs
            for d in event.deltas:
                st = choices.setdefault((i, d.index), ChoiceState(index=d.index))
                st.text += d.text
                st.token_ids += d.token_ids
                st.logprobs += d.logprobs or []
                st.finish_reason = d.finish_reason or st.finish_reason
        out = [Choice(st, i) for (i, _), st in sorted(choices.items())]
        return out, sum(prompt_tokens.values()), sum(completion_tokens.values()), prompt_lps

    def unsupported(self, what: str) -> None:
        kind = TASK_KINDS.get(self.info.task, self.info.task)
        raise OpenAIError(f"The model `{self.name}` is {kind} (task `{self.info.task}`) and does not support {what}.",
                          param="model", code="model_not_supported")

    # -- embeddings ---------------------------------------------------------------------------

    async def embed(self, req: EmbeddingRequest) -> dict[str, Any]:
        if self.embedder is None:
            self.unsupported("embeddings")
        if self.draining:
            raise OpenAIError("This server is shutting down.", status=503, type="service_unavailable",
                              headers={"retry-after": "1"})
        items: list[Any]
        if isinstance(req.input, str):
            items = [req.input]
        elif req.input and all(isinstance(x, int) for x in req.input):
            items = [list(req.input)]
        else:
            items = list(req.input)
        for i, item in enumerate(items):
            if isinstance(item, list) and any(not 0 <= t < self.limits.vocab_size for t in item):
                raise OpenAIError(f"Input {i} holds token ids outside this model's vocabulary.", param="input")
            if len(item) == 0:
                raise OpenAIError(f"Input {i} is empty.", param="input")
        dim = self.info.embedding_dim
        if req.dimensions is not None and dim is not None and req.dimensions > dim:
            raise OpenAIError(f"This model gives {dim}-dimensional embeddings; `dimensions` must be at most {dim}.",
                              param="dimensions")
        result = await self.embedder.embed(items)
        data: list[Embedding] = []
        for i, vector in enumerate(result.vectors):
            vec = shape_vector(vector, req.dimensions, self.embedder.normalized)
            if req.encoding_format == "base64":
                payload: Any = base64.b64encode(vec.numpy().astype(np.float32).tobytes()).decode()
            else:
                payload = vec.tolist()
            # Built unvalidated: the floats come from torch, and checking each again cost 56 us a
            # 384-float vector here, against 30 us unvalidated (and ~600 us to encode it as JSON).
            data.append(Embedding.model_construct(index=i, embedding=payload))
        return EmbeddingList(data=data, model=req.model,
                             usage=PoolingUsage(prompt_tokens=result.tokens, total_tokens=result.tokens)).dump()

    # -- score and rerank ---------------------------------------------------------------------

    async def pair_scores(self, first: list[str], second: list[str], activation: bool | None,
                          what: str) -> tuple[list[float], int]:
        """The score of each pair (vLLM's pairing) and the tokens read: a cross-encoder reads
        each pair together; an embedding model embeds every text once and compares by cosine."""
        if self.info.task not in ("embed", "score"):
            self.unsupported(f"{what}; it needs an embedding or cross-encoder model")
        if self.draining:
            raise OpenAIError("This server is shutting down.", status=503, type="service_unavailable",
                              headers={"retry-after": "1"})
        if self.scorer is not None:
            result = await self.scorer.score(pairs(first, second))
            logits = torch.stack(result.vectors)
            scores = logits if activation is False else self.scorer.activate(logits)
            return scores.tolist(), result.tokens
        result = await self.embedder.embed(first + second)
        return cosine_scores(result.vectors[: len(first)], result.vectors[len(first) :]), result.tokens

    async def score(self, req: ScoreRequest) -> dict[str, Any]:
        scores, tokens = await self.pair_scores(score_texts(req.text_1), score_texts(req.text_2),
                                                req.use_activation, "score requests")
        return score_response(req.model or self.name, scores, tokens)

    async def rerank(self, req: RerankRequest) -> dict[str, Any]:
        documents = score_texts(req.documents)
        scores, tokens = await self.pair_scores([req.query], documents, req.use_activation, "rerank requests")
        return rerank_response(req.model or self.name, scores, documents, req.top_n, req.return_documents, tokens)

    # -- tokenizer ----------------------------------------------------------------------------

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: messages render as chat renders them (same template options)."""
        if req.messages is not None:
            tools = [f.as_tool() for f in functions_from_tools(req.tools or [])] or None
            tokens = self.chat_prompt(req.messages, TemplateOptions.of(req), tools)
        else:
            special = req.add_special_tokens is not False
            tokens = self.tokenizer(req.prompt, add_special_tokens=special)["input_ids"]
        out: dict[str, Any] = {"tokens": tokens, "count": len(tokens), "max_model_len": self.info.max_model_len}
        if req.return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(tokens)
        return out

    def detokenize(self, tokens: list[int]) -> dict[str, Any]:
        check_token_ids(tokens, self.limits, "tokens")
        return {"prompt": self.tokenizer.decode(tokens)}

