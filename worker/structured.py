"""What a request asks of its output, turned into one grammar and a way to read the text back.

The asks: a JSON schema (`response_format`), tool calls (`tools`/`tool_choice`), or vLLM's
constraints (`structured_outputs`, or the older `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar`, `structural_tag`). `response_format` and tools combine (the text is that JSON
or calls); otherwise one constraint per request, and two are a 400 naming the second, as in vLLM.

Everything is compiled here, on the request's thread, so an unsupported schema feature or an
invalid regex is a 400 naming the parameter before the request reaches the engine.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from modelfleet.protocol import ChatCompletionRequest, OpenAIError, SamplingFields

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
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
          "structural_tag": "structural_tag"}


@dataclass(frozen=True)
class OutputConstraint:
    """One constraint of a request, whichever way it was spelled; `param` is where, for errors."""

    kind: str  # json, json_object, regex, choice, grammar or structural_tag
    spec: Any
    param: str
    whitespace_pattern: str | None = None
    closed_objects: bool = False  # vLLM's disable_additional_properties

    @property
    def from_response_format(self) -> bool:
        return self.param.startswith("response_format")


@dataclass(frozen=True)
class OutputPlan:
    grammar: Grammar | None = None
    tools: list[dict[str, Any]] | None = None  # rendered into the prompt by the chat template
    tool_format: ToolCallFormat | None = None  # set when the text is parsed for tool calls


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks for; None for plain text."""
    constraint = _response_format_constraint(response_format)
    if constraint is None:
        return None
    if constraint.kind == "structural_tag":
        raise OpenAIError("'structural_tag' is not a JSON schema.", param="response_format.type")
    return constraint.spec


def _response_format_constraint(response_format: dict[str, Any] | None) -> OutputConstraint | None:
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return OutputConstraint("json", ANY_OBJECT, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise OpenAIError("Missing required parameter: 'response_format.json_schema'.",
                              param="response_format.json_schema")
        schema = spec.get("schema", ANY_OBJECT)
        if not isinstance(schema, dict):
            raise OpenAIError("'response_format.json_schema.schema' must be a JSON Schema object.",
                              param="response_format.json_schema.schema")
        return OutputConstraint("json", schema, "response_format.json_schema.schema")
    if kind == "structural_tag":
        return OutputConstraint("structural_tag", response_format, "response_format")
    raise OpenAIError(f"Invalid value for 'response_format.type': '{kind}'. Supported values are: 'text', "
                      "'json_object', 'json_schema' and 'structural_tag'.", param="response_format.type",
                      code="invalid_value")


def requested_constraint(req: SamplingFields) -> OutputConstraint | None:
    """The request's one output constraint, or None; more than one is a 400, as in vLLM."""
    found: list[OutputConstraint] = []
    so = req.structured_outputs
    if so is not None:
        kinds = so.kinds()
        if len(kinds) != 1:
            raise OpenAIError("`structured_outputs` must set exactly one of 'json', 'regex', 'choice', 'grammar', "
                              f"'json_object' or 'structural_tag'; it sets {sorted(kinds) or 'none'}.",
                              param="structured_outputs", code="invalid_value")
        (kind, spec), = kinds.items()
        found.append(OutputConstraint(kind, spec, f"structured_outputs.{kind}", so.whitespace_pattern,
                                      bool(so.disable_additional_properties)))
    for name, kind in GUIDED.items():
        spec = getattr(req, name)
        if spec is not None:
            found.append(OutputConstraint(kind, spec, name, req.guided_whitespace_pattern))
    rf = _response_format_constraint(req.response_format)
    if rf is not None:
        found.append(rf)
    if len(found) > 1:
        first, second = (c.param.split(".")[0] for c in found[:2])
        raise OpenAIError(f"Only one structured output constraint may be set per request, and this one sets "
                          f"`{first}` and `{second}`.", param=second, code="invalid_value")
    return found[0] if found else None


def compile_constraint(c: OutputConstraint, compiler: GrammarCompiler) -> Grammar:
    if c.kind in ("json", "json_object"):
        return compiler.json_schema(_schema(c), c.param, c.whitespace_pattern)
    if c.kind == "regex":
        return compiler.regex(c.spec, c.param)
    if c.kind == "choice":
        return compiler.choice(c.spec, c.param)
    if c.kind == "grammar":
        return compiler.grammar(c.spec, c.param)
    return compiler.structural_tag(_structural_tag(c), c.param)


def plan_output(req: SamplingFields, compiler: GrammarCompiler) -> OutputPlan:
    """The plan for a chat or completions request (completions have no tools)."""
    if getattr(req, "functions", None) and getattr(req, "function_call", None) != "none":
        raise OpenAIError("The legacy `functions` parameter is not supported; send `tools` instead.",
                          param="functions", code="unsupported_parameter")
    constraint = requested_constraint(req)
    tools = req.tools if isinstance(req, ChatCompletionRequest) else None
    functions = functions_from_tools(tools or [])
    choice = resolve_choice(req.tool_choice if isinstance(req, ChatCompletionRequest) else None, functions)
    rendered = [f.as_tool() for f in functions] or None
    if choice.mode == "none":
        grammar = compile_constraint(constraint, compiler) if constraint else None
        return OutputPlan(grammar=grammar, tools=rendered)
    schema = None
    if constraint is not None:
        if not (constraint.from_response_format and constraint.kind == "json"):
            raise OpenAIError(f"`{constraint.param.split('.')[0]}` cannot be combined with `tools`; send "
                              "`tool_choice: \"none\"` or leave one of them out.", param=constraint.param,
                              code="invalid_value")
        schema = constraint.spec
    fmt = HermesFormat()
    _check_parameters(functions, compiler)
    if schema is not None:
        compiler.json_schema(schema, "response_format.json_schema.schema")
    parallel = req.parallel_tool_calls if isinstance(getattr(req, "parallel_tool_calls", None), bool) else True
    grammar = compiler.lark(fmt.grammar(functions, choice, parallel, schema), "tools")
    return OutputPlan(grammar=grammar, tools=rendered, tool_format=fmt)


def _schema(c: OutputConstraint) -> dict[str, Any]:
    """A JSON constraint's schema: vLLM takes it as an object or as a JSON string."""
    schema = c.spec if c.kind == "json" else ANY_OBJECT
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise OpenAIError(f"'{c.param}' is not valid JSON: {exc}", param=c.param, code="invalid_value") from exc
    if not isinstance(schema, dict):
        raise OpenAIError(f"'{c.param}' must be a JSON Schema object.", param=c.param, code="invalid_value")
    return close_objects(schema) if c.closed_objects else schema


def close_objects(schema: Any) -> Any:
    """vLLM's disable_additional_properties: every object schema that does not say otherwise
    allows no properties beyond those it lists (llguidance has no option for it)."""
    out = copy.deepcopy(schema)
    todo = [out]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if "additionalProperties" not in node and ("properties" in node or "patternProperties" in node):
                node["additionalProperties"] = False
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return out


def _structural_tag(c: OutputConstraint) -> dict[str, Any]:
    """The `structures`/`triggers` form, from an object or a JSON string."""
    spec = c.spec
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise OpenAIError(f"'{c.param}' is not valid JSON: {exc}", param=c.param, code="invalid_value") from exc
    if isinstance(spec, dict) and "format" in spec and "structures" not in spec:
        raise OpenAIError(f"'{c.param}' uses the `format` form of structural tags, which this engine does not "
                          "support; send `structures` and `triggers`.", param=c.param, code="unsupported_value")
    ok = (isinstance(spec, dict) and isinstance(spec.get("triggers"), list) and spec["triggers"]
          and all(isinstance(t, str) and t for t in spec["triggers"]) and isinstance(spec.get("structures"), list)
          and spec["structures"] and all(isinstance(s, dict) and isinstance(s.get("begin"), str)
                                         and isinstance(s.get("end"), str)
                                         and isinstance(s.get("schema", {}), dict) for s in spec["structures"]))
    if not ok:
        raise OpenAIError(f"'{c.param}' must be {{\"structures\": [{{\"begin\", \"schema\", \"end\"}}], "
                          "\"triggers\": [...]}.", param=c.param, code="invalid_value")
    return spec


def _check_parameters(functions: list[Function], compiler: GrammarCompiler) -> None:
    """Each function's schema alone, so a 400 names the tool whose schema is unsupported."""
    for i, f in enumerate(functions):
        compiler.json_schema(f.parameters, f"tools[{i}].function.parameters")


__all__ = ["OutputConstraint", "OutputPlan", "ToolChoice", "plan_output", "requested_constraint",
           "response_schema"]
