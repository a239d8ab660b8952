"""The OpenAPI document states each body through its typed model: requests as they validate
(modelfleet.protocol), answers and errors as they serialise (modelfleet.openai_types), where a
field a body always sends is required and a field it never sends is refused. The fuzz tests
(tests/component/test_openapi_fuzz.py) check served answers against it; this checks the
document itself, without a model."""

import jsonschema
import pytest

from modelfleet.openai_types import (
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    ModelCard,
    ModelList,
    OutputMessage,
    OutputText,
    Response,
    Usage,
)
from modelfleet.openapi import POST_PATHS, openapi_document
from modelfleet.protocol import error_body

DOCUMENT = openapi_document("test")


def answer_schema(path: str, method: str = "post", status: str = "200") -> dict:
    schema = DOCUMENT["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    return {**schema, "components": DOCUMENT["components"]}


def errors(schema: dict, body: dict) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(body)]


CHAT = ChatCompletion(id="chatcmpl-1", created=1, model="m", usage=Usage.of(3, 2), choices=[
    ChatChoice(index=0, message=ChatMessage(content="hi"), finish_reason="stop")]).dump()


def test_every_post_names_its_request_and_answer_models():
    for path, post in POST_PATHS.items():
        operation = DOCUMENT["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{post.request.__name__}"}
        if post.answer is not None:
            assert answer_schema(path)["$ref"] == f"#/components/schemas/{post.answer.__name__}"


def test_an_answer_as_sent_matches_and_a_changed_one_does_not():
    schema = answer_schema("/v1/chat/completions")
    assert errors(schema, CHAT) == []
    assert errors(schema, {**CHAT, "surprise": 1})  # a field no body sends
    without = {k: v for k, v in CHAT.items() if k != "system_fingerprint"}
    assert errors(schema, without)  # sent as null, never left out
    assert errors(schema, {**CHAT, "prompt_token_ids": [1, 2, 3]}) == []  # left out unless asked for


def test_a_stored_response_carries_the_gateways_fields_and_a_workers_leaves_them_out():
    worker = Response(id="resp_1", created_at=1, status="completed", model="m",
                      output=[OutputMessage(id="msg_1", content=[OutputText(text="hi")])]).dump()
    assert "store" not in worker and "previous_response_id" not in worker
    schema = answer_schema("/v1/responses")
    assert errors(schema, worker) == []
    assert errors(schema, {**worker, "store": True, "previous_response_id": None}) == []


@pytest.mark.parametrize("path, status", [("/v1/chat/completions", "400"), ("/v1/models/{model}", "404")])
def test_errors_are_the_one_error_body(path, status):
    method = "get" if path.startswith("/v1/models") else "post"
    schema = answer_schema(path, method, status)
    assert errors(schema, error_body("no", param="model", code="model_not_found")) == []
    assert errors(schema, {"error": {"message": "no"}})  # type, param and code are always sent


def test_model_cards_as_listed():
    card = ModelCard.of("alias", "chat", created=5, max_model_len=2048)
    assert errors(answer_schema("/v1/models", "get"), ModelList(data=[card]).dump()) == []
    assert errors(answer_schema("/v1/models/{model}", "get"), card.dump()) == []
