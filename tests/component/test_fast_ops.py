"""Fused small operators (worker/fastops.py): tiny Llama and Qwen2 models with their RMSNorms on
torch's fused kernel give the greedy tokens the unmodified model's `generate` gives and logits
within rounding, peft's LoRA still wraps them (module names are unchanged), the loader applies it
with the packing and `--no-prepack-weights` leaves the norms as loaded, and other models stay as
loaded."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from modelfleet.worker.fastops import fuse_small_ops
from modelfleet.worker.loader import detect, load_causal_lm

DTYPES = [torch.float32, torch.bfloat16]
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def tiny(kind: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SHAPE)).to(dtype).eval()
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE)).to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_norms_give_generates_tokens_and_logits(kind, dtype):
    plain, fused = tiny(kind, dtype), tiny(kind, dtype)
    assert fuse_small_ops(fused) == 2 * 2 + 1
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 7))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused(ids).logits, plain(ids).logits, **tol)
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert fused.generate(ids, **kw).tolist() == plain.generate(ids, **kw).tolist()


def test_lora_still_wraps_a_fused_model_and_changes_its_output():
    plain, fused = tiny("llama", torch.float32), tiny("llama", torch.float32)
    fuse_small_ops(fused)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], task_type="CAUSAL_LM")
    peft_plain, peft_fused = get_peft_model(plain, config), get_peft_model(fused, config)
    for model in (peft_plain, peft_fused):
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param))
    peft_fused.load_state_dict(peft_plain.state_dict())
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 5))
    torch.testing.assert_close(peft_fused(ids).logits, peft_plain(ids).logits, rtol=1e-5, atol=1e-5)
    with peft_fused.disable_adapter():
        assert not torch.allclose(peft_fused(ids).logits, peft_plain(ids).logits)


def test_other_architectures_stay_as_loaded():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert fuse_small_ops(model) == 0
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("prepack", [True, False])
def test_the_loader_fuses_only_with_prepacking(demo_path, prepack):
    model, _ = load_causal_lm(detect(demo_path), "cpu", torch.float32, prepack_weights=prepack)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(("forward" in vars(m)) == prepack for m in norms)
