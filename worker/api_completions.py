"""/v1/completions: the legacy text completions API, with vLLM's extras (echo, best_of, scoring)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from modelfleet.openai_types import Completion, CompletionChoice, Usage
from modelfleet.protocol import CompletionRequest, new_id, now
from modelfleet.tracing import track

from .api_common import parse, request_id, stream_response, until_disconnect
from .formatting import Shown, completion_choice
from .service import Choice, ModelService
from .streams import completion_stream


def best_choices(choices: list[Choice], prompts: int, n: int, best_of: int) -> list[list[Choice]]:
    """Per prompt, its choices; with best_of > n, the n of highest cumulative logprob."""
    out = []
    for p in range(prompts):
        mine = [c for c in choices if c.prompt_index == p]
        if best_of > n:
            mine = sorted(mine, key=lambda c: c.state.cumulative_logprob(), reverse=True)[:n]
        out.append(mine)
    return out


def completions_router(service: ModelService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(service, request, CompletionRequest)
        streams = service.start_completions(req, request_id(request))
        for s in streams:
            track(s.state)
        n = req.n or 1
        prompts = [s.state.request.prompt_ids for s in streams]
        echo_texts = [service.tokenizer.decode(p) for p in prompts] if req.echo else None
        shown = Shown.of(req, service.text_of)
        if req.stream:
            return stream_response(completion_stream(service, streams, req.model, n, echo_texts, shown, req.logprobs))

        def cancel_all() -> None:
            for s in streams:
                s.cancel()

        choices, prompt_tokens, completion_tokens, prompt_lps = await until_disconnect(
            request, service.collect(streams, req.best_of or n), cancel_all)
        scoring_only = req.max_tokens == 0
        out: list[CompletionChoice] = []
        for p, mine in enumerate(best_choices(choices, len(prompts), n, req.best_of or n)):
            for i, c in enumerate(mine):
                out.append(completion_choice(p * n + i, c.state, shown, prompt_ids=prompts[p],
                                             prompt_lps=prompt_lps.get(p),
                                             echo_text=echo_texts[p] if echo_texts else None,
                                             logprobs=req.logprobs, scoring_only=scoring_only))
        return Completion(
            id=new_id("cmpl"), created=now(), model=req.model, system_fingerprint=service.fingerprint, choices=out,
            usage=Usage.of(prompt_tokens, 0 if scoring_only else completion_tokens,
                           sum(s.state.cached_tokens for s in streams)),
        ).dump()

    return router
