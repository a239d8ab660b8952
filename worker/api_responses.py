"""/v1/responses: the Responses API, translated to a chat request and answered in its own shape."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError

from modelfleet.protocol import (
    ChatCompletionRequest,
    OpenAIError,
    ResponsesRequest,
    new_id,
    now,
    validation_error_to_openai,
)
from modelfleet.tracing import track

from .api_common import parse, request_id, stream_response, until_disconnect
from .formatting import logprob_items
from .service import ModelService
from .streams import response_object, responses_format, responses_stream, responses_tools
from .tool_calls import parse_all

RESPONSES_PARAMS = {"max_completion_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


def responses_error(exc: OpenAIError) -> OpenAIError:
    """Names the Responses API's parameter, not its chat translation's."""
    exc.param = RESPONSES_PARAMS.get(exc.param or "", exc.param)
    return exc


def responses_router(service: ModelService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/responses")
    async def responses(request: Request):
        req = await parse(service, request, ResponsesRequest)
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
            stream, plan = service.start_chat(chat_req, request_id(request))
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

    return router
