"""What a chat request asks of its output: a JSON schema (`response_format`), tool calls
(`tools`/`tool_choice`), both or neither, turned into one grammar and a way to read the text back.

Schemas are checked here, on the request's thread, so an unsupported feature is a 400 naming it
before the request reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelfleet.protocol import ChatCompletionRequest, OpenAIError

from .constraints import Grammar, GrammarCompiler
from .tool_calls import (
    Function,
    HermesFormat,
    ToolCallFormat,
    ToolChoice,
    functions_from_tools,
    resolve_choice,
)

ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class OutputPlan:
    grammar: Grammar | None = None
    tools: list[dict[str, Any]] | None = None  # rendered into the prompt by the chat template
    tool_format: ToolCallFormat | None = None  # set when the text is parsed for tool calls


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks for; None for plain text."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise OpenAIError("Missing required parameter: 'response_format.json_schema'.",
                              param="response_format.json_schema")
        schema = spec.get("schema", ANY_OBJECT)
        if not isinstance(schema, dict):
            raise OpenAIError("'response_format.json_schema.schema' must be a JSON Schema object.",
                              param="response_format.json_schema.schema")
        return schema
    raise OpenAIError(f"Invalid value for 'response_format.type': '{kind}'. Supported values are: 'text', "
                      "'json_object' and 'json_schema'.", param="response_format.type", code="invalid_value")


def plan_output(req: ChatCompletionRequest, compiler: GrammarCompiler,
                tool_format: ToolCallFormat | None = None) -> OutputPlan:
    if req.functions and req.function_call != "none":
        raise OpenAIError("The legacy `functions` parameter is not supported; send `tools` instead.",
                          param="functions", code="unsupported_parameter")
    fmt = tool_format or HermesFormat()
    schema = response_schema(req.response_format)
    functions = functions_from_tools(req.tools or [])
    choice = resolve_choice(req.tool_choice, functions)
    rendered = [f.as_tool() for f in functions] or None
    if choice.mode == "none":
        if schema is None:
            return OutputPlan(tools=rendered)
        return OutputPlan(grammar=compiler.json_schema(schema, "response_format.json_schema.schema"),
                          tools=rendered)
    _check_parameters(functions, compiler)
    if schema is not None:
        compiler.json_schema(schema, "response_format.json_schema.schema")
    parallel = req.parallel_tool_calls if isinstance(getattr(req, "parallel_tool_calls", None), bool) else True
    grammar = compiler.lark(fmt.grammar(functions, choice, parallel, schema), "tools")
    return OutputPlan(grammar=grammar, tools=rendered, tool_format=fmt)


def _check_parameters(functions: list[Function], compiler: GrammarCompiler) -> None:
    """Each function's schema alone, so a 400 names the tool whose schema is unsupported."""
    for i, f in enumerate(functions):
        compiler.json_schema(f.parameters, f"tools[{i}].function.parameters")


__all__ = ["OutputPlan", "ToolChoice", "plan_output", "response_schema"]
