"""Thin FastAPI routes: parse -> ModelService -> OpenAI body or SSE stream."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from modelfleet.http import ClientGone, DisconnectWatch, JsonHandler, read_body
from modelfleet.openapi import openapi_document
from modelfleet.protocol import (
    RERANK_PATHS,
    SCORE_PATHS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    EditRequest,
    EmbeddingRequest,
    OpenAIError,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
    new_id,
    now,
    parse_request,
    usage,
    validation_error_to_openai,
)
from modelfleet.tracing import track

from .formatting import Shown, chat_choice, completion_choice, logprob_items
from .metrics import WorkerMetrics
from .prompts import echo_prefix
from .service import ModelService
from .streams import (
    chat_stream,
    completion_stream,
    response_object,
    responses_format,
    responses_stream,
    responses_tools,
)
from .tool_calls import parse_all

T = TypeVar("T")
RESPONSES_PARAMS = {"max_completion_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
log = logging.getLogger(__name__)


async def until_disconnect(request: Request, work: Awaitable[T], cancel: Callable[[], None]) -> T:
    """Awaits `work`; if the client hangs up first, cancels the engine request and ends the
    handler with ClientGone: one log line, since a client that leaves is not a server error."""
    async with DisconnectWatch(request.receive) as watch:
        try:
            return await work
        finally:
            if watch.fired:
                cancel()
    log.info("client disconnected before the response; request cancelled")
    raise ClientGone


def responses_error(exc: OpenAIError) -> OpenAIError:
    """Names the Responses API's parameter, not its chat translation's."""
    exc.param = RESPONSES_PARAMS.get(exc.param or "", exc.param)
    return exc


def fast_routes(service: ModelService) -> dict[str, JsonHandler]:
    """Endpoints served on the raw ASGI path (modelfleet.http.JsonFastPath): embeddings, where
    32 clients keep the model and the HTTP loop busy at once and FastAPI's layers (and its
    jsonable_encoder, which walks every float of every vector) cost measurable throughput."""

    async def embeddings(body: bytes, rid: str) -> dict[str, Any]:
        req = parse_request(EmbeddingRequest, body)
        service.check_model(req.model)
        return await service.embed(req)

    async def score(body: bytes, rid: str) -> dict[str, Any]:
        req = parse_request(ScoreRequest, body)
        service.check_model(req.model)
        return await service.score(req)

    async def rerank(body: bytes, rid: str) -> dict[str, Any]:
        req = parse_request(RerankRequest, body)
        service.check_model(req.model)
        return await service.rerank(req)

    # vLLM's paths for score and rerank (SCORE_PATHS, RERANK_PATHS), scored in batches as embeddings are.
    return {"/v1/embeddings": embeddings, **dict.fromkeys(SCORE_PATHS, score), **dict.fromkeys(RERANK_PATHS, rerank)}


def build_router(service: ModelService, metrics: WorkerMetrics) -> APIRouter:
    router = APIRouter()

    def rid(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id", "")

    async def parse(request: Request, model_cls: type[T]) -> T:
        body = parse_request(model_cls, await read_body(request.receive))  # 413 past the limit, as the gateway
        service.check_model(getattr(body, "model", None))
        return body

    def stream_response(body) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)

    # -- models and health --------------------------------------------------------------------

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": service.model_cards()}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        service.check_model(model_id)
        return next(c for c in service.model_cards() if c["id"] == model_id)

    @router.get("/health")
    async def health() -> JSONResponse:
        failure = service.failure()
        if failure is not None:
            return JSONResponse({"status": "unhealthy", "reason": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/ready")
    async def ready() -> JSONResponse:
        failure = service.failure()
        if failure is not None:
            return JSONResponse({"status": "unhealthy", "reason": failure}, status_code=503)
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "models": service.names})

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    document = openapi_document(f"modelfleet worker: {service.name}")

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(document)

    # -- chat and the APIs served through it ------------------------------------------------

    async def run_chat(request: Request, req: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        stream, plan = service.start_chat(req, rid(request))
        track(stream.state)
        n = req.n or 1
        shown = Shown.of(req, service.text_of)
        echo = echo_prefix(req.messages) if req.echo else ""
        if req.stream:
            return stream_response(chat_stream(service, stream, req.model, n, shown, plan.tool_format, echo))
        choices, prompt_tokens, completion_tokens, prompt_lps = await until_disconnect(
            request, service.collect([stream], n), stream.cancel)
        return {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": now(),
            "model": req.model,
            "system_fingerprint": service.fingerprint,
            "choices": [chat_choice(c.state, plan.tool_format, shown, logprobs=bool(req.logprobs), echo=echo)
                        for c in choices],
            "usage": usage(prompt_tokens, completion_tokens, stream.state.cached_tokens),
            **shown.prompt_fields(stream.state.request.prompt_ids, prompt_lps.get(0)),
        }

    @router.post("/v1/chat/completions")
    async def chat(request: Request):
        return await run_chat(request, await parse(request, ChatCompletionRequest))

    @router.post("/v1/responses")
    async def responses(request: Request):
        req = await parse(request, ResponsesRequest)
        if req.previous_response_id is not None:
            raise OpenAIError("'previous_response_id' needs the gateway's response store: send this request through "
                              "the modelfleet gateway, or send the whole conversation as `input`.",
                              param="previous_response_id", code="unsupported_parameter")
        messages = req.messages()
        if not messages:
            raise OpenAIError("'input' must not be empty.", param="input", code="invalid_value")
        try:
            chat_req = ChatCompletionRequest(
                model=req.model, messages=messages, max_completion_tokens=req.max_output_tokens,
                temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                response_format=responses_format(req.text),
                tools=responses_tools(req.tools), tool_choice=req.tool_choice,
                parallel_tool_calls=getattr(req, "parallel_tool_calls", None),
                logprobs=req.wants_logprobs(), top_logprobs=req.top_logprobs if req.wants_logprobs() else None,
            )
            stream, plan = service.start_chat(chat_req, rid(request))
            track(stream.state)
        except ValidationError as exc:  # a field the Responses model keeps untyped (parallel_tool_calls)
            raise responses_error(validation_error_to_openai(exc)) from exc
        except OpenAIError as exc:
            raise responses_error(exc) from None
        text_of = service.text_of if req.wants_logprobs() else None
        if req.stream:
            return stream_response(responses_stream(stream, req.model, plan.tool_format, text_of))
        choices, prompt_tokens, completion_tokens, _ = await until_disconnect(
            request, service.collect([stream], 1), stream.cancel)
        st = choices[0].state
        incomplete = st.finish_reason == "length"
        content, calls = (st.text, []) if plan.tool_format is None else parse_all(plan.tool_format, st.text)
        logprobs = logprob_items(st.logprobs, text_of) if text_of is not None else None
        return response_object(new_id("resp"), req.model, now(), content, "incomplete" if incomplete else "completed",
                               prompt_tokens, completion_tokens, new_id("msg"), incomplete, calls, logprobs,
                               stream.state.cached_tokens)

    @router.post("/v1/edits")
    async def edits(request: Request):
        req = await parse(request, EditRequest)
        messages = [ChatMessage(role="system", content=req.instruction), ChatMessage(role="user", content=req.input)]
        chat_req = ChatCompletionRequest(model=req.model, messages=messages, n=req.n, temperature=req.temperature,
                                         top_p=req.top_p)
        stream, _ = service.start_chat(chat_req, rid(request))
        track(stream.state)
        choices, prompt_tokens, completion_tokens, _ = await until_disconnect(
            request, service.collect([stream], req.n or 1), stream.cancel)
        return {
            "object": "edit",
            "created": now(),
            "choices": [{"text": c.state.text, "index": c.state.index} for c in choices],
            "usage": usage(prompt_tokens, completion_tokens, stream.state.cached_tokens),
        }

    # -- completions -------------------------------------------------------------------------

    @router.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        streams = service.start_completions(req, rid(request))
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
        out = []
        for p in range(len(prompts)):
            mine = [c for c in choices if c.prompt_index == p]
            if (req.best_of or n) > n:
                mine = sorted(mine, key=lambda c: c.state.cumulative_logprob(), reverse=True)[:n]
            for i, c in enumerate(mine):
                out.append(completion_choice(p * n + i, c.state, shown, prompt_ids=prompts[p],
                                             prompt_lps=prompt_lps.get(p),
                                             echo_text=echo_texts[p] if echo_texts else None,
                                             logprobs=req.logprobs, scoring_only=scoring_only))
        return {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": req.model,
            "system_fingerprint": service.fingerprint,
            "choices": out,
            "usage": usage(prompt_tokens, 0 if scoring_only else completion_tokens,
                           sum(s.state.cached_tokens for s in streams)),
        }

    # -- embeddings and tokenizer ----------------------------------------------------------

    @router.post("/tokenize")
    async def tokenize(request: Request):
        return service.tokenize(await parse(request, TokenizeRequest))

    @router.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse(request, DetokenizeRequest)
        return service.detokenize(req.tokens)

    return router

