"""The OpenAPI 3.1 document of the HTTP API, served at `/openapi.json` by the gateway and by the
worker, which offer the same paths.

Every body in it is a typed model's own JSON schema: requests from `modelfleet.protocol` (as they
validate), answers and errors from `modelfleet.openai_types` (as they serialise), so the document
states no shape of its own and cannot drift from what the servers validate and send. FastAPI's
generated document did not fit: the OpenAI paths are raw ASGI (gateway/datapath.py,
modelfleet.http.JsonFastPath) or read the raw body themselves, so FastAPI never sees their models,
and it would advertise the 422 that this API never sends.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from .openai_types import (
    ChatCompletion,
    Completion,
    Edit,
    EmbeddingList,
    ErrorResponse,
    ModelCard,
    ModelList,
    Rerank,
    ScoreList,
)
from .openai_types import Response as ResponseObject
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EditRequest,
    EmbeddingRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
)


class Status(BaseModel):
    """What /health and /ready answer, 200 or 503: a probe's answer, not an API error (the worker
    and the gateway build it as a dict; it is stated here only)."""

    model_config = ConfigDict(extra="allow")

    status: str


class Post(NamedTuple):
    request: type[BaseModel]
    answer: type[BaseModel] | None  # None: vLLM's tokenizer answers, typed nowhere yet
    summary: str
    streams: bool  # whether `stream: true` answers server-sent events


POST_PATHS: dict[str, Post] = {
    "/v1/chat/completions": Post(ChatCompletionRequest, ChatCompletion, "Create a chat completion", True),
    "/v1/completions": Post(CompletionRequest, Completion, "Create a text completion", True),
    "/v1/embeddings": Post(EmbeddingRequest, EmbeddingList, "Create embeddings", False),
    "/v1/responses": Post(ResponsesRequest, ResponseObject, "Create a response (Responses API)", True),
    "/v1/rerank": Post(RerankRequest, Rerank,
                       "Rerank documents against a query (embedding models and cross-encoders)", False),
    "/v1/score": Post(ScoreRequest, ScoreList, "Score text pairs (embedding models and cross-encoders)", False),
    "/v1/edits": Post(EditRequest, Edit, "Create an edit (legacy Edits API, served through chat)", False),
    "/tokenize": Post(TokenizeRequest, None, "Tokenize a prompt or chat messages", False),
    "/detokenize": Post(DetokenizeRequest, None, "Turn token ids back into text", False),
}

# Statuses a POST can answer besides 200, with what they mean here (docs/api.md).
POST_ERRORS = {
    "400": "Invalid request: malformed JSON, a wrong type or range (never 422), a non-JSON content type, "
           "a prompt or output past the context",
    "401": "Missing or wrong API key (gateway with keys)",
    "403": "The API key may not use this model",
    "404": "Unknown model (`code: model_not_found`)",
    "405": "Method not allowed",
    "413": "Request body larger than the limit",
    "429": "Rate limited; see `retry-after`",
    "500": "A bug in the server",
    "503": "No ready replica, or the worker is draining; see `retry-after`",
}

# One server-sent event: `data:` is a JSON object or `[DONE]`; the Responses API also names events.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}

REQUEST_ID = {"x-request-id": {"description": "The client's request id, echoed, or a new one",
                               "schema": {"type": "string"}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "headers": REQUEST_ID, "content": {"application/json": {"schema": schema}}}


def _errors(statuses: dict[str, str]) -> dict[str, Any]:
    return {status: _json(_ref("ErrorResponse"), text) for status, text in statuses.items()}


def _post(post: Post, refs: dict[type[BaseModel], dict[str, str]]) -> dict[str, Any]:
    answer = refs[post.answer] if post.answer is not None else {"type": "object"}
    ok = _json(answer, "The answer" + (", or with `stream: true` server-sent events "
                                       "ending with `data: [DONE]`" if post.streams else ""))
    if post.streams:
        ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    name = post.request.__name__
    return {"post": {
        "summary": post.summary,
        "operationId": name[0].lower() + name[1:],
        "requestBody": {"required": True, "content": {"application/json": {"schema": refs[post.request]}}},
        "responses": {"200": ok, **_errors(POST_ERRORS)},
    }}


def _get(summary: str, ok: dict[str, Any], errors: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": ok, **_errors(errors)}, **extra}}


def _schemas() -> tuple[dict[type[BaseModel], dict[str, str]], dict[str, Any]]:
    """Requests as they validate, answers as they serialise (where every field that is always
    sent is required: modelfleet.openai_types.Body). A model in both, such as `ChatMessage`, gets
    pydantic's `-Input`/`-Output` names."""
    requests = [post.request for post in POST_PATHS.values()]
    answers = [post.answer for post in POST_PATHS.values() if post.answer is not None]
    answers += [ErrorResponse, ModelCard, ModelList, Status]
    refs, defs = models_json_schema([(m, "validation") for m in requests] + [(m, "serialization") for m in answers],
                                    ref_template="#/components/schemas/{model}")
    return {m: ref for (m, _), ref in refs.items()}, defs["$defs"]


def openapi_document(title: str, version: str = "0.1.0") -> dict[str, Any]:
    """The document for every path the gateway and the worker serve."""
    refs, schemas = _schemas()
    status_ok = _json(refs[Status], "The status")
    paths: dict[str, Any] = {path: _post(post, refs) for path, post in POST_PATHS.items()}
    paths["/v1/models"] = _get("List the models", _json(refs[ModelList], "The models this key may use"),
                               {"401": POST_ERRORS["401"], "500": POST_ERRORS["500"]}, operationId="listModels")
    paths["/v1/models/{model}"] = _get(
        "Describe one model", _json(refs[ModelCard], "The model"),
        {"401": POST_ERRORS["401"], "404": POST_ERRORS["404"], "500": POST_ERRORS["500"]},
        operationId="getModel",
        parameters=[{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}])
    # Stored responses live in the gateway (gateway/responses_store.py); a worker answers 404.
    response_id = [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    stored_errors = {"401": POST_ERRORS["401"], "404": "No stored response with this id for this key",
                     "500": POST_ERRORS["500"]}
    paths["/v1/responses/{response_id}"] = {
        **_get("Get a stored response (gateway)", _json({"type": "object"}, "The response object"), stored_errors,
               operationId="getResponse", parameters=response_id),
        "delete": {"summary": "Delete a stored response (gateway)", "operationId": "deleteResponse",
                   "parameters": response_id,
                   "responses": {"200": _json({"type": "object"}, "`{id, object: response, deleted: true}`"),
                                 **_errors(stored_errors)}},
    }
    paths["/v1/responses/{response_id}/input_items"] = _get(
        "The input items of a stored response (gateway)", _json({"type": "object"}, "A list of input items"),
        stored_errors, operationId="listResponseInputItems", parameters=response_id)
    paths["/health"] = _get("Liveness", status_ok, {}, operationId="health")
    paths["/health"]["get"]["responses"]["503"] = _json(refs[Status], "The model failed")
    paths["/ready"] = _get("Readiness: at least one model can take traffic", status_ok, {}, operationId="ready")
    paths["/ready"]["get"]["responses"]["503"] = _json(refs[Status], "Not ready, or draining")
    paths["/metrics"] = _get("Prometheus metrics", {"description": "Prometheus text format", "headers": REQUEST_ID,
                                                    "content": {"text/plain": {"schema": {"type": "string"}}}},
                             {}, operationId="metrics")
    paths["/openapi.json"] = _get("This document", _json({"type": "object"}, "OpenAPI 3.1"), {},
                                  operationId="openapi")
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "OpenAI-compatible API. Every error is `{\"error\": {\"message\", \"type\", "
                                "\"param\", \"code\"}}`."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
