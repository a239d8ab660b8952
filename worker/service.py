"""One served model: turns OpenAI requests into engine work and OpenAI-shaped results.

Routes stay thin by calling this; it owns no HTTP. A generative model serves chat, completions,
the Responses and Edits APIs (both through the chat path) and pooled embeddings; an embedding
model serves embeddings only, and says so for the rest.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from jinja2 import TemplateError

from modelfleet.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
    TokenizeRequest,
    model_not_found,
    now,
)

from .constraints import GrammarCompiler
from .embedder import shape_vector
from .engine import GenerationEngine, RequestStream
from .formatting import ChoiceState, TokenText
from .loader import ModelInfo
from .requests import Limits, generation_request, output_budget, sampling_params
from .sequence import RequestOutput
from .structured import OutputPlan, plan_output


@dataclass
class Choice:
    """One finished choice of a non-streamed request."""

    state: ChoiceState
    prompt_index: int


class ModelService:
    def __init__(self, names: list[str], info: ModelInfo, tokenizer: Any, engine: GenerationEngine | None,
                 embedder: Any, max_num_seqs: int, dtype: str, device: str) -> None:
        self.names = names
        self.info = info
        self.tokenizer = tokenizer
        self.engine = engine
        self.embedder = embedder
        self.created = now()
        self.text_of = TokenText(tokenizer)
        vocab = engine.model_vocab if engine else len(tokenizer)
        self.limits = Limits(max_model_len=info.max_model_len, vocab_size=vocab, max_num_seqs=max_num_seqs)
        self.grammars = GrammarCompiler(tokenizer, vocab)
        digest = hashlib.sha256(f"{info.path}|{info.architecture}|{dtype}|{device}|{info.max_model_len}|"
                                f"{max_num_seqs}|modelfleet-0.1".encode()).hexdigest()
        self.fingerprint = "fp_" + digest[:10]
        self.draining = False
        # A step that holds work this long without finishing means a wedged engine (a decode
        # step of the largest batch on a CPU takes well under a second).
        self.engine_stall_seconds = 60.0

    # -- identity -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.names[0]

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested not in self.names:
            raise model_not_found(requested)

    def capabilities(self) -> dict[str, bool]:
        generate = self.engine is not None
        return {"chat": generate and self.info.has_chat_template, "completion": generate, "embedding": True}

    def model_cards(self) -> list[dict[str, Any]]:
        return [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "modelfleet",
                "root": self.name,
                "parent": None if name == self.name else self.name,
                "max_model_len": self.info.max_model_len,
                "task": self.info.task,
                "capabilities": self.capabilities(),
                "permission": [{"id": f"modelperm-{name}", "object": "model_permission", "created": self.created,
                                "allow_sampling": True, "allow_logprobs": True, "allow_view": True,
                                "is_blocking": False, "organization": "*", "group": None}],
            }
            for name in self.names
        ]

    def failure(self) -> str | None:
        """Why this worker cannot serve (its engine died or stalled), or None: what `/health`
        and `/ready` report, so that the gateway ejects it and the kubelet restarts it."""
        return self.engine.healthy(self.engine_stall_seconds) if self.engine else None

    def require_generation(self, what: str) -> GenerationEngine:
        if self.engine is None:
            raise OpenAIError(f"The model `{self.name}` is an embedding model and does not support {what}.",
                              param="model", code="model_not_supported")
        if self.draining:
            raise OpenAIError("This server is shutting down.", status=503, type="service_unavailable",
                              headers={"retry-after": "1"})
        failure = self.failure()
        if failure is not None:
            raise OpenAIError(f"This worker cannot generate: {failure}.", status=503, type="service_unavailable",
                              headers={"retry-after": "1"})
        return self.engine

    # -- prompts ------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[ChatMessage], param: str = "messages",
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        if not self.info.has_chat_template:
            raise OpenAIError(
                f"The model `{self.name}` has no chat template, so it cannot serve chat requests; "
                "use /v1/completions with a prompt instead.", param=param, code="chat_template_missing")
        rendered = [_template_message(m) for m in messages]
        extra = {"tools": tools} if tools else {}
        try:
            text = self.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True, **extra)
        except TemplateError as exc:
            raise OpenAIError(f"The chat template rejected these messages: {exc}", param=param) from exc
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tokenizer(prompt)["input_ids"]]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        out = []
        for p in prompt:
            out.append(self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p))
        if any(len(p) == 0 for p in out):
            raise OpenAIError("Prompts must not be empty.", param="prompt")
        return out

    # -- generation ---------------------------------------------------------------------------

    def start_chat(self, req: ChatCompletionRequest, request_id: str) -> tuple[RequestStream, OutputPlan]:
        """Submits a chat request; the plan says how its text is constrained and read back."""
        engine = self.require_generation("chat completions")
        plan = plan_output(req, self.grammars)
        prompt = self.chat_prompt(req.messages, tools=plan.tools)
        max_tokens = output_budget(len(prompt), req.output_limit(), self.limits, "messages")
        params = sampling_params(req, self.info.generation_defaults, self.limits,
                                 want_logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0)
        gen = generation_request(req, prompt, params, max_tokens, self.limits, n=req.n or 1, request_id=request_id)
        gen.grammar = plan.grammar
        return engine.submit(gen), plan

    def start_completions(self, req: CompletionRequest, request_id: str) -> list[RequestStream]:
        engine = self.require_generation("completions")
        if req.suffix:
            raise OpenAIError("`suffix` (fill-in-the-middle) is not supported by this model.", param="suffix",
                              code="unsupported_parameter")
        n = req.n or 1
        best_of = req.best_of or n
        if best_of < n:
            raise OpenAIError("best_of must be greater than or equal to n.", param="best_of")
        if best_of > n and req.stream:
            raise OpenAIError("best_of cannot be used with stream.", param="best_of")
        prompts = self.completion_prompts(req.prompt)
        top = req.logprobs or 0
        want = req.logprobs is not None or best_of > n
        params = sampling_params(req, self.info.generation_defaults, self.limits, want_logprobs=want,
                                 top_logprobs=top)
        gens = []
        for prompt in prompts:
            # OpenAI allows max_tokens=0 with echo, to score a prompt; the engine needs one step.
            max_tokens = output_budget(len(prompt), max(req.max_tokens or 0, 1) if req.max_tokens is not None
                                       else None, self.limits, "prompt")
            echo_lp = top if (req.echo and req.logprobs is not None) else None
            gens.append(generation_request(req, prompt, params, max_tokens, self.limits, n=best_of,
                                           prompt_logprobs=echo_lp, request_id=request_id))
        return [engine.submit(g) for g in gens]

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

    # -- embeddings ---------------------------------------------------------------------------

    async def embed(self, req: EmbeddingRequest) -> dict[str, Any]:
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
        data = []
        for i, vector in enumerate(result.vectors):
            vec = shape_vector(vector, req.dimensions, self.embedder.normalized)
            if req.encoding_format == "base64":
                payload: Any = base64.b64encode(vec.numpy().astype(np.float32).tobytes()).decode()
            else:
                payload = vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": payload})
        return {
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        }

    # -- tokenizer ----------------------------------------------------------------------------

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        if req.messages is not None:
            tokens = self.chat_prompt(req.messages)
        else:
            tokens = self.tokenizer(req.prompt, add_special_tokens=bool(req.add_special_tokens))["input_ids"]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.info.max_model_len}

    def detokenize(self, tokens: list[int]) -> dict[str, Any]:
        bad = [t for t in tokens if not 0 <= t < self.limits.vocab_size]
        if bad:
            raise OpenAIError(f"Token id {bad[0]} is out of range for this model.", param="tokens")
        return {"prompt": self.tokenizer.decode(tokens)}


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: tool-call arguments as objects (templates such as
    Qwen2.5's apply `tojson` to them), tool results with their call id."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            fn = dict(call.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass  # rendered as the string it is
            calls.append({**call, "function": fn})
        out["tool_calls"] = calls
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out
