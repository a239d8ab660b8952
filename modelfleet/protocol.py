"""OpenAI wire models shared by the worker and the gateway, the one error shape, and SSE framing.

Requests are lenient about fields they do not know (clients such as LangChain send extra ones)
and strict about the types and ranges of the fields they do know: a wrong value is a 400 that
names the parameter, never a 422.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .openai_types import ErrorDetail, ErrorResponse

# --------------------------------------------------------------------------------------------
# Errors


class OpenAIError(Exception):
    """An error that reaches the client as `{"error": {...}}` with an OpenAI status code."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).dump()


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        f"The model `{model}` does not exist or you do not have access to it.",
        status=404,
        param="model",
        code="model_not_found",
    )


def unavailable(message: str, retry_after: int = 5) -> OpenAIError:
    return OpenAIError(
        message,
        status=503,
        type="service_unavailable",
        code="service_unavailable",
        headers={"retry-after": str(retry_after)},
    )


def validation_error_to_openai(exc: ValidationError) -> OpenAIError:
    """Turns pydantic's first complaint into an OpenAI 400 naming the offending parameter."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if not isinstance(part, int)]
    # Union members show up as extra location parts ("str", "list[str]"); the user's field is first.
    param = ".".join(p for p in loc if not _looks_like_type(p)) or None
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    where = f"'{param}'" if param else "the request body"
    return OpenAIError(f"Invalid value for {where}: {msg}", param=param, code="invalid_value")


def _looks_like_type(part: str) -> bool:
    return (
        part in {"str", "int", "float", "bool", "list", "dict"}
        or "[" in part
        or part.startswith("function-")
        or part.endswith("Param")
        or part.endswith("Part")
    )


def load_json(raw: bytes) -> Any:
    """A request body as JSON, or a 400 `invalid_json`: malformed JSON, bytes that are not
    strict UTF-8 (json.loads would pass an encoded surrogate through), a lone surrogate written
    as an escape (no tokenizer can encode it), or nesting deep enough to exhaust the stack."""
    try:
        data = json.loads(raw.decode("utf-8"))
        if b"\\ud" in raw or b"\\uD" in raw:  # surrogate escapes: legal only in pairs
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (json.JSONDecodeError, UnicodeDecodeError, UnicodeEncodeError) as exc:
        raise OpenAIError(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from exc
    except RecursionError:
        raise OpenAIError("We could not parse the JSON body of your request: it is nested too deeply.",
                          code="invalid_json") from None
    return data


def parse_request(model_cls: type[BaseModel], raw: bytes) -> Any:
    """Validates a raw JSON body into `model_cls`; malformed JSON and bad values become 400s."""
    data = load_json(raw) if raw else None
    if not isinstance(data, dict):
        raise OpenAIError("The request body must be a JSON object.", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_openai(exc) from exc


# --------------------------------------------------------------------------------------------
# Request models


class Lenient(BaseModel):
    """Accepts and keeps unknown fields, so new OpenAI parameters never cause a 400."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class StreamOptions(Lenient):
    include_usage: bool | None = False
    # vLLM's: together with include_usage, every chunk carries the usage so far.
    continuous_usage_stats: bool | None = False


class ContentPart(Lenient):
    type: str
    text: str | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text; an array of parts is joined, non-text parts are rejected."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type in ("text", "input_text", "output_text"):
                pieces.append(part.text or "")
            else:
                raise OpenAIError(
                    f"Content parts of type '{part.type}' are not supported by this model; "
                    "send text parts only.",
                    param="messages",
                    code="unsupported_content",
                )
        return "".join(pieces)


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# Seeds are int64, as in vLLM and torch: a larger one is a 400, not a failure deep in the engine.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Seed = Int64
# A token id's upper bound is the model's vocabulary, which the worker checks.
TokenId = Annotated[int, Field(ge=0)]
StopParam = str | list[str] | None
JsonSpec = str | dict[str, Any]


class StructuredOutputs(Lenient):
    """vLLM's `structured_outputs` (0.11 and later): one kind of constraint, and options for JSON.
    `json` is aliased because pydantic models already have a `json` attribute."""

    json_spec: JsonSpec | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: JsonSpec | None = None
    disable_any_whitespace: bool | None = False
    disable_additional_properties: bool | None = False
    whitespace_pattern: str | None = None

    def kinds(self) -> dict[str, Any]:
        """The constraints this sets, by vLLM's names; a valid request sets exactly one."""
        values = {"json": self.json_spec, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                  "json_object": {} if self.json_object else None, "structural_tag": self.structural_tag}
        return {kind: value for kind, value in values.items() if value is not None}


class SamplingFields(Lenient):
    """Sampling parameters shared by chat, completions and the Responses API."""

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    stop: StopParam = None
    stop_token_ids: list[TokenId] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None  # OpenAI's on chat; vLLM takes it on completions too

    # vLLM's extra parameters, typed so that a wrong value is a 400 naming it. What the worker
    # does with each (and with those it refuses, which are not declared) is in worker/extras.py.
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSpec | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    structural_tag: JsonSpec | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    return_token_ids: bool | None = False
    return_tokens_as_token_ids: bool | None = False
    prompt_logprobs: Annotated[int, Field(ge=-1)] | None = None  # -1: the whole vocabulary, in vLLM
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: list[str] | None = None
    length_penalty: float | None = None
    early_stopping: bool | None = None
    stream_interval: Annotated[int, Field(ge=1)] | None = None
    priority: Int64 | None = None
    request_id: str | None = None
    cache_salt: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _stream_only_options(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              param="stream_options", code="invalid_value")
        if self.prompt_logprobs is not None and self.stream:
            raise OpenAIError("`prompt_logprobs` are not available when `stream` is true.",
                              param="prompt_logprobs", code="invalid_value")
        return self

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: StopParam) -> StopParam:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    def wants_usage(self) -> tuple[bool, bool]:
        """(a final usage chunk, usage on every chunk): vLLM sends the second only with the first."""
        opts = self.stream_options
        final = bool(opts and opts.include_usage)
        return final, final and bool(opts and opts.continuous_usage_stats)


class ChatTemplateFields(Lenient):
    """vLLM's options for rendering messages into a prompt, on chat and on /tokenize (the worker's
    prompts.TemplateOptions applies vLLM's rules to them)."""

    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    echo: bool | None = False  # vLLM's: the reply starts with the final assistant message
    include_reasoning: bool | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError(
                "`top_logprobs` requires `logprobs` to be true.", param="top_logprobs", code="invalid_value"
            )
        return self

    def output_limit(self) -> tuple[int | None, str]:
        """The output token limit and the parameter that set it, for errors that name it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


PromptParam = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptParam
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    add_special_tokens: bool | None = True

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: PromptParam) -> PromptParam:
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be an empty list")
        return value


class EmbeddingRequest(Lenient):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("input must not be an empty list")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return value


class ResponsesRequest(Lenient):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    stream: bool | None = False
    seed: Seed | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None
    include: list[str] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # Kept by the gateway (gateway/responses_store.py): a worker accepts `store` and ignores it.
    store: bool | None = None
    previous_response_id: str | None = None

    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])

    def messages(self) -> list[ChatMessage]:
        """Responses input (a string or message items) as chat messages for the chat path."""
        out: list[ChatMessage] = []
        if self.instructions:
            out.append(ChatMessage(role="system", content=self.instructions))
        if isinstance(self.input, str):
            out.append(ChatMessage(role="user", content=self.input))
            return out
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind != "message":
                raise OpenAIError(
                    f"Input items of type '{kind}' are not supported.", param=f"input[{i}]", code="invalid_value"
                )
            try:
                out.append(ChatMessage.model_validate({"role": item.get("role"), "content": item.get("content")}))
            except ValidationError as exc:
                raise OpenAIError(f"Invalid input item: {exc.errors()[0]['msg']}", param=f"input[{i}]") from exc
        return out


class EditRequest(Lenient):
    model: str
    input: str | None = ""
    instruction: str
    n: Annotated[int, Field(ge=1, le=20)] | None = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class TokenizeRequest(ChatTemplateFields):
    """vLLM's /tokenize: a prompt, or messages rendered as chat renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise OpenAIError("Send exactly one of `prompt` or `messages`.", param="prompt")
        return self


class DetokenizeRequest(Lenient):
    model: str | None = None
    tokens: list[TokenId]


# The paths vLLM serves score and rerank at; modelfleet's worker and gateway serve them all.
SCORE_PATHS = ("/v1/score", "/score")
RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")
# Most texts on one side of a score or rerank request, as for embeddings' inputs.
MAX_SCORE_TEXTS = 2048
ScoreTexts = str | list[str]


def score_texts(texts: ScoreTexts) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


class ScoreRequest(Lenient):
    """vLLM's /score: each of `text_1` scored against `text_2`, one to one, one to many or
    pairwise (N:N). vLLM's other names for the two sides (queries/documents, queries/items,
    data_1/data_2) are accepted too; only text is (vLLM's multi-modal parts are not)."""

    model: str | None = None
    text_1: ScoreTexts = Field(validation_alias=AliasChoices("text_1", "queries", "data_1"))
    text_2: ScoreTexts = Field(validation_alias=AliasChoices("text_2", "documents", "items", "data_2"))
    # vLLM's: False gives a cross-encoder's raw logit instead of its activation (sigmoid).
    use_activation: bool | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _pairing(self) -> ScoreRequest:
        n1, n2 = len(score_texts(self.text_1)), len(score_texts(self.text_2))
        if n1 == 0:
            raise OpenAIError("At least one text element must be given.", param="text_1", code="invalid_value")
        if n2 == 0:
            raise OpenAIError("At least one text_pair element must be given.", param="text_2", code="invalid_value")
        if n1 > 1 and n1 != n2:
            raise OpenAIError(f"Input lengths must be either 1:1, 1:N or N:N; got {n1}:{n2}.", param="text_2",
                              code="invalid_value")
        if max(n1, n2) > MAX_SCORE_TEXTS:
            raise OpenAIError(f"At most {MAX_SCORE_TEXTS} texts per side.", param="text_2", code="invalid_value")
        return self


class RerankRequest(Lenient):
    """The Jina/Cohere rerank request as vLLM serves it at /rerank, /v1/rerank and /v2/rerank.
    `top_n` 0 or absent returns every document; `return_documents` (Cohere's, default true as
    vLLM always returns them) false leaves the documents out of the results."""

    model: str | None = None
    query: str
    documents: ScoreTexts
    top_n: Annotated[int, Field(ge=0)] | None = None
    return_documents: bool | None = True
    use_activation: bool | None = None
    user: str | None = None

    @field_validator("documents")
    @classmethod
    def _documents(cls, value: ScoreTexts) -> ScoreTexts:
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("documents must not be an empty list")
        if isinstance(value, list) and len(value) > MAX_SCORE_TEXTS:
            raise ValueError(f"at most {MAX_SCORE_TEXTS} documents per request")
        return value


# --------------------------------------------------------------------------------------------
# Response helpers


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """`openai_types.Usage.of(...).dump()` as a plain dict, for stream chunks (see openai_types)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


# --------------------------------------------------------------------------------------------
# Server-sent events

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class SseEvents:
    """Whole server-sent events out of a byte stream that may cut one anywhere: `feed` returns
    the events completed so far (without their blank-line terminator) and keeps the rest;
    `flush` returns what is left at the end. For relays that rewrite events (the gateway's usage
    stripper and stored Responses)."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self.pending + chunk
        cut = data.rfind(b"\n\n") + 2
        if cut < 2:
            self.pending = data
            return []
        self.pending = data[cut:]
        return data[:cut].split(b"\n\n")[:-1]

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest


def sse_event(event: str, payload: dict[str, Any]) -> bytes:
    """A named event, as the Responses API streams them."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {body}\n\n".encode()
