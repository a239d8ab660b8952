"""The fused decode step (worker/fastdecode.py): on bfloat16 Llama, Mistral and Qwen2 models, as
the worker loads them (packed linears, fused RMSNorms), the engine's decode steps through it give
bit for bit the tokens and logprobs of the same engine running the model's own forward, with rows
joining and leaving, seeded sampling with penalties included; models it does not compute exactly
run their own forward; and once a LoRA adapter is loaded, steps with adapter rows go through peft
while base-only steps stay fused, with the logprobs they had before."""

import asyncio
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from modelfleet.demo import make_demo_adapter
from modelfleet.worker.engine import EngineConfig, GenerationEngine
from modelfleet.worker.fastdecode import fused_decode
from modelfleet.worker.fastlinear import pack_linears
from modelfleet.worker.fastops import fuse_small_ops
from modelfleet.worker.sampling import SamplingParams
from modelfleet.worker.sequence import GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_engine, beside this file
from demo_engine import run_staggered  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="no native bfloat16 on this CPU: the engine decodes through SDPA")

PROMPTS = ["Hello there", "def foo(x):\n    return", "A much longer prompt " * 12, "x", "import os\n" * 7]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def tok(demo_path):
    return AutoTokenizer.from_pretrained(demo_path)


def as_the_worker_loads(model):
    """bfloat16, RMSNorms fused and linears packed, as loader.load_causal_lm leaves a model."""
    model = model.to(torch.bfloat16).eval()
    fuse_small_ops(model)
    pack_linears(model)
    return model


def family(kind: str, vocab: int):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SHAPE, tie_word_embeddings=True))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(vocab_size=vocab, sliding_window=None, **SHAPE))
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **SHAPE))  # q/k/v with biases


def run_engine(engine: GenerationEngine, tok, requests: list[tuple[str, SamplingParams, int | None]], max_tokens: int):
    """Each request's tokens and logprobs, staggered so that rows join a running batch, and
    request i generating 3 x i tokens fewer, so that rows leave it at different steps."""
    return run_staggered(engine, [GenerationRequest(prompt_ids=tok(prompt)["input_ids"], params=params,
                                                    max_tokens=max_tokens - 3 * i, ignore_eos=True, seed=seed)
                                  for i, (prompt, params, seed) in enumerate(requests)])


def engine_on(model, tok, fused: bool) -> GenerationEngine:
    return GenerationEngine(model, tok, EngineConfig(max_model_len=1024, max_num_seqs=4, fused_decode=fused),
                            [tok.eos_token_id])


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "demo"])
def test_fused_decode_steps_give_the_models_own_tokens_and_logprobs_bit_for_bit(kind, demo_path, tok):
    if kind == "demo":
        model = AutoModelForCausalLM.from_pretrained(demo_path, attn_implementation="sdpa")
    else:
        model = family(kind, len(tok))
    model = as_the_worker_loads(model)
    greedy = SamplingParams(temperature=0, want_logprobs=True, top_logprobs=2)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, frequency_penalty=0.4, presence_penalty=0.3,
                            repetition_penalty=1.1, want_logprobs=True)
    requests = [(p, greedy if i % 2 == 0 else seeded, None if i % 2 == 0 else 100 + i) for i, p in enumerate(PROMPTS)]
    fused = engine_on(model, tok, fused=True)
    assert fused.fused_decode is not None
    calls = 0
    inner = fused.fused_decode

    def counted(*args):
        nonlocal calls
        calls += 1
        return inner(*args)

    fused.fused_decode = counted
    got = run_engine(fused, tok, requests, 32)
    assert calls > 20  # the decode steps took it
    plain = engine_on(model, tok, fused=False)
    assert plain.fused_decode is None
    want = run_engine(plain, tok, requests, 32)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [lp for _, lp in got] == [lp for _, lp in want]  # exactly: the same logits, bit for bit
    assert all(len(t) == 32 - 3 * i for i, (t, _) in enumerate(got))


def wide_engine(model, tok, fused: bool) -> GenerationEngine:
    """Sixteen rows: the batches the attention variants below need."""
    return GenerationEngine(model, tok, EngineConfig(max_model_len=1024, max_num_seqs=16, fused_decode=fused),
                            [tok.eos_token_id])


def assert_same_outputs(got, want, tolerance: float) -> None:
    """The same tokens for every request, and their logprobs within `tolerance` (rounding)."""
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, got_lp), (_, want_lp) in zip(got, want, strict=True):
        assert got_lp == pytest.approx(want_lp, abs=tolerance)


def test_one_long_row_among_short_ones_attends_by_groups_and_keeps_every_output(tok):
    """A 600-token conversation among fifteen short ones: the fused step's attention reads the long
    row whole and the short ones over their own columns (SlotPool.decode_groups), and every row
    gets the tokens, and within rounding the logprobs, of the model's own forward over whole rows."""
    model = as_the_worker_loads(family("llama", len(tok)))
    long_prompt = "The harbour log, entry by entry: ships in, ships out, tides and pilots. " * 20
    prompts = [long_prompt, *(f"Ship {i} asks for a berth" for i in range(15))]
    assert 500 < len(tok(long_prompt)["input_ids"]) < 1000
    greedy = SamplingParams(temperature=0, want_logprobs=True)

    def run(fused: bool):
        engine = wide_engine(model, tok, fused)
        grouped = []
        decode_groups = engine.pool.decode_groups
        engine.pool.decode_groups = lambda: grouped.append(decode_groups()) or grouped[-1]
        requests = [GenerationRequest(prompt_ids=tok(p)["input_ids"], params=greedy, max_tokens=24, ignore_eos=True)
                    for p in prompts]
        return run_staggered(engine, requests, stagger=0), grouped

    (got, grouped), (want, _) = run(fused=True), run(fused=False)
    assert sum(g is not None for g in grouped) > 10  # the steps with all sixteen rows read them by groups
    assert_same_outputs(got, want, 1e-3)


QUESTIONS = ["When is high tide?", "def berth(ship):\n    return ship.length > 40", "Which pilot boards the ferry?",
             "x = [i * i for i in range(10)]", "Customs forms, please.", "Lorem ipsum dolor sit amet, consectetur",
             "import os\nprint(os.getcwd())", "Why?"]


def test_rows_sharing_a_cached_system_prompt_read_one_copy_of_it_and_keep_every_output(tok):
    """Eight requests on the same cached 200-token system prompt: the fused step's attention reads
    one copy of it for all rows (cascade attention, kvcache.shared_prefix_attention), only where every row
    holds the same KV, and every row gets the tokens, and within rounding the logprobs, of the
    model's own forward over whole rows (the tiny model hardly depends on what attention reads:
    test_decode_attention.py checks the attention itself)."""
    model = as_the_worker_loads(family("llama", len(tok)))
    system = "You are the harbour master's assistant. Answer in one short sentence. " * 8
    assert 150 < len(tok(system)["input_ids"]) < 400
    greedy = SamplingParams(temperature=0, want_logprobs=True)

    def run(fused: bool):
        engine = wide_engine(model, tok, fused)
        shared = []
        spy = engine._shared_prefix

        def checked():  # the rows really hold the same KV where the step reads one copy for all
            prefix = spy()
            pool = engine.pool
            for layer in range(pool.num_layers) if prefix else ():
                for store in (pool.keys[layer], pool.values[layer]):
                    copy = store[prefix.row, :, prefix.start : prefix.start + prefix.length]
                    assert all(torch.equal(store[r, :, s : s + prefix.length], copy) for r, s in enumerate(pool.starts))
            shared.append(prefix)
            return prefix

        engine._shared_prefix = checked
        warm = GenerationRequest(prompt_ids=tok(system)["input_ids"], params=greedy, max_tokens=1)
        requests = [GenerationRequest(prompt_ids=tok(system + question)["input_ids"], params=greedy,
                                      max_tokens=20 + i, ignore_eos=True) for i, question in enumerate(QUESTIONS)]
        # the system prompt cached first, then the eight at once, 0.5 s later
        return run_staggered(engine, [warm, *requests], delays=[0] + [0.5] * len(requests))[1:], shared

    (got, shared), (want, _) = run(fused=True), run(fused=False)
    assert sum(s is not None for s in shared) > 10  # the steps with four rows or more read one copy
    assert all(s is None or s.length >= 144 for s in shared)
    assert_same_outputs(got, want, 2e-2)


def test_a_prefill_of_questions_on_a_cached_system_prompt_reads_one_copy_of_it(tok, monkeypatch):
    """Eight questions arriving together on the same cached system prompt are prefilled as one
    batch whose attention reads one copy of the prompt for all rows (engine._prefill_shared_prefix)
    and each row's own tokens after it. At every layer the result is, within rounding, SDPA's
    over the whole rows under transformers' own mask of that prefill; and every request gets the
    tokens, and within rounding the logprobs, of the same prefill through SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from modelfleet.worker.kvcache import SLOT_ATTENTION, slot_attention

    model = family("llama", len(tok))
    for layer in model.model.layers:  # peaked attention (random weights attend almost evenly), so what it reads shows
        layer.self_attn.q_proj.weight.data.mul_(6)
    model = as_the_worker_loads(model)
    system = "You are the harbour master's assistant. Answer in one short sentence. " * 8
    greedy = SamplingParams(temperature=0, want_logprobs=True)
    compared = []

    def checked(module, query, key, value, attention_mask, **kwargs):
        out, weights = slot_attention(module, query, key, value, attention_mask, **kwargs)
        if kwargs.get("shared_prefix") is not None:
            kwargs.pop("shared_prefix")
            want, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            compared.append((out.float() - want.float()).abs().max().item() / want.float().abs().max().item())
        return out, weights

    monkeypatch.setitem(AttentionInterface._global_mapping, SLOT_ATTENTION, checked)

    def run(cascade: bool):
        engine = wide_engine(model, tok, fused=True)
        layouts = []
        planned = engine._prefill_shared_prefix

        def spy(batch, lengths, computed):
            layout = planned(batch, lengths, computed) if cascade else None
            layouts.append((len(batch), layout))
            return layout

        engine._prefill_shared_prefix = spy
        warm = GenerationRequest(prompt_ids=tok(system)["input_ids"], params=greedy, max_tokens=1)
        requests = [GenerationRequest(prompt_ids=tok(system + question)["input_ids"], params=greedy,
                                      max_tokens=4, ignore_eos=True) for question in QUESTIONS]
        return run_staggered(engine, [warm, *requests], delays=[0] + [0.5] * len(requests))[1:], layouts

    (got, layouts), (want, _) = run(cascade=True), run(cascade=False)
    # one prefill of the eight, on the 144 or more prompt tokens they all copied
    assert [(rows, layout.length >= 144) for rows, layout in layouts if layout] == [(8, True)]
    assert len(compared) == 2 and max(compared) < 0.02, compared  # two layers, errors relative to the largest output
    assert_same_outputs(got, want, 2e-2)


def test_models_it_does_not_compute_exactly_run_their_own_forward(tok):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4)).to(torch.bfloat16)
    assert fused_decode(gpt2, None) is None
    hooked = as_the_worker_loads(family("llama", len(tok)))
    hooked.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert fused_decode(hooked, None) is None
    # float32 decodes through SDPA, where the fused step's matmul attention would not be exact
    assert engine_on(family("llama", len(tok)).eval(), tok, fused=True).fused_decode is None


def test_decode_steps_with_adapter_rows_go_through_peft_and_base_rows_stay_fused(demo_path, tok, tmp_path):
    from modelfleet.worker.app import WorkerSettings, load_service

    adapter = make_demo_adapter(demo_path, tmp_path / "ada", rank=8, seed=3)
    service, _ = load_service(WorkerSettings(source=str(demo_path), served_names=["tiny-chat"], max_num_seqs=4,
                                             dtype="bfloat16"))
    engine = service.engine
    assert engine.fused_decode is not None
    fused, calls = engine.fused_decode, []
    engine.fused_decode = lambda *args: calls.append(1) or fused(*args)
    ids = tok(PROMPTS[1])["input_ids"]

    async def run(adapter_key=None):
        req = GenerationRequest(prompt_ids=ids, params=SamplingParams(temperature=0, want_logprobs=True),
                                max_tokens=12, ignore_eos=True, adapter=adapter_key)
        deltas = [d for e in [e async for e in engine.submit(req)] for d in e.deltas]
        return [t for d in deltas for t in d.token_ids], [lp.logprob for d in deltas for lp in d.logprobs]

    engine.start()
    try:
        before = asyncio.run(run())
        assert len(calls) == 11  # the first token comes from the prefill
        asyncio.run(service.lora.load("ada", str(adapter)))
        with_adapter = asyncio.run(run(service.lora.by_name["ada"].key))
        assert with_adapter != before and len(calls) == 11  # adapter rows: peft's layers
        assert asyncio.run(run()) == before  # base rows: the fused step on the base layers, unchanged
        assert len(calls) == 22
    finally:
        engine.stop()
