"""Pure translation of validated OpenAI requests into engine requests, with the checks that need
the model: context length, vocabulary and batch capacity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelfleet.protocol import OpenAIError, SamplingFields

from .sampling import SamplingParams
from .sequence import GenerationRequest


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_num_seqs: int


def sampling_params(req: SamplingFields, defaults: dict[str, Any], limits: Limits, *, want_logprobs: bool,
                    top_logprobs: int) -> SamplingParams:
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
    )


def output_budget(prompt_len: int, requested: int | None, limits: Limits, param: str) -> int:
    """max_tokens, checked against the context as OpenAI words it."""
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
            param="max_tokens", code="context_length_exceeded")
    return requested


def generation_request(req: SamplingFields, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                       limits: Limits, *, n: int, prompt_logprobs: int | None = None,
                       request_id: str = "") -> GenerationRequest:
    if n > limits.max_num_seqs:
        raise OpenAIError(f"n={n} is more than this server runs at once ({limits.max_num_seqs}).", param="n")
    for token in req.stop_token_ids or []:
        if not 0 <= token < limits.vocab_size:
            raise OpenAIError(f"stop_token_ids holds {token}, not a token id of this model.",
                              param="stop_token_ids")
    for token in prompt_ids:
        if not 0 <= token < limits.vocab_size:
            raise OpenAIError(f"Token id {token} is out of range for this model (0..{limits.vocab_size - 1}).",
                              param="prompt", code="invalid_value")
    return GenerationRequest(
        prompt_ids=prompt_ids,
        params=params,
        max_tokens=max_tokens,
        n=n,
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=bool(req.ignore_eos),
        min_tokens=int(req.min_tokens or 0),
        prompt_logprobs=prompt_logprobs,
        request_id=request_id,
    )
