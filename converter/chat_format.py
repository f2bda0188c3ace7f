"""The chat template as fixed text pieces, for runtimes that cannot run Jinja (the Android app).

A chat app only ever renders alternating conversations: an optional system message, a user
turn, then (assistant reply, user turn) pairs, each time with the generation prompt. Most chat
templates render those as fixed text around each message's content, so three piece lists
describe them completely:

    first_turn              ["<|im_start|>system\\nYou are ...<|im_end|>\\n<|im_start|>user\\n", "user",
                             "<|im_end|>\\n<|im_start|>assistant\\n"]
    first_turn_with_system  [text, "system", text, "user", text]
    next_turn               [text, "assistant", text, "user", text]   (appended after the prompt so far)

Even positions are literal text, odd positions name the message whose content goes there. The
pieces are found by rendering the template with marker contents, then checked: conversations of
one to three turns, with and without a system message, must render identically through Jinja and
through the pieces. A template that fails the check (content transformed, turns that depend on
their position, ...) gets no chat_format, and the app says so instead of prompting the model wrong.
"""

from __future__ import annotations

import re
from typing import Any

# Markers that no template changes: no whitespace to trim, no case to fold.
_MARK = "\u2063nomoat{}\u2063"
_MARK_RE = re.compile("\u2063nomoat(\\d+)\u2063")


def derive_chat_format(template) -> dict[str, list[str]] | None:
    """Piece lists for `template` (a nomoat.runtime.chat_template.ChatTemplate), or None when its
    renderings are not fixed text around each message (see the module docstring)."""
    from jinja2 import TemplateError

    try:
        fmt = {"first_turn": _first_turn(template, with_system=False),
               "first_turn_with_system": _first_turn(template, with_system=True),
               "next_turn": _next_turn(template)}
        for system in (False, True):
            for turns in (1, 2, 3):
                conversation = _conversation(system, turns)
                if render_pieces(fmt, conversation) != template.render(conversation, add_generation_prompt=True):
                    return None
    except (TemplateError, ValueError, TypeError, LookupError):
        # Templates refuse what they do not support (e.g. a system message) with an exception.
        return None
    return fmt


def render_pieces(fmt: dict[str, list[str]], messages: list[dict[str, str]]) -> str:
    """The prompt for an alternating conversation ending in a user turn, from the piece lists."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    head, rest = (messages[:2], messages[2:]) if has_system else (messages[:1], messages[1:])
    text = _fill(fmt["first_turn_with_system" if has_system else "first_turn"], head)
    for i in range(0, len(rest), 2):
        text += _fill(fmt["next_turn"], rest[i:i + 2])
    return text


def _fill(pieces: list[str], messages: list[dict[str, str]]) -> str:
    contents = iter(m["content"] for m in messages)
    return "".join(p if i % 2 == 0 else next(contents) for i, p in enumerate(pieces))


def _conversation(system: bool, turns: int, marks: bool = False) -> list[dict[str, str]]:
    """system? + user (+ assistant, user) * (turns - 1). The check's texts differ per message (a
    swap would show) and have outer whitespace (a template that trims content would show)."""
    def text(role: str, n: int) -> str:
        return _MARK.format(n) if marks else f" {role} text {n}, with 'quotes' and\nnewlines\n"

    msgs: list[dict[str, str]] = [{"role": "system", "content": text("system", 0)}] if system else []
    for t in range(turns):
        if t:
            msgs.append({"role": "assistant", "content": text("assistant", 2 * t)})
        msgs.append({"role": "user", "content": text("user", 2 * t + 1)})
    return msgs


def _split(text: str, messages: list[dict[str, Any]]) -> list[str]:
    """[literal, role, literal, role, ..., literal]: the rendered text cut at the markers, which must
    appear once each, in message order."""
    parts = _MARK_RE.split(text)
    literals, found = parts[0::2], [int(n) for n in parts[1::2]]
    expected = [int(_MARK_RE.fullmatch(m["content"]).group(1)) for m in messages]
    if found != expected:
        raise ValueError("the template does not render each message's content once, in order")
    pieces = [literals[0]]
    for m, lit in zip(messages, literals[1:], strict=True):
        pieces += [m["role"], lit]
    return pieces


def _first_turn(template, with_system: bool) -> list[str]:
    msgs = _conversation(with_system, 1, marks=True)
    return _split(template.render(msgs, add_generation_prompt=True), msgs)


def _next_turn(template) -> list[str]:
    one = _conversation(False, 1, marks=True)
    two = _conversation(False, 2, marks=True)
    before = template.render(one, add_generation_prompt=True)
    after = template.render(two, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("a later turn changes the text of the earlier ones")
    return _split(after[len(before):], two[1:])
