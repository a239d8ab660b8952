"""OpenAI response bodies as typed models: what the worker answers and the gateway lists.

Requests live in `modelfleet.protocol` (lenient, validated); these are the answers. Each model
serialises, through `dump()`, to exactly the JSON the API has always sent: a field listed in
`omitted` is left out unless it was given (vLLM's `prompt_token_ids`, a message's `tool_calls`,
a stream chunk's `usage`), while every other field is always sent, as null when it is None
(OpenAI's `logprobs: null`, `refusal: null`). The distinction matters to clients that test
`"usage" in chunk`, so it is stated per field rather than left to a global exclude_none.

Logprobs keep the shapes `worker/formatting.py` builds (typed as plain JSON here): they are
nested per-token lists whose construction is the formatting code's job.

Stream chunks are typed below too, but the streaming hot path frames them with `json.dumps`
(`modelfleet.protocol.sse`): building and dumping a typed chunk measured 9.5 us against 4.3 us
for the dict (pydantic 2.14, one content delta), paid once per token per stream. The chunk
models are the schema, and tests check that the streamed JSON parses as them.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue

Json = dict[str, Any]


class Body(BaseModel):
    """A response body: fields in `omitted` appear only when set; all others always appear.
    Unknown fields are refused: a body states every field it may send."""

    model_config = ConfigDict(extra="forbid")
    omitted: ClassVar[frozenset[str]] = frozenset()

    def model_post_init(self, context: Any) -> None:
        # exclude_unset then drops exactly the `omitted` fields nobody gave.
        self.model_fields_set.update(type(self).model_fields.keys() - self.omitted)

    def dump(self) -> Json:
        return self.model_dump(exclude_unset=True)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The answer's JSON schema (serialization mode, as modelfleet/openapi.py asks for it)
        states the rule above: every field not in `omitted` is required, defaults or not."""
        schema = handler(core_schema)
        if handler.mode == "serialization":
            handler.resolve_ref_schema(schema)["required"] = [f for f in cls.model_fields if f not in cls.omitted]
        return schema


# -- usage ------------------------------------------------------------------------------------


class PromptTokensDetails(Body):
    cached_tokens: int = 0


class Usage(Body):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class PoolingUsage(Body):
    """Embeddings' and rerank's usage: no completion tokens."""

    prompt_tokens: int
    total_tokens: int


# -- model cards ------------------------------------------------------------------------------


class ModelPermission(Body):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_view: bool = True
    is_blocking: bool = False
    organization: str = "*"
    group: str | None = None


class ModelCard(Body):
    """One entry of /v1/models, as the worker serves it and the gateway lists it. `root` is the
    served model, `parent` the model an alias points at (None for the model itself); a LoRA
    adapter's card has its path as `root` and its base model's served name as `parent` (vLLM's)."""

    omitted = frozenset({"max_model_len", "task", "capabilities", "permission", "ready"})
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "modelfleet"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    task: str | None = None
    capabilities: dict[str, Any] | None = None
    permission: list[ModelPermission | Json] | None = None  # a backend's may carry fields of its own
    ready: bool | None = None  # the gateway's, for models it knows before any worker answered

    # What a backend's card may carry into the gateway's listing; everything else is dropped.
    CARRIED: ClassVar[tuple[str, ...]] = ("id", "created", "max_model_len", "task", "capabilities", "permission")

    @classmethod
    def of(cls, name: str, model: str, **fields: Any) -> ModelCard:
        """The card of `name`, served as (or as an alias of) `model`."""
        return cls(id=name, root=model, parent=None if name == model else model, **fields)

    @classmethod
    def of_adapter(cls, name: str, path: str, base: str, **fields: Any) -> ModelCard:
        """The card of LoRA adapter `name`, loaded from `path` onto the served model `base`."""
        return cls(id=name, root=path, parent=base, **fields)

    @classmethod
    def from_backend(cls, card: Json, model: str) -> ModelCard:
        """A backend's card as the gateway lists it, whichever engine sent it: vLLM's names the
        server's model path as `root` and vllm as the owner; clients see one shape."""
        return cls.of(card["id"], model, **{k: card[k] for k in cls.CARRIED if k in card and k != "id"})


class ModelList(Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- chat and completions ---------------------------------------------------------------------


class FunctionCall(Body):
    name: str
    arguments: str


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    omitted = frozenset({"tool_calls"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Body):
    omitted = frozenset({"token_ids"})
    index: int
    message: ChatMessage
    logprobs: Json | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletion(Body):
    omitted = frozenset({"prompt_token_ids", "prompt_logprobs"})
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None  # vLLM's, when asked for
    prompt_logprobs: list[Json | None] | None = None


class CompletionChoice(Body):
    omitted = frozenset({"token_ids", "prompt_token_ids", "prompt_logprobs"})
    index: int
    text: str
    logprobs: Json | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[Json | None] | None = None


class Completion(Body):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class EditChoice(Body):
    text: str
    index: int


class Edit(Body):
    object: Literal["edit"] = "edit"
    created: int
    choices: list[EditChoice]
    usage: Usage


# -- stream chunks (the schema; see the module docstring for how they are sent) ---------------


class ChunkToolCall(Body):
    omitted = frozenset({"id", "type"})
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: Json


class ChatDelta(Body):
    omitted = frozenset({"role", "content", "tool_calls"})
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChatChunkChoice(Body):
    omitted = frozenset({"token_ids"})
    index: int
    delta: ChatDelta
    logprobs: Json | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(Body):
    omitted = frozenset({"usage", "prompt_token_ids"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # with include_usage: null on every chunk, the totals on the last
    prompt_token_ids: list[int] | None = None


class CompletionChunk(Body):
    omitted = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


# -- embeddings, score and rerank -------------------------------------------------------------


class Embedding(Body):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string with encoding_format="base64"


class EmbeddingList(Body):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: PoolingUsage


class ScoreData(Body):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreList(Body):
    """vLLM's ScoreResponse."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


class RerankDocument(Body):
    text: str


class RerankResult(Body):
    omitted = frozenset({"document"})
    index: int
    relevance_score: float
    document: RerankDocument | None = None  # left out with return_documents=false


class Rerank(Body):
    """vLLM's RerankResponse."""

    id: str
    model: str
    usage: PoolingUsage
    results: list[RerankResult]


# -- the Responses API -----------------------------------------------------------------------


class OutputText(Body):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Json] = []
    logprobs: list[Json] = []


class OutputMessage(Body):
    type: Literal["message"] = "message"
    id: str
    status: str = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(Body):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"


class InputTokensDetails(Body):
    cached_tokens: int = 0


class OutputTokensDetails(Body):
    reasoning_tokens: int = 0


class ResponseUsage(Body):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> ResponseUsage:
        return cls(input_tokens=input_tokens, input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
                   output_tokens=output_tokens, output_tokens_details=OutputTokensDetails(),
                   total_tokens=input_tokens + output_tokens)


class Response(Body):
    """A Responses API response object, as answered whole and as carried by its stream's events.
    `previous_response_id` and `store` are the gateway's (gateway/responses_store.py `mark`): a
    stateless worker leaves them out."""

    omitted = frozenset({"previous_response_id", "store"})
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: str
    model: str
    output: list[Annotated[OutputMessage | FunctionCallItem, Field(discriminator="type")]]
    incomplete_details: Json | None = None
    error: Json | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list[Json] = []
    usage: ResponseUsage | None = None
    previous_response_id: str | None = None
    store: bool | None = None


# -- errors -----------------------------------------------------------------------------------


class ErrorDetail(Body):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(Body):
    """Every error's body, from the worker and the gateway (see modelfleet.protocol.OpenAIError)."""

    error: ErrorDetail
