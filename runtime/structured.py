"""Structured output: answers held to a JSON schema, a regular expression or a grammar.

At each step the tokens that cannot continue a match get a logit of -inf before sampling, and an
end-of-sequence token is allowed only where the match is complete. The matching is llguidance's
(the Rust library behind llama.cpp's `--llguidance` and vLLM's guided decoding; numpy only, wheels
for x86-64 and aarch64): a token-level parser over the bundle's own tokenizer.json, ~0.4 ms a token
for a JSON schema over SmolLM2's 49,152 tokens. It is an optional dependency
(`pip install 'nomoat[structured]'`), imported when a grammar is first used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import NomoatError

__all__ = ["Grammar", "Constraint", "StructuredOutputUnavailable"]

# Between JSON tokens: nothing, a space, or a newline and an indent of up to 20, as llama.cpp's
# JSON-schema grammars allow (its `space` rule). llguidance's default takes any run of whitespace,
# and a model unsure of what comes next (a small one, a quantized one) can fill its answer with it.
JSON_LAYOUT = {"whitespace_pattern": r"(?: |\n[ \t]{0,20})?",
               # oneOf as anyOf, as llama.cpp's json-schema-to-grammar takes it: llguidance refuses a oneOf whose
               # branches could overlap ({"type": "integer"} and {"type": "number"}), which no model output can fix
               "coerce_one_of": True}
# Schema keywords whose value is a schema, a list of schemas, or a map of names to schemas: where
# _closed_objects looks for object schemas (enum and const hold data, not schemas, and are not entered).
_SCHEMA_KEYWORDS = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems",
                    "not", "if", "then", "else", "contains", "propertyNames")
_SCHEMA_LIST_KEYWORDS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

INSTALL_HINT = "install it with: pip install llguidance (the extra 'nomoat[structured]')"


class StructuredOutputUnavailable(NomoatError, ImportError):
    """llguidance is not installed."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise StructuredOutputUnavailable(f"structured output needs llguidance, which is not installed; "
                                          f"{INSTALL_HINT}") from e
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What an answer must match, as llguidance's grammar text. Build one with a class method."""

    source: str  # llguidance's grammar (a Lark grammar or its JSON form)
    kind: str  # "json" | "regex" | "lark" | "gbnf": for messages

    @classmethod
    def json(cls, schema: dict[str, Any] | str | None = None) -> Grammar:
        """A JSON value matching the JSON schema; without one, any JSON object (OpenAI's json_object)."""
        llg = _llguidance()
        if schema is None:
            schema = {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
        try:
            return cls(llg.LLMatcher.grammar_from_json_schema(_closed_objects(schema), defaults=JSON_LAYOUT), "json")
        except ValueError as e:
            raise ValueError(f"the JSON schema cannot be used: {e}") from None

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text matching the regular expression as a whole (Rust's regex syntax)."""
        return cls(_llguidance().LLMatcher.grammar_from_regex(pattern), "regex")

    @classmethod
    def lark(cls, grammar: str) -> Grammar:
        """A Lark grammar (llguidance's syntax: `start: ...`)."""
        return cls(_llguidance().LLMatcher.grammar_from_lark(grammar), "lark")

    @classmethod
    def gbnf(cls, grammar: str) -> Grammar:
        """A llama.cpp GBNF grammar (`root ::= ...`), converted to Lark by llguidance."""
        llg = _llguidance()
        if not _GBNF_ROOT.search(grammar):
            raise ValueError("the GBNF grammar has no root rule (`root ::= ...`), where llama.cpp's grammars start; "
                             "name the rule the answer must match root")
        try:
            return cls(llg.grammar_from("gbnf", _plain_unicode_escapes(grammar)), "gbnf")
        except ValueError as e:
            raise ValueError(f"the GBNF grammar cannot be read: {e}") from None


def _closed_objects(schema: Any, in_all_of: bool = False) -> Any:
    """The schema with every object schema that lists its properties closed to others
    (`"additionalProperties": false` where it says nothing about them), as llama.cpp's
    json-schema-to-grammar reads a schema and OpenAI's strict mode demands. JSON Schema itself allows
    any other key, and a small model given that freedom adds keys until max_tokens runs out. The
    branches of an allOf are left open: each lists only its share of the object's properties."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_KEYWORDS:
        if key in out:
            out[key] = _closed_objects(out[key])
    for key in _SCHEMA_LIST_KEYWORDS:
        if isinstance(out.get(key), list):
            out[key] = [_closed_objects(branch, in_all_of=key == "allOf") for branch in out[key]]
    for key in _SCHEMA_MAP_KEYWORDS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed_objects(sub) for name, sub in out[key].items()}
    says_nothing = not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & out.keys()
    if "properties" in out and says_nothing and not in_all_of:
        out["additionalProperties"] = False
    return out


_GBNF_ROOT = re.compile(r"^\s*root\s*::=", re.MULTILINE)
_GBNF_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)


def _plain_unicode_escapes(grammar: str) -> str:
    """llama.cpp's \\uXXXX and \\UXXXXXXXX escapes as llguidance's GBNF reader takes them. It drops their
    leading zeros (\\u00e9 -> \\ue9) and then refuses its own spelling, so one below 0x100 becomes \\xHH
    (a quote, a bracket or a control character stays escaped) and a higher one the character itself.
    Other escapes (\\\\, \\n, \\x..) and surrogates, which no text holds, are left as they are."""
    def plain(m: re.Match) -> str:
        code = m.group(1)
        if code[0] not in "uU" or len(code) == 1:
            return m.group(0)
        point = int(code[1:], 16)
        if point < 0x100:
            return f"\\x{point:02x}"
        return m.group(0) if 0xD800 <= point <= 0xDFFF or point > 0x10FFFF else chr(point)

    return _GBNF_ESCAPE.sub(plain, grammar)


class Constraint:
    """One answer's matcher: masks logits before sampling and follows the sampled tokens."""

    def __init__(self, tokenizer: Any, grammar: Grammar):
        llg = _llguidance()
        error = llg.LLMatcher.validate_grammar(grammar.source, tokenizer)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"the {grammar.kind} grammar cannot be used: {' '.join(error.split())}")
        self._matcher = llg.LLMatcher(tokenizer, grammar.source, log_level=0)
        self._masked: np.ndarray | None = None

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of the logits with -inf where a token cannot come next."""
        allowed = np.frombuffer(self._matcher.compute_logit_bias(), dtype=np.uint8)[:logits.shape[-1]]
        if not allowed.any():  # a grammar that allows nothing: llguidance's error says why
            raise ValueError(f"the grammar allows no token here: {self._matcher.get_error() or 'no way to go on'}")
        if self._masked is None or self._masked.shape != logits.shape:
            self._masked = np.empty_like(logits)
        np.copyto(self._masked, logits)
        self._masked[allowed == 0] = -np.inf
        return self._masked

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"token {token} broke the grammar: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The match is whole and nothing can follow it (the answer ends here)."""
        return self._matcher.is_stopped()


def grammar_tokenizer(tokenizer_json: str, vocab_size: int, stop_token_ids: frozenset[int]) -> Any:
    """llguidance's view of the bundle's tokenizer (~0.3 s to build for 49k tokens: build once)."""
    llg = _llguidance()
    if not stop_token_ids:  # the match's end is where the answer stops: it needs a token to stop with
        raise ValueError("structured output needs a stop token, and this bundle has none (its manifest's "
                         "stop_token_ids is empty): convert a model whose tokenizer has an end-of-sequence token")
    return llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(stop_token_ids))
