"""Prompts as token ids: chat messages through the model's chat template (with vLLM's template
options), and completion prompts given as text or token ids."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from modelfleet.protocol import ChatMessage, ChatTemplateFields, OpenAIError

# apply_chat_template's own arguments: as `chat_template_kwargs` they would change how the prompt
# is built rather than what the template sees, so they are refused there, except the three that
# vLLM lets chat_template_kwargs set with the same meaning as the request fields.
TRANSFORMERS_ARGUMENTS = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
TEMPLATE_OVERRIDES = frozenset({"add_generation_prompt", "continue_final_message", "documents"})


@dataclass(frozen=True)
class TemplateOptions:
    """How messages become a prompt."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, Any]] | None = None
    variables: dict[str, Any] | None = None  # chat_template_kwargs, for the template

    @classmethod
    def of(cls, req: ChatTemplateFields) -> TemplateOptions:
        """vLLM's rules: chat_template_kwargs may set the three overrides; a generation prompt
        unless the final message is continued; not both."""
        variables = dict(req.chat_template_kwargs or {})
        for key in variables:
            if key in TRANSFORMERS_ARGUMENTS - TEMPLATE_OVERRIDES:
                raise OpenAIError(f"`chat_template_kwargs` may not set `{key}`: it is an argument of transformers' "
                                  "apply_chat_template, not a template variable.", param="chat_template_kwargs",
                                  code="invalid_value")
        cont = bool(variables.pop("continue_final_message", req.continue_final_message))
        add = variables.pop("add_generation_prompt", req.add_generation_prompt)
        add = (not cont) if add is None else bool(add)
        if add and cont:
            raise OpenAIError("Cannot set both `continue_final_message` and `add_generation_prompt` to true.",
                              param="continue_final_message", code="invalid_value")
        return cls(add_generation_prompt=add, continue_final_message=cont,
                   add_special_tokens=bool(req.add_special_tokens), documents=variables.pop("documents", req.documents),
                   variables=variables)


def render_chat(tokenizer: Any, messages: list[ChatMessage], options: TemplateOptions,
                tools: list[dict[str, Any]] | None = None, param: str = "messages") -> list[int]:
    extra: dict[str, Any] = dict(options.variables or {})
    if tools:
        extra["tools"] = tools
    if options.documents:
        extra["documents"] = options.documents
    rendered = [_template_message(m) for m in messages]
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=options.add_generation_prompt,
                                             continue_final_message=options.continue_final_message, **extra)
    except TemplateError as exc:
        raise OpenAIError(f"The chat template rejected these messages: {exc}", param=param) from exc
    except ValueError as exc:  # continue_final_message with a final message the template hides
        raise OpenAIError(f"These messages cannot be rendered: {exc}", param=param) from exc
    return tokenizer(text, add_special_tokens=options.add_special_tokens)["input_ids"]


def completion_prompts(tokenizer: Any, prompt: Any, add_special_tokens: bool = True) -> list[list[int]]:
    """A completions `prompt` (text, texts, token ids or lists of them) as token-id prompts."""
    if isinstance(prompt, str):
        return [tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    out = []
    for p in prompt:
        out.append(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] if isinstance(p, str) else list(p))
    if any(len(p) == 0 for p in out):
        raise OpenAIError("Prompts must not be empty.", param="prompt")
    return out


def echo_prefix(messages: list[ChatMessage]) -> str:
    """vLLM's chat `echo`: the reply repeats the final message's content when that message is the
    assistant's (typically one being continued)."""
    last = messages[-1]
    return last.text() if last.role == "assistant" else ""


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: tool-call arguments as objects (templates such as
    Qwen2.5's apply `tojson` to them), tool results with their call id."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            fn = dict(call.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass  # rendered as the string it is
            calls.append({**call, "function": fn})
        out["tool_calls"] = calls
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out
