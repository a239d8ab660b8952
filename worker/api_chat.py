"""/v1/chat/completions, and the Edits API served through chat."""

from __future__ import annotations

from fastapi import APIRouter, Request

from modelfleet.openai_types import ChatCompletion, Edit, EditChoice, Usage
from modelfleet.protocol import ChatCompletionRequest, ChatMessage, EditRequest, new_id, now
from modelfleet.tracing import track

from .api_common import parse, request_id, stream_response, until_disconnect
from .formatting import Shown, chat_choice
from .prompts import echo_prefix
from .service import ModelService
from .streams import chat_stream


def chat_router(service: ModelService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(service, request, ChatCompletionRequest)
        stream, plan = service.start_chat(req, request_id(request))
        track(stream.state)
        n = req.n or 1
        shown = Shown.of(req, service.text_of)
        echo = echo_prefix(req.messages) if req.echo else ""
        if req.stream:
            return stream_response(chat_stream(service, stream, req.model, n, shown, plan.tool_format, echo))
        choices, prompt_tokens, completion_tokens, prompt_lps = await until_disconnect(
            request, service.collect([stream], n), stream.cancel)
        return ChatCompletion(
            id=new_id("chatcmpl"), created=now(), model=req.model, system_fingerprint=service.fingerprint,
            choices=[chat_choice(c.state, plan.tool_format, shown, logprobs=bool(req.logprobs), echo=echo)
                     for c in choices],
            usage=Usage.of(prompt_tokens, completion_tokens, stream.state.cached_tokens),
            **shown.prompt_fields(stream.state.request.prompt_ids, prompt_lps.get(0)),
        ).dump()

    @router.post("/v1/edits")
    async def edits(request: Request):
        req = await parse(service, request, EditRequest)
        messages = [ChatMessage(role="system", content=req.instruction), ChatMessage(role="user", content=req.input)]
        chat_req = ChatCompletionRequest(model=req.model, messages=messages, n=req.n, temperature=req.temperature,
                                         top_p=req.top_p)
        stream, _ = service.start_chat(chat_req, request_id(request))
        track(stream.state)
        choices, prompt_tokens, completion_tokens, _ = await until_disconnect(
            request, service.collect([stream], req.n or 1), stream.cancel)
        return Edit(created=now(), choices=[EditChoice(text=c.state.text, index=c.state.index) for c in choices],
                    usage=Usage.of(prompt_tokens, completion_tokens, stream.state.cached_tokens)).dump()

    return router
