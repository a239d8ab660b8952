"""Pure translation of validated OpenAI requests into engine requests, with the checks that need
the model: context length, vocabulary and batch capacity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelfleet.protocol import OpenAIError, SamplingFields

from .sampling import SamplingParams
from .sequence import GenerationRequest

MAX_PROMPT_LOGPROBS = 20  # as OpenAI's top_logprobs; vLLM also takes -1, the whole vocabulary


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_num_seqs: int


def check_token_ids(ids: list[int], limits: Limits, param: str) -> None:
    """Every id names a token of this model, or a 400 naming `param`."""
    for token in ids:
        if not 0 <= token < limits.vocab_size:
            raise OpenAIError(f"Token id {token} is out of range for this model (0..{limits.vocab_size - 1}).",
                              param=param, code="invalid_value")


def sampling_params(req: SamplingFields, defaults: dict[str, Any], limits: Limits, *, want_logprobs: bool,
                    top_logprobs: int, tokenizer: Any = None) -> SamplingParams:
    """Request values win; the model's generation_config fills what the request left out."""

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(req, name, None)
        return value if value is not None else defaults.get(name, fallback)

    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < limits.vocab_size:
            raise OpenAIError(f"Invalid key in 'logit_bias': {key} is not a token id of this model "
                              f"(0..{limits.vocab_size - 1}).", param="logit_bias", code="invalid_value")
        bias[token] = float(value)
    allowed = list(dict.fromkeys(req.allowed_token_ids or []))
    check_token_ids(allowed, limits, "allowed_token_ids")
    top_k = pick("top_k", -1)
    return SamplingParams(
        temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=int(top_k) if top_k is not None else -1,
        min_p=float(pick("min_p", 0.0)),
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        logit_bias=bias,
        want_logprobs=want_logprobs,
        top_logprobs=top_logprobs,
        allowed_token_ids=tuple(allowed),
        bad_words=bad_words_ids(req.bad_words or [], tokenizer, limits) if req.bad_words else (),
    )


def bad_words_ids(words: list[str], tokenizer: Any, limits: Limits) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenisation of bad_words: each word as written (leading space stripped) and, where
    the tokenizer makes a different first token of it, with one leading space (a word in the
    middle of text), so that both spellings are blocked."""
    out: list[tuple[int, ...]] = []
    for i, word in enumerate(words):
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not plain:
            raise OpenAIError(f"bad_words[{i}] is empty.", param="bad_words", code="invalid_value")
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        out.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    for ids in out:
        check_token_ids(list(ids), limits, "bad_words")
    return tuple(out)


def truncate_prompt(prompt_ids: list[int], req: SamplingFields, limits: Limits) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last N tokens (-1: the context length), or the
    first N with truncation_side "right"."""
    n = req.truncate_prompt_tokens
    if n is None:
        return prompt_ids
    if n > limits.max_model_len:
        raise OpenAIError(f"truncate_prompt_tokens ({n}) is more than this model's maximum context length "
                          f"({limits.max_model_len}).", param="truncate_prompt_tokens", code="invalid_value")
    n = limits.max_model_len if n < 0 else n
    if len(prompt_ids) <= n:
        return prompt_ids
    return prompt_ids[:n] if req.truncation_side == "right" else prompt_ids[len(prompt_ids) - n:]


def output_budget(prompt_len: int, requested: int | None, limits: Limits, param: str,
                  limit_param: str = "max_tokens") -> int:
    """max_tokens, checked against the context as OpenAI words it; `param` names the prompt and
    `limit_param` the parameter that set the limit."""
    if prompt_len == 0:
        raise OpenAIError("The prompt is empty.", param=param, code="invalid_value")
    if prompt_len >= limits.max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, your prompt "
            f"has {prompt_len} tokens. Please reduce the length of the prompt.",
            param=param, code="context_length_exceeded")
    room = limits.max_model_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise OpenAIError(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param=limit_param, code="context_length_exceeded")
    return requested


def generation_request(req: SamplingFields, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                       limits: Limits, *, n: int, n_param: str = "n", prompt_logprobs: int | None = None,
                       request_id: str = "") -> GenerationRequest:
    """`n` is the number of sequences the engine runs (completions' best_of), `n_param` the
    parameter that asked for them."""
    if n > limits.max_num_seqs:
        raise OpenAIError(f"{n_param}={n} is more than this server runs at once ({limits.max_num_seqs}).",
                          param=n_param, code="invalid_value")
    if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= MAX_PROMPT_LOGPROBS:
        raise OpenAIError(f"This engine returns 0 to {MAX_PROMPT_LOGPROBS} `prompt_logprobs` per position; "
                          f"{req.prompt_logprobs} is not supported.", param="prompt_logprobs", code="invalid_value")
    if (req.min_tokens or 0) > max_tokens:
        raise OpenAIError(f"min_tokens ({req.min_tokens}) is more than the output limit ({max_tokens}).",
                          param="min_tokens", code="invalid_value")
    check_token_ids(list(req.stop_token_ids or []), limits, "stop_token_ids")
    check_token_ids(prompt_ids, limits, "prompt")
    return GenerationRequest(
        prompt_ids=prompt_ids,
        params=params,
        max_tokens=max_tokens,
        n=n,
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=list(dict.fromkeys(req.stop_token_ids or [])),
        ignore_eos=bool(req.ignore_eos),
        min_tokens=int(req.min_tokens or 0),
        prompt_logprobs=prompt_logprobs,
        request_id=request_id,
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False,
    )
