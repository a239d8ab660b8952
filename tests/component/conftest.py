import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelfleet.demo import ensure_demo_model


@pytest.fixture(scope="session")
def demo_path():
    return ensure_demo_model()


@pytest.fixture(scope="session")
def tiny(demo_path):
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(demo_path)
    model = AutoModelForCausalLM.from_pretrained(demo_path, attn_implementation="sdpa").eval()
    return model, tok
