"""Chat templates (the Jinja text in ``chat_template.jinja`` of a bundle), rendered like transformers.

The template comes with the model, i.e. from a third party, so it runs in Jinja's
``ImmutableSandboxedEnvironment``: no access to underscore attributes (no escape to Python through
``().__class__.__bases__``) and no mutation of the messages. Unlike plain Jinja, which turns an
unsafe attribute into a silently empty value, any such access raises ``jinja2.sandbox.SecurityError``
at once, so a hostile or broken template fails loudly.

The environment mirrors ``transformers``' ``apply_chat_template``: ``trim_blocks``/``lstrip_blocks``,
the ``loopcontrols`` extension, a ``{% generation %}`` block (rendered as its body), and the globals
templates rely on: ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text,
and ``bos_token``/``eos_token``/``add_generation_prompt``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .messages import as_messages, validate_messages

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "FALLBACK_CHATML_TEMPLATE",
    "FALLBACK_STOP_STRING",
    "SecurityError",
    "as_messages",
    "validate_messages",
]

# Used when a bundle ships no chat template. ChatML is what most small open chat models
# (SmolLM2, Qwen2.5, many fine-tunes) were trained with; for a model trained on another format
# the replies will be poor, so callers should say that they fell back. Generation should stop on
# "<|im_end|>" (FALLBACK_STOP_STRING).
FALLBACK_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FALLBACK_STOP_STRING = "<|im_end|>"

# Names the renderer sets itself; passing them through **extra would be ambiguous.
_RESERVED = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token"})


class ChatTemplateError(TemplateError):
    """Raised by a template's own ``raise_exception(message)`` (e.g. "roles must alternate")."""


# A bundle or a downloaded model is not trusted: its template may loop for ever or build a string of
# gigabytes. A real one renders a long conversation in milliseconds.
RENDER_SECONDS = 5.0
MAX_REPEATED = 1_000_000  # items of a string or list made by `*` or `%` (Jinja's sandbox caps range() alone)
MAX_EXPONENT = 10_000
MAX_POWER_BITS = 1_000_000  # (7 ** 10000) ** 3000 took 45 s in one step, where the deadline cannot reach


class _StrictSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "%"])

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The base class returns an Undefined that only raises if used further, and prints as ''
        # otherwise; raising here makes every attempt to reach an unsafe attribute an error.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            sequence, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sequence, (str, list, tuple)) and isinstance(times, int) \
                    and len(sequence) * times > MAX_REPEATED:
                raise SecurityError(f"the chat template repeats a {type(sequence).__name__} into more than "
                                    f"{MAX_REPEATED:,} items")
            return left * right
        if operator == "%":  # '%50000000d' % 1: the width is the format's, known only once it is made
            result = left % right
            if isinstance(result, str) and len(result) > MAX_REPEATED:
                raise SecurityError(f"the chat template formats a string of more than {MAX_REPEATED:,} characters")
            return result
        if isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"the chat template raises a number to the power {right}")
        bits = abs(left).bit_length() if isinstance(left, int) else 0
        if isinstance(right, int) and right * bits > MAX_POWER_BITS:
            raise SecurityError(f"the chat template raises a number of {bits} bits to the power {right}")
        return left**right


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
    transformers; for inference it renders as its body. Without it such templates fail to parse."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


def _within_deadline(render: Any) -> str:
    """render() stopped with a ChatTemplateError once it has run RENDER_SECONDS: a template that loops for
    ever (two nested range(100000)) held a server's request thread, and its core, until the process ended.
    A trace function on this thread only, put back as it was after (a debugger's, coverage's)."""
    deadline = time.monotonic() + RENDER_SECONDS
    previous = sys.gettrace()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise ChatTemplateError(f"the chat template did not finish rendering within {RENDER_SECONDS:g} s; "
                                    "it may loop for ever: use the model's own template")
        return trace

    sys.settrace(trace)
    try:
        return render()
    finally:
        sys.settrace(previous)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson escapes <, >, & and ' for HTML and ignores most options; chat
    # templates (tool schemas) expect plain JSON with readable non-ASCII text, as transformers does.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    # Templates such as LLaMA-3.1's put today's date in the system prompt.
    return datetime.now().strftime(format)


def _make_environment() -> _StrictSandbox:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template. Syntax errors surface here, when it is built (the converter builds
    the model's template before writing a bundle), not mid-chat."""

    def __init__(self, template_source: str, bos_token: str = "", eos_token: str = "",
                 other_special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = template_source
        self.bos_token = bos_token
        self.eos_token = eos_token
        # e.g. {"unk_token": "<unk>", "pad_token": "<pad>"}: transformers renders with every special token
        self.other_special_tokens = dict(other_special_tokens or {})
        self._template = _make_environment().from_string(template_source)

    @classmethod
    def fallback(cls, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        """The ChatML template, for bundles without one (see FALLBACK_CHATML_TEMPLATE)."""
        return cls(FALLBACK_CHATML_TEMPLATE, bos_token=bos_token, eos_token=eos_token)

    @classmethod
    def for_tokenizer(cls, template_source: str | None, special_tokens: Mapping[str, str]) -> ChatTemplate:
        """The template a bundle renders with: its own, or ChatML when it has none, with the special
        tokens by role as the manifest keeps them ({"bos": "<s>", "eos": ..., "unk": ..., "pad": ...})."""
        bos, eos = special_tokens.get("bos", ""), special_tokens.get("eos", "")
        if template_source is None:
            return cls.fallback(bos_token=bos, eos_token=eos)
        others = {f"{role}_token": text for role, text in special_tokens.items() if role not in ("bos", "eos")}
        return cls(template_source, bos_token=bos, eos_token=eos, other_special_tokens=others)

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render a conversation to the prompt text.

        ``extra`` holds template-specific variables (``tools``, ``date_string``, ...).
        """
        validate_messages(messages)
        clash = sorted(_RESERVED & extra.keys())
        if clash:
            raise ValueError(f"{clash} are set by render() itself and cannot be passed as extra variables")
        # As transformers' apply_chat_template: tools and documents are None unless given (a template
        # may test `tools is not none` without defining it first), and every special token is set.
        variables = {"tools": None, "documents": None, **self.other_special_tokens, **extra}
        return _within_deadline(lambda: self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **variables,
        ))
