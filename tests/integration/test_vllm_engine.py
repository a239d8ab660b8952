"""`modelfleet serve --engine vllm`: vLLM's own OpenAI server behind modelfleet's gateway, for
real (vLLM's CPU build from `make vllm`), answering as modelfleet's engine does.

vLLM takes one to two minutes to start on this machine, so one server (conftest's `vllm_serve`)
serves the tier. Without the vLLM environment these tests skip, unless MODELFLEET_REQUIRE_VLLM is
set (`make test` sets it after `make vllm`), when they fail.
"""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from modelfleet.demo import VLLM_DEMO_KV_BYTES
from modelfleet.devcluster import wait_for
from modelfleet.engines import find_vllm_python

from .conftest import CHAT, EMBED, require_vllm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/bytecode.py
from bytecode import check_args, compiled  # noqa: E402

pytestmark = pytest.mark.integration
OPEN = {"authorization": "Bearer sk-open-0123456789"}


@pytest.fixture(scope="module")
def client(vllm_serve):
    from openai import OpenAI

    return OpenAI(base_url=vllm_serve + "/v1", api_key="sk-open-0123456789", max_retries=0)


def test_chat_streamed_chat_completions_and_embeddings_through_the_sdk(client):
    chat = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert chat.headers["x-request-id"]
    body = chat.parse()
    assert isinstance(body.choices[0].message.content, str) and body.usage.completion_tokens <= 8
    assert body.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].delta.content for c in chunks)

    completion = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=5)
    assert completion.usage.completion_tokens <= 5 and completion.choices[0].text is not None

    embedded = client.embeddings.create(model=EMBED, input=["a sentence", "another one"])  # base64, as the SDK asks
    assert [len(d.embedding) for d in embedded.data] == [384, 384]


def test_models_are_listed_in_one_shape_and_mistakes_get_modelfleets_errors(vllm_serve):
    cards = httpx.get(vllm_serve + "/v1/models", headers=OPEN).json()["data"]
    assert {c["id"] for c in cards} == {CHAT, EMBED}
    assert all(c["owned_by"] == "modelfleet" and c["root"] == c["id"] for c in cards)  # no server paths
    bad = httpx.post(vllm_serve + "/v1/chat/completions", headers=OPEN, timeout=30,
                     json={"model": CHAT, "messages": [{"role": "user", "content": "x"}], "temperature": 7})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error" and bad.json()["error"]["param"] == "temperature"
    too_long = httpx.post(vllm_serve + "/v1/completions", headers=OPEN, timeout=30,
                          json={"model": CHAT, "prompt": "word " * 5000, "max_tokens": 4})
    assert too_long.status_code == 400  # vLLM's own refusal, in OpenAI's shape
    error = too_long.json()["error"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    wrong_runner = httpx.post(vllm_serve + "/v1/chat/completions", headers=OPEN, timeout=30,
                              json={"model": EMBED, "messages": [{"role": "user", "content": "x"}]})
    assert wrong_runner.status_code == 400 and wrong_runner.json()["error"]["code"] == "model_not_supported"
    edits = httpx.post(vllm_serve + "/v1/edits", headers=OPEN, timeout=30,
                       json={"model": CHAT, "input": "teh cat", "instruction": "fix the spelling"})
    assert edits.status_code == 400 and "vllm engine" in edits.json()["error"]["message"]


def test_a_token_limited_key_is_charged_exactly_on_a_vllm_stream(vllm_serve):
    body = {"model": CHAT, "messages": [{"role": "user", "content": "count"}], "max_tokens": 6, "ignore_eos": True}
    prompt_tokens = httpx.post(vllm_serve + "/v1/chat/completions", headers=OPEN, json=body,
                               timeout=60).json()["usage"]["prompt_tokens"]

    def charged() -> float:
        for line in httpx.get(vllm_serve + "/metrics").text.splitlines():
            if line.startswith("modelfleet_gateway_tokens_total{") and 'key="metered"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = charged()
    with httpx.stream("POST", vllm_serve + "/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                      headers={"authorization": "Bearer sk-metered-0123456789"}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["choices"] for e in events[:-1])  # the usage chunk was not asked for
    # Charged when the gateway closes the relay, which can come after the client has read the
    # stream's end: wait for it (as test_gateway.py's stream test does), then check the amount.
    wait_for(lambda: charged() > before, 10, "usage charged")
    assert charged() - before == prompt_tokens + 6


def test_every_tool_choice_is_accepted_and_a_called_tool_is_one_offered(client):
    """vLLM without a tool-call parser refuses tools with a 400; with the flags modelfleet
    renders, every tool_choice is served. (Whether a random model's arguments parse is up to
    vLLM's Hermes grammar, which allows any whitespace: see docs/engines.md.)"""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                       "required": ["city"]}}}]
    for choice in ("auto", "required", "none", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=tools, tool_choice=choice, max_tokens=40)
        for call in r.choices[0].message.tool_calls or []:
            assert call.function.name == "get_weather"


def test_json_schema_output_is_valid_json_of_the_schema(client):
    # A finite language: the grammar, not the random model, decides when the JSON ends.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "color": {"type": "string", "enum": ["red", "green", "blue"]}},
              "required": ["ok", "color"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "A person, as JSON"}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    assert isinstance(data["ok"], bool) and data["color"] in ("red", "green", "blue") and set(data) == {"ok", "color"}


def test_stored_responses_continue_on_a_vllm_replica_which_stays_stateless(client):
    """The gateway keeps `store`d responses (docs/api.md), so a conversation continues through
    vLLM replicas exactly as through modelfleet's: the second turn names the first, and both can
    be read back and deleted through the gateway."""
    first = client.responses.create(model=CHAT, input="Say hello", max_output_tokens=8)
    assert first.status in ("completed", "incomplete") and first.store is not False
    second = client.responses.create(model=CHAT, input="Again", max_output_tokens=8,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn was sent again
    assert client.responses.retrieve(second.id).id == second.id
    client.responses.delete(first.id)
    with pytest.raises(Exception) as gone:
        client.responses.retrieve(first.id)
    assert getattr(gone.value, "status_code", None) == 404


def test_vllms_environment_carries_bytecode():
    """`make vllm` compiles the environment's bytecode. With PYTHONDONTWRITEBYTECODE set (as in
    CI) Python caches none itself, and then vLLM's API server, engine core and worker each
    compile vLLM and torch from source at every start (14 s an import here, 8 s with it)."""
    require_vllm()
    modules = ("vllm/entrypoints/openai/api_server.py", "vllm/v1/engine/core.py", "torch/_dynamo/convert_frame.py",
               "transformers/modeling_utils.py")
    out = subprocess.run([find_vllm_python(), "-P", *check_args(modules)], capture_output=True, text=True, cwd="/",
                         timeout=60, check=True).stdout
    assert compiled(out) == dict.fromkeys(modules, True), out


def test_a_kv_size_in_vllms_arguments_holds_on_cpu(vllm_direct):
    """vllm_direct runs as the operator renders a replica whose args size its KV cache
    (--kv-cache-memory-bytes): vLLM reports the size it took in its cache_config_info gauge, which
    shows 1 GiB and up had VLLM_CPU_KVCACHE_SPACE been set beside the flag (it overrides it on CPU)."""
    lines = httpx.get(vllm_direct.url + "/metrics", timeout=10).text.splitlines()
    info = [line for line in lines if line.startswith("vllm:cache_config_info{")]
    assert len(info) == 1 and f'kv_cache_memory_bytes="{VLLM_DEMO_KV_BYTES}"' in info[0], info
