"""Constrained decoding: grammars compiled per request, token masks applied per batch row.

The grammar engine is llguidance. Both llguidance and xgrammar install as CPU wheels here and
take the transformers tokenizers, but llguidance fits this server better:
- it rejects JSON Schema keywords it cannot enforce and names them ("Unimplemented keys:
  ["not"]"), which becomes our 400, where xgrammar silently ignores `not`, `uniqueItems` or an
  unknown `format` and would emit output that violates the schema;
- one Lark grammar with inline `%json {...}` and lazy lexemes expresses every tool_choice mode
  (text that may turn into a Hermes `<tool_call>`; one or many calls of named functions);
- it compiles without an ahead-of-time step (about 1 ms per schema here), so no per-schema cache
  is needed. xgrammar's masks are faster per step (7 us against 10-40 us per row, measured on the
  demo model), which is small next to a decode step.

The engine sees only `Constraint` (one per sequence) and `MaskBatch` (the shared bitmask buffer).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelfleet.protocol import OpenAIError

# Compact JSON: a free-whitespace grammar lets a weak model emit spaces until max_tokens (the
# reason vLLM grew `disable_any_whitespace`).
JSON_DEFAULTS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Grammar:
    """A validated grammar in llguidance's serialized form, ready to start matchers from."""

    text: str
    compiler: GrammarCompiler

    def matcher(self) -> Constraint:
        return Constraint(self.compiler.new_matcher(self.text))


class GrammarCompiler:
    """Per-model: the tokenizer as llguidance sees it, and request grammars checked against it.

    Building the token trie takes ~0.1 s for a 4k vocabulary and seconds for 150k, so it is done
    once, on first use, and shared by every request of the model.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltok = None
        self._lock = threading.Lock()

    @property
    def lltokenizer(self):
        with self._lock:
            if self._lltok is None:
                import llguidance.hf

                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            return self._lltok

    def new_matcher(self, grammar: str):
        import llguidance

        return llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)

    def json_schema(self, schema: dict[str, Any], param: str, whitespace_pattern: str | None = None) -> Grammar:
        """`whitespace_pattern` (vLLM's option) is the whitespace allowed between JSON tokens."""
        import llguidance

        if not isinstance(schema, dict):
            raise OpenAIError("The JSON schema must be an object.", param=param, code="invalid_value")
        options = {**JSON_DEFAULTS, "whitespace_pattern": whitespace_pattern} if whitespace_pattern else JSON_DEFAULTS
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except (ValueError, TypeError) as exc:
            raise _schema_error(str(exc), param) from exc
        return self._checked(text, param)

    def lark(self, grammar: str, param: str) -> Grammar:
        import llguidance

        return self._checked(llguidance.LLMatcher.grammar_from_lark(grammar), param)

    def regex(self, pattern: str, param: str) -> Grammar:
        """The whole output matches `pattern` (Rust regex syntax, as llguidance reads it)."""
        return self._from("regex", pattern, param, "regular expression")

    def choice(self, options: list[str], param: str) -> Grammar:
        """The whole output is exactly one of `options`."""
        return self._from("choice", json.dumps(options), param, "choice list")

    def grammar(self, text: str, param: str) -> Grammar:
        """A Lark grammar, or GBNF/EBNF (`root ::= ...`), which llguidance converts to Lark."""
        return self._from("grammar", text, param, "grammar")

    def structural_tag(self, spec: dict[str, Any], param: str) -> Grammar:
        """vLLM's structural tag (`{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`):
        free text in which each `begin` ... `end` holds JSON valid against its schema."""
        import llguidance

        tags = []
        for i, s in enumerate(spec["structures"]):
            trigger = next((t for t in spec["triggers"] if s["begin"].startswith(t)), None)
            if trigger is None:
                raise OpenAIError(f"No trigger in '{param}.triggers' starts structure {i}'s begin "
                                  f"{s['begin']!r}.", param=param, code="invalid_value")
            schema = {**s.get("schema", {"type": "object"}), "x-guidance": JSON_DEFAULTS}
            tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], grammar=schema, end=s["end"]))
        # llguidance reads a `<...>` trigger as a special token unless told not to: do so only
        # when such triggers are this tokenizer's own added tokens.
        added = self.tokenizer.get_added_vocab()
        special = all(t in added for t in spec["triggers"] if re.fullmatch(r"<[^<>]+>", t))
        grammar = llguidance.StructTag.to_grammar(tags, assume_special=special)
        return self._from("lark", grammar, param, "structural tag")

    def _from(self, kind: str, text: str, param: str, what: str) -> Grammar:
        import llguidance

        try:
            serialized = llguidance.grammar_from(kind, text)  # type: ignore[arg-type]
        except ValueError as exc:
            raise _invalid(what, str(exc), param) from exc
        error = llguidance.LLMatcher.validate_grammar(serialized, self.lltokenizer)
        if error:
            raise _invalid(what, error, param)
        return Grammar(serialized, self)

    def _checked(self, text: str, param: str) -> Grammar:
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(text, self.lltokenizer)
        if error:
            raise _schema_error(error, param)
        return Grammar(text, self)


def _first_lines(detail: str, fallback: str, lines: int = 1) -> str:
    """The message of an llguidance error, without the source excerpts and carets it quotes."""
    kept = [line.strip() for line in detail.strip().splitlines() if not _EXCERPT.match(line)][:lines]
    return " ".join(kept) or fallback


_EXCERPT = re.compile(r"^\s*(\d+\s*\|.*|\^+|)\s*$")


def _schema_error(detail: str, param: str) -> OpenAIError:
    detail = _first_lines(detail, "invalid schema")
    return OpenAIError(f"The JSON schema in '{param}' uses a feature this server cannot enforce: {detail}",
                       param=param, code="unsupported_schema")


def _invalid(what: str, detail: str, param: str) -> OpenAIError:
    return OpenAIError(f"Invalid {what} in '{param}': {_first_lines(detail, 'rejected', 3)}", param=param,
                       code="invalid_value")


class Constraint:
    """One sequence's grammar state: contributes its row's mask, then consumes the chosen token."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> bool:
        """Consumes `token`; False if the grammar refused it (it cannot, after masking)."""
        return bool(self.matcher.consume_token(token))

    def is_complete(self) -> bool:
        """Nothing more may follow (a JSON value was closed, or end-of-sequence was consumed)."""
        return bool(self.matcher.is_stopped())

    def error(self) -> str:
        return self.matcher.get_error() or ""


class MaskBatch:
    """The bitmask buffer for a batch and the one vectorised step that applies it.

    llguidance fills one int32 bitmask row per constrained sequence (its Rust code, not Python).
    Its own torch apply function is compiled for GPUs and took 15 ms here for 32 x 4k on a CPU,
    so rows are unpacked with numpy's `unpackbits` (2.6 ms for 32 rows x 32k vocabulary) and
    disallowed logits set to -inf in one masked_fill.
    """

    def __init__(self, max_rows: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.bitmask = torch.zeros((max_rows, self.words), dtype=torch.int32)
        self._executor = None

    def apply(self, logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
        """Masks `logits[rows[i]]` to what `constraints[i]` allows next."""
        import llguidance.torch as lt

        bitmask = self.bitmask[: len(rows)]
        if len(rows) == 1:
            lt.fill_next_token_bitmask(constraints[0].matcher, bitmask, 0)
        else:
            lt.fill_next_token_bitmask_par(self._pool(), [(c.matcher, i) for i, c in enumerate(constraints)],
                                           bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, count=logits.shape[-1], bitorder="little")
        disallowed = torch.from_numpy(bits).view(torch.bool).logical_not_()
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(disallowed, float("-inf"))
        else:
            index = torch.tensor(rows)
            logits[index] = logits[index].masked_fill_(disallowed, float("-inf"))

    def _pool(self):
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

