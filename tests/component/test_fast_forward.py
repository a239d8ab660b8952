"""Prepacked linear layers (worker/fastlinear.py) on the demo model: the engine over a packed
model gives the tokens the plain model's `generate` gives, logprobs within rounding, peft's LoRA
still wraps the packed layers, the packed model holds its weights once (a tied LM head's on a
packed copy too, the embeddings still on the weight as loaded), and `--no-prepack-weights` leaves
the model as loaded."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from modelfleet.demo import make_demo_adapter
from modelfleet.worker.engine import EngineConfig, GenerationEngine
from modelfleet.worker.fastlinear import PackedLinear, pack_linears, packable
from modelfleet.worker.loader import detect, load_causal_lm
from modelfleet.worker.sampling import SamplingParams
from modelfleet.worker.sequence import GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_engine, beside this file
from demo_engine import run_staggered  # noqa: E402

PROMPTS = ["Hello there", "def foo(x):\n    return", "A much longer prompt " * 20, "x", "import os\n" * 7]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no native bfloat16 on this CPU"))]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def load(path, dtype=torch.float32, packed: bool = False):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    if packed:  # all of them, the LM head tied to the input embeddings on a packed copy
        assert pack_linears(model) == sum(1 for m in model.modules() if isinstance(m, nn.Linear)) > 0
    return model


@pytest.fixture(scope="module")
def tok(demo_path):
    return AutoTokenizer.from_pretrained(demo_path)


def run_engine(model, tok, prompts: list[str], max_tokens: int, logprobs: bool = False):
    """Each prompt's greedy tokens (and their logprobs), the requests staggered so that rows
    join a running batch, through the engine on `model`."""
    engine = GenerationEngine(model, tok, EngineConfig(max_model_len=2048, max_num_seqs=4), [tok.eos_token_id])
    return run_staggered(engine, [GenerationRequest(prompt_ids=tok(p)["input_ids"], max_tokens=max_tokens,
                                                    ignore_eos=True,
                                                    params=SamplingParams(temperature=0, want_logprobs=logprobs))
                                  for p in prompts])


def test_the_packed_layers_compute_what_the_plain_ones_do(demo_path):
    plain, packed = load(demo_path), load(demo_path, packed=True)
    assert type(packed.model.layers[0].mlp.down_proj) is PackedLinear
    assert type(packed.lm_head) is PackedLinear and packed.lm_head.dense  # a packed copy beside the weight
    assert packed.lm_head.weight is packed.model.embed_tokens.weight  # tied weights stay tied
    want = plain.state_dict()
    got = packed.state_dict()  # the weights unpacked again, under the same keys
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    for rows, cols in ((1, 1), (3, 1), (2, 7)):
        ids = torch.randint(0, plain.config.vocab_size, (rows, cols))
        torch.testing.assert_close(packed(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


def weight_bytes(model: nn.Module) -> int:
    """The bytes of `model`'s parameters, buffers and packed weights, each storage once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    packed = [m.packed for m in model.modules() if isinstance(m, PackedLinear)]
    return sum(storages.values()) + sum(t.numel() * t.element_size() for t in packed)  # opaque: no storage


def tiny_llama(dtype, tied: bool, vocab_size: int = 4096) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_packed_model_holds_its_weights_once_and_a_tied_head_twice(dtype, tied, caplog):
    model = tiny_llama(dtype, tied)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    want, plain = model(ids).logits, weight_bytes(model)
    head_bytes = model.lm_head.weight.nbytes
    with caplog.at_level("INFO", logger="modelfleet.worker.fastlinear"):
        assert pack_linears(model) == 7 * 8 + 1
    if tied:  # the embeddings keep the weight as loaded; the head multiplies by its packed copy
        assert weight_bytes(model) <= (plain + head_bytes) * 1.02
        assert f"+{head_bytes / 2**20:.0f} MB" in caplog.text  # the cost, said once at load
        assert model.model.embed_tokens.weight is model.lm_head.weight
        assert model.model.embed_tokens.weight.is_contiguous() and model.model.embed_tokens.weight.any()
    else:
        assert weight_bytes(model) <= plain * 1.02
    down_proj = model.model.layers[0].mlp.down_proj
    assert (down_proj.weight.shape, down_proj.weight.dtype, down_proj.weight.device) == ((512, 1376), dtype, ids.device)
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-3 if dtype == torch.float32 else 2e-2, atol=1e-3)


def test_a_tied_head_on_a_packed_copy_gives_generates_tokens_and_the_embeddings_read_the_weight():
    plain, packed = tiny_llama(torch.float32, tied=True), tiny_llama(torch.float32, tied=True)
    pack_linears(packed)
    assert type(packed.lm_head) is PackedLinear
    ids = torch.randint(0, plain.config.vocab_size, (2, 6))
    torch.testing.assert_close(packed.model.embed_tokens(ids), plain.model.embed_tokens(ids), rtol=0, atol=0)
    want = plain.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = packed.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got.tolist() == want.tolist()


def test_a_tied_heads_packed_copy_follows_its_weight_through_state_dict_tie_weights_and_deepcopy():
    """The shared weight stays the model's: written in place (`load_state_dict` of the embeddings;
    the dropped weights refuse, see `repack`) or replaced (`tie_weights`), the head multiplies by
    it; `state_dict` keeps its keys; a deep copy keeps the head tied."""
    model = tiny_llama(torch.float32, tied=True)
    keys = model.state_dict().keys()
    pack_linears(model)
    assert model.state_dict().keys() == keys
    hidden = torch.randn(2, model.config.hidden_size)
    new = torch.randn_like(model.lm_head.weight)
    model.load_state_dict({"model.embed_tokens.weight": new}, strict=False)
    torch.testing.assert_close(model.lm_head(hidden), hidden @ new.T, rtol=1e-4, atol=1e-4)

    model.set_input_embeddings(nn.Embedding.from_pretrained(torch.randn_like(model.lm_head.weight), freeze=True))
    model.tie_weights()  # replaces the head's weight
    torch.testing.assert_close(model.lm_head(hidden), hidden @ model.model.embed_tokens.weight.T,
                               rtol=1e-4, atol=1e-4)

    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    twin = copy.deepcopy(model)
    assert type(twin.lm_head) is nn.Linear and twin.lm_head.weight is twin.model.embed_tokens.weight
    torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_dropped_weight_is_changed_through_repack():
    layer = nn.Linear(64, 32)
    pack_linears(nn.Sequential(layer, nn.Linear(32, 8)))
    x, new = torch.randn(3, 64), torch.randn(32, 64)
    with pytest.raises(RuntimeError, match="dropped"):
        layer.repack()
    with pytest.raises(RuntimeError):  # writing into the stand-in: not silently lost
        layer.load_state_dict({"weight": new, "bias": layer.bias.detach()})
    layer.repack(new)
    torch.testing.assert_close(layer(x), x @ new.T + layer.bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.state_dict()["weight"], new, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_tokens_through_the_engine_equal_the_plain_models(demo_path, tok, dtype):
    """float32: the packed engine against the plain model's `generate`, token for token. bfloat16:
    against the engine on the plain model (in bfloat16 the engine's decode attention is matmuls,
    kvcache.decode_attention, where `generate` on this SDPA model runs SDPA's kernel)."""
    plain = load(demo_path, dtype)
    lengths = [12 + 5 * i for i in range(len(PROMPTS))]
    got = run_engine(load(demo_path, dtype, packed=True), tok, PROMPTS, max(lengths))
    if dtype == torch.float32:
        for prompt, n, (tokens, _) in zip(PROMPTS, lengths, got, strict=True):
            ids = torch.tensor([tok(prompt)["input_ids"]])
            out = plain.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert tokens[:n] == out[0, ids.shape[1]:].tolist()
    else:
        want = run_engine(plain, tok, PROMPTS, max(lengths))
        assert [t for t, _ in got] == [t for t, _ in want]


def test_logprobs_of_the_packed_engine_are_the_plain_models(demo_path, tok):
    plain = load(demo_path)
    [(tokens, lps)] = run_engine(load(demo_path, packed=True), tok, [PROMPTS[1]], 16, logprobs=True)
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"] + tokens])
    want = torch.log_softmax(plain(ids).logits[0, -len(tokens) - 1 : -1].float(), dim=-1)
    want = want.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(lps), want, rtol=0, atol=1e-4)


def test_peft_wraps_packed_layers_and_its_adapter_gives_the_same_tokens(demo_path, tmp_path):
    from peft import PeftModel

    adapter = str(make_demo_adapter(demo_path, tmp_path / "a", rank=8, seed=1))
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    outs = []
    for packed in (False, True):
        model = PeftModel.from_pretrained(load(demo_path, packed=packed), adapter).eval()
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert (type(q_proj.base_layer) is PackedLinear) == packed
        assert q_proj.lora_A["default"].weight.device.type == "cpu"  # placed by the stand-in weight
        outs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist())
    assert outs[0] == outs[1]


def test_an_adapter_that_saves_a_packed_layer_loads_and_answers_as_on_plain_layers(demo_path, tmp_path):
    """peft's modules_to_save copies the named layers (an untied LM head most often) and loads the
    adapter's own weights into the copies: a packed layer copies as a plain one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load(demo_path)
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"], init_lora_weights=False)
    trained = get_peft_model(base, config)
    torch.manual_seed(3)
    for name, param in trained.named_parameters():
        if "modules_to_save" in name:
            param.add_(torch.randn_like(param) * 0.05)  # an adapter whose saved layers differ from the base
    trained.save_pretrained(tmp_path / "saved")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    outs = []
    for packed in (False, True):
        model = PeftModel.from_pretrained(load(demo_path, packed=packed), str(tmp_path / "saved")).eval()
        o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
        assert type(o_proj.modules_to_save["default"]) is nn.Linear
        assert (type(o_proj.original_module) is PackedLinear) == packed
        outs.append(model(input_ids=ids).logits.float())
    base_logits = load(demo_path)(input_ids=ids).logits.float()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outs[0], base_logits, atol=1e-3)  # the saved layers count


def test_a_failing_pack_leaves_the_rest_as_loaded_and_the_model_answers_alike(demo_path, monkeypatch):
    """Packing is only an optimisation: where oneDNN's ops fail (another architecture, an odd
    shape), the layers packed so far stay packed, the rest stay as loaded, and nothing breaks."""
    from modelfleet.worker import fastlinear

    real, calls = fastlinear._pack, []

    def pack_once(module, check):
        calls.append(module)
        if len(calls) > 1:
            raise RuntimeError("oneDNN's packed product differs from F.linear's")
        real(module, check)

    monkeypatch.setattr(fastlinear, "_pack", pack_once)
    model, plain = load(demo_path), load(demo_path)
    assert pack_linears(model) == 1
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)].count(PackedLinear) == 1
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_the_loader_packs_unless_told_not_to(demo_path):
    packed, _ = load_causal_lm(detect(demo_path), "cpu", torch.float32)
    plain, _ = load_causal_lm(detect(demo_path), "cpu", torch.float32, prepack_weights=False)
    assert packable(plain) is None
    assert {type(m) for m in packed.model.modules() if isinstance(m, nn.Linear)} == {PackedLinear}
    assert {type(m) for m in plain.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    assert "float16" in packable(load(demo_path, torch.float16))  # oneDNN's half kernels need AVX512-FP16

