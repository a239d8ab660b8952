"""Tool calls in a model's own syntax: the grammar that makes them valid, and the parser that
turns generated text back into OpenAI `tool_calls`, incrementally for streams.

The default syntax is Hermes's (Qwen2.5/Qwen3, NousHermes, and the demo model's template):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A model with another convention gets another `ToolCallFormat`. Non-streamed responses run the
same parser over the whole text, so a stream always reassembles to the non-streamed message.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from modelfleet.protocol import OpenAIError

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict[str, Any]
    description: str | None = None

    def as_tool(self) -> dict[str, Any]:
        """The chat-completions shape that chat templates expect in `tools`."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


Mode = Literal["none", "auto", "required"]


@dataclass(frozen=True)
class ToolChoice:
    mode: Mode
    name: str | None = None  # a named function: exactly one call of it


def functions_from_tools(tools: list[dict[str, Any]]) -> list[Function]:
    """Validates chat's `tools` (Responses requests arrive here already nested as chat's)."""
    out: list[Function] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise OpenAIError(f"Tools of type '{kind}' are not supported; only 'function'.", param=f"tools[{i}].type")
        fn = tool.get("function")
        where = f"tools[{i}].function"
        if not isinstance(fn, dict):
            raise OpenAIError(f"Missing required parameter: '{where}'.", param=where)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise OpenAIError(f"Invalid '{where}.name': function names are 1-64 characters of a-z, A-Z, 0-9, "
                              "underscores, dots and dashes.", param=f"{where}.name", code="invalid_value")
        params = fn.get("parameters")
        if params is None:
            params = NO_PARAMETERS
        if not isinstance(params, dict):
            raise OpenAIError(f"'{where}.parameters' must be a JSON Schema object.", param=f"{where}.parameters")
        out.append(Function(name, params, fn.get("description")))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise OpenAIError("Function names in `tools` must be unique.", param="tools")
    return out


def resolve_choice(tool_choice: Any, functions: list[Function]) -> ToolChoice:
    """OpenAI's `tool_choice` against the tools given; `none` is fine without tools."""
    if tool_choice is None:
        return ToolChoice("auto" if functions else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise OpenAIError(f"Invalid value for 'tool_choice': '{tool_choice}'. Expected 'none', 'auto', "
                              "'required' or a named function.", param="tool_choice", code="invalid_value")
        if tool_choice != "none" and not functions:
            raise OpenAIError(f"tool_choice '{tool_choice}' needs `tools`.", param="tool_choice")
        return ToolChoice(tool_choice)  # type: ignore[arg-type]
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if "function" in tool_choice else tool_choice
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") == "function" and isinstance(name, str):
            if name not in {f.name for f in functions}:
                raise OpenAIError(f"tool_choice names function '{name}', which is not in `tools`.",
                                  param="tool_choice", code="invalid_value")
            return ToolChoice("required", name)
    raise OpenAIError("Invalid value for 'tool_choice'.", param="tool_choice", code="invalid_value")


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ParseEvent:
    """One thing the stream says: content text, a call's start (with its name), or arguments."""

    kind: Literal["content", "call", "arguments"]
    text: str = ""
    index: int = 0
    call: ToolCall | None = None


class ToolCallParser(Protocol):
    calls: list[ToolCall]
    content: str

    def feed(self, text: str) -> list[ParseEvent]: ...

    def finish(self) -> list[ParseEvent]: ...


class ToolCallFormat(Protocol):
    """A model family's tool-call syntax."""

    def grammar(self, functions: list[Function], choice: ToolChoice, parallel: bool,
                text_schema: dict[str, Any] | None) -> str: ...

    def parser(self) -> ToolCallParser: ...


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _compact(schema: dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}}, separators=(",", ":"),
                      ensure_ascii=False)


class HermesFormat:
    start = "<tool_call>"
    end = "</tool_call>"

    def grammar(self, functions: list[Function], choice: ToolChoice, parallel: bool,
                text_schema: dict[str, Any] | None = None) -> str:
        """A Lark grammar (llguidance dialect) for the calls `choice` allows.

        `required`/named: only calls. `auto`: free text that becomes a valid call once the
        model writes `<tool_call>` (a lazy lexeme), or, with a response_format schema, either
        that JSON or calls.
        """
        allowed = [f for f in functions if choice.name is None or f.name == choice.name]
        lines = ["%llguidance {}"]
        alternatives = []
        for i, f in enumerate(allowed):
            head = '{"name": ' + json.dumps(f.name) + ', "arguments": '
            lines.append(f"fn_{i}: {_lark_str(head)} %json {_compact(f.parameters)} {_lark_str('}')}")
            alternatives.append(f"fn_{i}")
        body = " | ".join(alternatives)
        lines.append(f"body: {body}")
        lines.append(f"call_rest: {_lark_str(chr(10))} body {_lark_str(chr(10) + self.end)}")
        more = f' ({_lark_str(chr(10) + self.start)} call_rest)*' if parallel and choice.name is None else ""
        if choice.mode == "required":
            lines.append(f"start: {_lark_str(self.start)} call_rest{more}")
        elif text_schema is not None:
            lines.append(f"start: answer | {_lark_str(self.start)} call_rest{more}")
            lines.append(f"answer: %json {_compact(text_schema)}")
        else:
            lines.append(f"start: TEXT | head call_rest{more}")
            lines.append(f"head[lazy]: TEXT {_lark_str(self.start)}")
            lines.append("TEXT: /(.|\\n)*/")
        return "\n".join(lines) + "\n"

    def parser(self) -> HermesParser:
        return HermesParser(self.start, self.end)


HEADER_RE = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass
class HermesParser:
    """Incremental: `feed` text deltas, get events; text is held back only while it could still
    be the start of a tag, so content streams as it comes."""

    start: str
    end: str
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    buffer: str = ""
    state: Literal["text", "header", "arguments", "after"] = "text"
    sent: int = 0  # characters of the current call's arguments already sent

    def feed(self, text: str) -> list[ParseEvent]:
        self.buffer += text
        events: list[ParseEvent] = []
        while True:
            before = (self.state, len(self.buffer))
            events += getattr(self, f"_{self.state}")()
            if (self.state, len(self.buffer)) == before:
                return events

    def finish(self) -> list[ParseEvent]:
        events: list[ParseEvent] = []
        if self.state == "text" or self.state == "header":
            raw = self.buffer if self.state == "text" else self.start + self.buffer
            events += self._emit_content(raw, final=True)
        self.buffer = ""
        return events

    # -- states -------------------------------------------------------------------------------

    def _text(self) -> list[ParseEvent]:
        at = self.buffer.find(self.start)
        if at >= 0:
            events = self._emit_content(self.buffer[:at], final=True)
            self.buffer = self.buffer[at + len(self.start):]
            self.state = "header"
            return events
        keep = _partial_suffix(self.buffer, self.start)
        events = self._emit_content(self.buffer[: len(self.buffer) - keep], final=False)
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return events

    def _header(self) -> list[ParseEvent]:
        match = HEADER_RE.match(self.buffer)
        if match and match.end() < len(self.buffer):  # the arguments' first character is here
            call = ToolCall(new_call_id(), json.loads(f'"{match.group(1)}"'))
            self.calls.append(call)
            self.buffer = self.buffer[match.end():]
            self.state, self.sent = "arguments", 0
            return [ParseEvent("call", index=len(self.calls) - 1, call=call)]
        at = self.buffer.find(self.end)
        if at < 0:
            return []
        # Not in the streamable order (unconstrained output): parse the whole call, if it is one.
        body, rest = self.buffer[:at], self.buffer[at + len(self.end):]
        try:
            obj = json.loads(body)
            call = ToolCall(new_call_id(), str(obj["name"]), json.dumps(obj.get("arguments", {}), ensure_ascii=False))
        except (ValueError, KeyError, TypeError):
            self.buffer = ""
            self.state = "text"
            return self._emit_content(self.start + body + self.end + rest, final=False)
        self.calls.append(call)
        self.buffer, self.state = rest, "after"
        index = len(self.calls) - 1
        return [ParseEvent("call", index=index, call=ToolCall(call.id, call.name)),
                ParseEvent("arguments", text=call.arguments, index=index)]

    def _arguments(self) -> list[ParseEvent]:
        at = self.buffer.find(self.end)
        if at >= 0:
            args = self.buffer[:at].rstrip()
            args = args[:-1].rstrip() if args.endswith("}") else args
            self.buffer = self.buffer[at + len(self.end):]
            self.state = "after"
            return self._send_arguments(args)
        held = _argument_tail(self.buffer, self.end)
        return self._send_arguments(self.buffer[: len(self.buffer) - held])

    def _after(self) -> list[ParseEvent]:
        stripped = self.buffer.lstrip()
        if stripped.startswith(self.start):
            self.buffer = stripped[len(self.start):]
            self.state = "header"
        elif stripped and not self.start.startswith(stripped):
            self.buffer = ""  # text after the calls: the grammar allows none; unconstrained, dropped
        return []

    # -- helpers ------------------------------------------------------------------------------

    def _send_arguments(self, args: str) -> list[ParseEvent]:
        call = self.calls[-1]
        if len(args) <= self.sent:
            return []
        delta = args[self.sent:]
        self.sent = len(args)
        call.arguments += delta
        return [ParseEvent("arguments", text=delta, index=len(self.calls) - 1)]

    def _emit_content(self, text: str, *, final: bool) -> list[ParseEvent]:
        """Content before any call; leading whitespace waits until real text follows, so a
        message that is only calls has no content."""
        if not text:
            return []
        if not self.content and not text.strip():
            return []
        if not self.content:
            text = text.lstrip() if not self.calls else text
        if self.calls:
            return []  # after a call, text is not content in this format
        self.content += text
        return [ParseEvent("content", text=text)]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _argument_tail(text: str, end: str) -> int:
    """How much of the arguments text could still be the call's closing `}` and end tag."""
    cut = len(text) - _partial_suffix(text, end)
    cut = len(text[:cut].rstrip())
    if text[:cut].endswith("}"):
        cut = len(text[: cut - 1].rstrip())
    return len(text) - cut


def parse_all(fmt: ToolCallFormat, text: str) -> tuple[str | None, list[ToolCall]]:
    """The non-streamed result: (content or None, calls)."""
    parser = fmt.parser()
    parser.feed(text)
    parser.finish()
    content = parser.content if parser.content or not parser.calls else None
    return content, parser.calls
