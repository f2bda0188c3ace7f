"""The chat template as fixed text pieces, for runtimes that cannot run Jinja (the Android app).

A chat app only ever renders alternating conversations: an optional system message, a user
turn, then (assistant reply, user turn) pairs, each time with the generation prompt. Most chat
templates render those as fixed text around each message's content, so three piece lists
describe them completely:

    first_turn              ["<|im_start|>system\\nYou are ...<|im_end|>\\n<|im_start|>user\\n", "user",
                             "<|im_end|>\\n<|im_start|>assistant\\n"]
    first_turn_with_system  [text, "system", text, "user", text]
    next_turn               [text, "assistant", text, "user", text]   (appended after the prompt so far)

Even positions are literal text, odd positions name the message whose content goes there. Two
optional keys cover what common templates do beyond that:

    content   {"user": ["strip"], "assistant": ["after_think", "strip"], ...}: changes made to a
              role's content before it goes in, in order, from CONTENT_OPS (Llama 3 trims every
              message; DeepSeek-R1's and Qwen3's drop an earlier answer's reasoning)
    dates     ["%d %b %Y", ...]: the strftime formats of the dates a template puts in (Llama 3.2's
              "Today Date"), whose places in the literal text hold DATE_MARK.format(i); the app fills
              in its own date, so the prompt is not frozen at the day the model was converted

The pieces are found by rendering the template with marker contents, then checked: conversations
of one to three turns, with and without a system message, with outer whitespace and with an
answer's reasoning and without, must render identically through Jinja and through the pieces. A template that
fails the check (content changed otherwise, turns that depend on their position, ...) gets no
chat_format, and the app says so instead of prompting the model wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

# Markers that no template changes: no whitespace to trim, no case to fold.
_MARK = "\u2063nomoat{}\u2063"
_MARK_RE = re.compile("\u2063nomoat(\\d+)\u2063")
DATE_MARK = "\u2063nomoatdate{}\u2063"
_DATE_RE = re.compile("\u2063nomoatdate(\\d+)\u2063")

# What the app (android_demo ChatFormat.kt) can do to a message's content, by name.
CONTENT_OPS: dict[str, Callable[[str], str]] = {
    "strip": str.strip,  # Jinja's trim
    "after_think": lambda s: s.split("</think>")[-1],  # an earlier answer without its reasoning
    # the same, and the newlines that follow the reasoning (where there was any)
    "after_think_lstrip": lambda s: s.split("</think>")[-1].lstrip("\n") if "</think>" in s else s,
}
_ROLES = ("system", "user", "assistant")
# The content changes tried, the plain one first: every message trimmed or not, and an answer's
# reasoning dropped (DeepSeek-R1-Distill) or dropped with the newlines after it (Qwen3) or kept.
_CANDIDATES: list[dict[str, list[str]]] = [
    {role: ops for role in _ROLES if (ops := (think if role == "assistant" else []) + trim)}
    for trim in ([], ["strip"]) for think in ([], ["after_think"], ["after_think_lstrip"])
]
# strftime codes the app formats as Python does (English names, as in the C locale)
_DATE_CODES = set("dmyYbBaAHMSjp%")
# The check's day: a single-digit day and month, so a format that pads or not shows.
_CHECK_DAY = datetime(2024, 3, 5, 7, 8, 9)


def derive_chat_format(template) -> dict[str, Any] | None:
    """Piece lists for `template` (a nomoat.runtime.chat_template.ChatTemplate), or None when its
    renderings are not fixed text around each message (see the module docstring)."""
    from jinja2 import TemplateError

    dates: list[str] = []

    def date_mark(fmt: str) -> str:  # the template's strftime_now while the pieces are cut out
        if fmt not in dates:
            dates.append(fmt)
        return DATE_MARK.format(dates.index(fmt))

    try:
        pieces = {"first_turn": _first_turn(template, date_mark, with_system=False),
                  "first_turn_with_system": _first_turn(template, date_mark, with_system=True),
                  "next_turn": _next_turn(template, date_mark)}
        if not all(set(re.findall(r"%(.)", fmt)) <= _DATE_CODES for fmt in dates):
            return None
        for content in _CANDIDATES:
            fmt = {**pieces, **({"content": content} if content else {}), **({"dates": dates} if dates else {})}
            if _renders_like(template, fmt):
                return fmt
    except (TemplateError, ValueError, TypeError, LookupError):
        # Templates refuse what they do not support (e.g. a system message) with an exception.
        return None
    return None


def render_pieces(fmt: dict[str, Any], messages: list[dict[str, str]], now: datetime | None = None) -> str:
    """The prompt for an alternating conversation ending in a user turn, from the piece lists,
    with `now` (default: the clock) for the dates."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    head, rest = (messages[:2], messages[2:]) if has_system else (messages[:1], messages[1:])
    ops = fmt.get("content", {})
    text = _fill(fmt["first_turn_with_system" if has_system else "first_turn"], head, ops)
    for i in range(0, len(rest), 2):
        text += _fill(fmt["next_turn"], rest[i:i + 2], ops)
    dates = fmt.get("dates", [])
    if dates:
        day = now or datetime.now()
        text = _DATE_RE.sub(lambda m: day.strftime(dates[int(m.group(1))]), text)
    return text


def _renders_like(template, fmt: dict[str, Any]) -> bool:
    for system in (False, True):
        for turns in (1, 2, 3):
            conversation = _conversation(system, turns)
            jinja = template.render(conversation, add_generation_prompt=True, strftime_now=_CHECK_DAY.strftime)
            if render_pieces(fmt, conversation, now=_CHECK_DAY) != jinja:
                return False
    return True


def _fill(pieces: list[str], messages: list[dict[str, str]], ops: dict[str, list[str]]) -> str:
    def content(m: dict[str, str]) -> str:
        text = m["content"]
        for op in ops.get(m["role"], []):
            text = CONTENT_OPS[op](text)
        return text

    contents = iter(content(m) for m in messages)
    return "".join(p if i % 2 == 0 else next(contents) for i, p in enumerate(pieces))


def _conversation(system: bool, turns: int, marks: bool = False) -> list[dict[str, str]]:
    """system? + user (+ assistant, user) * (turns - 1). The check's texts differ per message (a
    swap would show), have outer whitespace (a template that trims content would show), and the
    answers hold reasoning (a template that drops it would show)."""
    def text(role: str, n: int) -> str:
        if marks:
            return _MARK.format(n)
        said = f" {role} text {n}, with 'quotes' and\nnewlines\n"
        if role != "assistant":
            return said
        return f"<think>\nwhy {n}\n</think>\n\n{said}" if n % 4 == 2 else f"\n{said}"

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


def _first_turn(template, date_mark: Callable[[str], str], with_system: bool) -> list[str]:
    msgs = _conversation(with_system, 1, marks=True)
    return _split(template.render(msgs, add_generation_prompt=True, strftime_now=date_mark), msgs)


def _next_turn(template, date_mark: Callable[[str], str]) -> list[str]:
    one = _conversation(False, 1, marks=True)
    two = _conversation(False, 2, marks=True)
    before = template.render(one, add_generation_prompt=True, strftime_now=date_mark)
    after = template.render(two, add_generation_prompt=True, strftime_now=date_mark)
    if not after.startswith(before):
        raise ValueError("a later turn changes the text of the earlier ones")
    return _split(after[len(before):], two[1:])
