"""What the gateway reads from a request body: the model, whether the answer streams, and the
start of the conversation (for prefix affinity). The body itself is forwarded untouched."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from modelfleet.protocol import OpenAIError, load_json


@dataclass(frozen=True)
class RoutingFields:
    model: str
    stream: bool = False
    usage_asked: bool = False  # stream_options.include_usage
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the parsed body

    def prefix(self, length: int) -> str:
        """The first `length` characters of the conversation or prompt (pool.Pool.prefix asks
        only for a model routed by prefix affinity, with its spec.routing.prefixLength)."""
        return prompt_prefix(self.data, length)


def routing_fields(body: bytes) -> RoutingFields:
    data = load_json(body)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model:
        raise OpenAIError("You must provide a model parameter.", param="model", code="missing_model")
    options = data.get("stream_options")
    usage_asked = isinstance(options, dict) and options.get("include_usage") is True
    return RoutingFields(model, data.get("stream") is True, usage_asked, data)


def prompt_prefix(data: dict, limit: int) -> str:
    messages = data.get("messages")
    if isinstance(messages, list):
        parts, size = [], 0
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                parts.append(f"{m.get('role')}:{content if isinstance(content, str) else json.dumps(content)}")
                size += len(parts[-1])
            if size >= limit:
                break
        return "\n".join(parts)[:limit]
    for field_name in ("prompt", "input"):
        value = data.get(field_name)
        if isinstance(value, str):
            return value[:limit]
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0][:limit]
    return ""

