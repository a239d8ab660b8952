"""What the gateway does differently for a model that another engine (vLLM) serves, so that a
client cannot tell which engine answers: the same checks, the same refusals, the same errors."""

from __future__ import annotations

import json

from modelfleet import protocol
from modelfleet.protocol import OpenAIError, error_body

# Request models the gateway checks bodies against before they reach another engine.
VALIDATED = {
    "/v1/chat/completions": protocol.ChatCompletionRequest,
    "/v1/completions": protocol.CompletionRequest,
    "/v1/embeddings": protocol.EmbeddingRequest,
    "/v1/responses": protocol.ResponsesRequest,
    "/tokenize": protocol.TokenizeRequest,
    "/detokenize": protocol.DetokenizeRequest,
    **dict.fromkeys(protocol.SCORE_PATHS, protocol.ScoreRequest),
    **dict.fromkeys(protocol.RERANK_PATHS, protocol.RerankRequest),
}


def check_for_engine(engine: str, path: str, body: bytes, name: str) -> None:
    """Refuses, in the API's own words, what the model's engine cannot serve, and checks the
    body with the same request models as modelfleet's worker: a client gets the same 400 for
    the same mistake whichever engine runs the model (vLLM accepts some invalid values, and
    words its errors its own way). Only the check is done here; the body is forwarded as sent,
    vLLM's own extra parameters included."""
    if engine == "vllm" and path == "/v1/edits":
        raise OpenAIError(
            f"The model `{name}` is served by the vllm engine, which has no Edits API; "
            "send the instruction and input to /v1/chat/completions instead.",
            param="model", code="unsupported_endpoint",
        )
    model_cls = VALIDATED.get(path)
    if model_cls is not None:
        protocol.parse_request(model_cls, body)


# OpenAI's error type for each status, which vLLM words its own way ("BadRequestError", code 400).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
               503: "service_unavailable"}


class ErrorRewriter:
    """An error answer from another engine, reworded in OpenAI's shape (the status stays). The
    body is small and complete only at its end, so it is held until then."""

    def __init__(self, status: int, replacement: dict | None = None) -> None:
        self.status = status
        self.body: bytes | None = b""
        self.replacement = replacement

    @classmethod
    def for_answer(cls, relay, name: str, path: str) -> ErrorRewriter:
        """The rewriter for one error answer. vLLM answers 404 for a path its runner does not
        serve (chat on a pooling model, embeddings on a generating one): modelfleet's worker
        says 400, naming the model, and so does the gateway."""
        if relay.status == 404:
            relay.status = 400
            message = f"The model `{name}` does not support {path}."
            return cls(400, error_body(message, param="model", code="model_not_supported"))
        return cls(relay.status)

    def feed(self, chunk: bytes) -> bytes:
        if self.body is None:  # already sent
            return b""
        if chunk:
            self.body += chunk
            return b""
        out = json.dumps(self.replacement or openai_error(self.body, self.status)).encode()
        self.body = None
        return out


def openai_error(body: bytes, status: int) -> dict:
    """Pure: `{"error": {message, type, param, code}}` from whatever error body came back."""
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):  # older vLLM: the fields at the top level
        error = data if isinstance(data, dict) else {}
    message = error.get("message") or body.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    code = error.get("code")
    return error_body(
        str(message),
        type=ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        param=error.get("param") if isinstance(error.get("param"), str) else None,
        code=code if isinstance(code, str) else None,
    )
