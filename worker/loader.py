"""Model sources -> a local directory -> a loaded model with what the server needs to know of it.

SOURCE is a local directory (`/abs/path` or `file:///abs/path`), `hf://[org/]name[@revision]`
(downloaded with huggingface_hub when the hub is reachable), or `pvc://claim/sub/path`, which
inside a cluster the operator mounts at `/mnt/models/<claim>`; `modelfleet.sources` parses them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelfleet.sources import ModelSource, ModelSourceError, parse_model_source

log = logging.getLogger(__name__)

PVC_MOUNT_ROOT = os.environ.get("MODELFLEET_PVC_ROOT", "/mnt/models")
Task = Literal["generate", "embed", "score"]


def local_model_dir(source: str) -> Path:
    """Turns SOURCE into a local directory that exists, downloading `hf://` sources.

    A plain path is the user's own (relative ones included); URL sources are checked by the
    parser (modelfleet.sources) so that they stay where they point: file:// absolute, pvc://
    inside its claim's mount under PVC_MOUNT_ROOT."""
    parsed = parse_model_source(source)
    if parsed.scheme == "hf":
        return download_hf(parsed)
    path = Path(parsed.claim_path(PVC_MOUNT_ROOT) if parsed.scheme == "pvc" else parsed.path)
    if not path.is_absolute():
        path = path.resolve()
    if not path.is_dir():
        raise ModelSourceError(f"model directory {path} does not exist")
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise ModelSourceError(f"{path} has no config.json: not a transformers or sentence-transformers model")
    return path



def download_hf(source: ModelSource, local_dir: Path | None = None) -> Path:
    """The one download of an hf:// source, for the worker (into the hub's cache, HF_HOME) and
    for the weight cache's fill (`modelfleet fetch`, into `local_dir`); returns the directory.

    The repo id as written, org-less ones too (`hf://gpt2`): the hub resolves them, and the
    parser has already refused anything that is not a repo id. Either way the hub's many errors
    become one ModelSourceError line naming the hub's class (RepositoryNotFoundError,
    GatedRepoError, ...), which the worker's start-up and the fill's status show."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=source.repo, revision=source.revision, local_dir=local_dir))
    except Exception as exc:  # the hub's errors are many; the user needs one line
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ModelSourceError(
            f"could not download {source.repo} from the Hugging Face hub: {type(exc).__name__}: {text}"
        ) from exc


@dataclass
class ModelInfo:
    """What the worker learns from a model directory before serving it."""

    path: Path
    task: Task
    max_model_len: int
    has_chat_template: bool
    architecture: str
    sentence_transformers: bool
    eos_token_ids: list[int] = field(default_factory=list)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    embedding_dim: int | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def detect(path: Path, max_model_len: int | None = None) -> ModelInfo:
    """Task, context length, EOS ids and chat template, from the files alone."""
    config = _read_json(path / "config.json")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "unknown")
    is_st = (path / "modules.json").exists()
    generative = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    task: Task = "score" if is_cross_encoder(config) else "embed" if is_st or not generative else "generate"
    context = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    if is_st:
        st = _read_json(path / "sentence_bert_config.json")
        context = min(context, st.get("max_seq_length") or context)
    if max_model_len:
        if max_model_len > context:
            log.warning("--max-model-len %d exceeds the model's %d positions", max_model_len, context)
        context = max_model_len
    gen = _read_json(path / "generation_config.json")
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    tok_config = _read_json(path / "tokenizer_config.json")
    has_template = bool(tok_config.get("chat_template")) or (path / "chat_template.jinja").exists()
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in gen}
    return ModelInfo(
        path=path,
        task=task,
        max_model_len=int(context),
        has_chat_template=has_template,
        architecture=arch,
        sentence_transformers=is_st,
        eos_token_ids=eos_ids,
        generation_defaults=defaults,
        embedding_dim=config.get("hidden_size"),
    )


def is_cross_encoder(config: dict[str, Any]) -> bool:
    """A sequence classifier with one label: what sentence-transformers loads as a CrossEncoder
    and vLLM scores on its pooling runner. transformers writes `id2label` (not `num_labels`)
    and means two labels when it is absent; sentence-transformers 5+ also writes a modules.json
    for it, so this is decided before that file is."""
    archs = config.get("architectures") or []
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
    return any(a.endswith("ForSequenceClassification") for a in archs) and labels == 1


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("--device cuda was asked for, but no CUDA device is visible")
    return device


def pick_dtype(dtype: str, device: str):
    """`auto`: bfloat16 or float16 on a GPU; on a CPU, bfloat16 where it has native bfloat16
    instructions (AVX512-BF16 or AMX, as vLLM's CPU build wants), float32 elsewhere, where
    bfloat16 is emulated and slower. Measured on the 56M bench Llama, one thread, AVX512-BF16: a
    1-row decode step 19 ms in bfloat16 against 22 in float32, a 32-row step 56 against 72."""
    import torch

    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_causal_lm(info: ModelInfo, device: str, dtype, prepack_weights: bool = True):
    """The model and its tokenizer; with `prepack_weights`, its linear layers on oneDNN-packed
    weights where the CPU allows (fastlinear.py) and its RMSNorms fused (fastops.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.path)
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    if prepack_weights:
        from .fastlinear import pack_linears
        from .fastops import fuse_small_ops

        fuse_small_ops(model)
        pack_linears(model)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in info.eos_token_ids:
        info.eos_token_ids.append(tokenizer.eos_token_id)
    info.has_chat_template = info.has_chat_template or bool(getattr(tokenizer, "chat_template", None))
    return model, tokenizer


def load_cross_encoder(info: ModelInfo, device: str):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(info.path), device=device, local_files_only=True)
    model.eval()
    info.max_model_len = min(info.max_model_len, model.max_seq_length or info.max_model_len)
    return model


def load_sentence_transformer(info: ModelInfo, device: str, prepack_weights: bool = True):
    """The model; with `prepack_weights`, its linear layers on oneDNN-packed weights where the CPU
    allows (fastlinear.py), as for a causal LM: they are 80% of a MiniLM forward even for one short
    sentence, and packed ones took 0.75x its thread CPU time for one sentence, 0.89x for batches of
    16 and 32, as vLLM's pooling runner packs them (`create_onednn_mm`)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(info.path), device=device, local_files_only=True)
    model.eval()
    if prepack_weights:
        from .fastlinear import pack_linears

        pack_linears(model)
    info.embedding_dim = model.get_sentence_embedding_dimension()
    return model
