"""The `openai` SDK, unchanged, against `modelfleet serve`."""

import base64

import numpy as np
import pytest
from openai import BadRequestError, NotFoundError

pytestmark = pytest.mark.integration
CHAT, EMBED = "tiny-chat", "all-MiniLM-L6-v2"
MSG = [{"role": "user", "content": "Hello! What is your name?"}]


def test_models_list_and_retrieve(openai_client):
    ids = {m.id for m in openai_client.models.list()}
    assert {CHAT, EMBED} <= ids
    card = openai_client.models.retrieve(CHAT)
    assert card.id == CHAT and isinstance(card.created, int) and card.owned_by
    assert card.model_extra["max_model_len"] == 2048
    assert card.model_extra["capabilities"]["chat"] is True
    assert openai_client.models.retrieve(EMBED).model_extra["capabilities"]["chat"] is False
    with pytest.raises(NotFoundError):
        openai_client.models.retrieve("no-such-model")


def test_chat_completion_has_usage_and_respects_max_tokens(openai_client):
    r = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=7, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.system_fingerprint.startswith("fp_")


def test_max_completion_tokens_and_seed_reproduce(openai_client):
    a = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_completion_tokens=12, seed=7,
                                              temperature=1.0)
    b = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_completion_tokens=12, seed=7,
                                              temperature=1.0)
    c = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_completion_tokens=12, seed=8,
                                              temperature=1.0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content
    assert a.usage.completion_tokens == 12


def test_stream_with_usage_and_n_choices(openai_client):
    # Seeded: unseeded, the random model ended a choice early about one run in 400.
    stream = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=5, n=2, stream=True,
                                                   stream_options={"include_usage": True}, temperature=1.0, seed=5)
    chunks = list(stream)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert all(texts.values())


def test_streamed_and_plain_greedy_text_agree(openai_client):
    plain = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=20, temperature=0)
    stream = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=20, temperature=0,
                                                   stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == plain.choices[0].message.content


def test_stop_strings_are_not_returned(openai_client):
    full = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    stop = text[8:11]
    r = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]


def test_logprobs_and_top_logprobs(openai_client):
    r = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=4, logprobs=True,
                                              top_logprobs=3, temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_logit_bias_forces_a_token(openai_client):
    r = openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=3, logit_bias={"300": 100},
                                              logprobs=True)
    tok = r.choices[0].logprobs.content[0].token
    assert all(e.token == tok for e in r.choices[0].logprobs.content)


def test_completions_with_echo_and_logprobs(openai_client):
    r = openai_client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=5, echo=True,
                                         logprobs=2, temperature=0)
    choice = r.choices[0]
    assert choice.text.startswith("Once upon a time")
    assert choice.logprobs.token_logprobs[0] is None  # the first prompt token has no context, as in OpenAI
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset[0] == 0


def test_completions_accept_lists_and_token_arrays(openai_client):
    r = openai_client.completions.create(model=CHAT, prompt=["a", "b c"], max_tokens=3, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    t = openai_client.completions.create(model=CHAT, prompt=[10, 20, 30], max_tokens=2)
    assert t.usage.prompt_tokens == 3


def test_suffix_is_rejected_clearly(openai_client):
    with pytest.raises(BadRequestError) as info:
        openai_client.completions.create(model=CHAT, prompt="a", suffix="b", max_tokens=2)
    assert info.value.body["param"] == "suffix"


def test_embeddings_base64_by_default_and_match_sentence_transformers(openai_client, minilm):
    from sentence_transformers import SentenceTransformer

    texts = ["The cat sat on the mat.", "Quantum chromodynamics"]
    r = openai_client.embeddings.create(model=EMBED, input=texts)  # the SDK asks for base64
    ref = SentenceTransformer(str(minilm), device="cpu").encode(texts)
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (2, 384)
    assert np.abs(got - ref).max() < 1e-4
    assert r.usage.prompt_tokens > 0


def test_embeddings_float_dimensions_and_tokens(openai_client):
    r = openai_client.embeddings.create(model=EMBED, input="hello", encoding_format="float", dimensions=64)
    vec = np.array(r.data[0].embedding)
    assert vec.shape == (64,) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    by_tokens = openai_client.embeddings.create(model=EMBED, input=[[101, 7592, 102]], encoding_format="float")
    by_text = openai_client.embeddings.create(model=EMBED, input="hello", encoding_format="float")
    assert np.allclose(by_tokens.data[0].embedding, by_text.data[0].embedding, atol=1e-5)


def test_causal_lm_embeddings_are_pooled_and_normalised(openai_client):
    r = openai_client.embeddings.create(model=CHAT, input=["a b c", "x"], encoding_format="float")
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (2, 64)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_responses_api_plain_and_streamed(openai_client):
    r = openai_client.responses.create(model=CHAT, input="Say hi", max_output_tokens=6, temperature=0)
    assert r.output_text and r.usage.output_tokens == 6 and r.status == "incomplete"
    events = list(openai_client.responses.create(model=CHAT, input=[{"role": "user", "content": "Say hi"}],
                                                 max_output_tokens=6, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text


def test_errors_name_the_parameter(openai_client):
    with pytest.raises(BadRequestError) as info:
        openai_client.chat.completions.create(model=CHAT, messages=MSG, temperature=5)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(BadRequestError) as info:
        openai_client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=100000)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(BadRequestError) as info:
        openai_client.chat.completions.create(model=CHAT, messages=MSG, response_format={"type": "xml"})
    assert info.value.body["param"] == "response_format.type"
    with pytest.raises(NotFoundError) as info:
        openai_client.chat.completions.create(model="nope", messages=MSG)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(BadRequestError) as info:
        openai_client.chat.completions.create(model=EMBED, messages=MSG)
    assert info.value.body["param"] == "model"


def test_fields_clients_always_send_are_accepted(openai_client):
    r = openai_client.chat.completions.create(
        model=CHAT, messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, *MSG],
        max_tokens=2, logit_bias={}, tool_choice="none", store=False, metadata={"a": "b"}, user="u1",
        parallel_tool_calls=False, seed=1, extra_body={"some_future_field": 1})  # seeded: never an early end
    assert r.choices[0].finish_reason == "length"


def test_base64_decodes_to_float32(openai_client):
    import httpx

    r = httpx.post(str(openai_client.base_url) + "embeddings",
                   json={"model": EMBED, "input": "x", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), dtype=np.float32)
    assert vec.shape == (384,)
