"""The chat template as fixed text pieces, for runtimes that cannot run Jinja (the Android app).

A chat app only ever renders alternating conversations: an optional system message, a user
turn, then (assistant reply, user turn) pairs, each time with the generation prompt. Most chat
templates render those as fixed text around each message's content, so three piece lists
describe them completely:

    first_turn              ["<|im_start|>system\\nYou are ...<|im_end|>\\n<|im_start|>user\\n", "user",
                             "<|im_end|>\\n<|im_start|>assistant\\n"]
    first_turn_with_system  [text, "system", text, "user", text]
    next_turn               [text, "assistant", text, "user", text]   (appended after the turns so far)

Even positions are literal text, odd positions name the message whose content goes there.
first_turn_with_system is null when a template's system message is not fixed text around its content
(Llama 2 trims it together with the first user message, Mistral v0.3 moves it to the last user turn,
Gemma refuses it): the app sends none, and a system message is then refused. Three optional keys
cover what common templates do beyond that:

    generation_prompt
              text that ends every prompt but is not part of the conversation once answered
              (DeepSeek-R1-Distill opens the answer with "<｜Assistant｜><think>\\n", and an earlier
              answer renders as "<｜Assistant｜>" and its content): appended after the pieces
    content   {"user": ["strip"], "assistant": ["after_think", "strip"], ...}: changes made to a
              role's content before it goes in, in order, from CONTENT_OPS (Llama 3 trims every
              message; DeepSeek-R1's and Qwen3's drop an earlier answer's reasoning)
    dates     ["%d %b %Y", ...]: the strftime formats of the dates a template puts in (Llama 3.2's
              "Today Date"), whose places in the literal text hold DATE_MARK.format(i); the app fills
              in its own date, so the prompt is not frozen at the day the model was converted

The pieces are found by rendering the template with marker contents, then checked: conversations
of one to three turns, without a system message, with one and with an empty one, with outer
whitespace and with an answer's reasoning and without, must render identically through Jinja and
through the pieces. A template that fails the check (content changed otherwise, turns that depend
on their position, ...) gets no chat_format, and the app says so instead of prompting the model
wrong.
"""

from __future__ import annotations

import os
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
# The content changes tried per role, the plain one first: trimmed or not, and an answer's reasoning
# dropped (DeepSeek-R1-Distill) or dropped with the newlines after it (Qwen3) or kept. Per role, since
# templates trim some roles only (Mistral v0.3 the answers, Llama 2 the user's and the answer's).
_TRIMS: list[list[str]] = [[], ["strip"]]
_THINKS: list[list[str]] = [[], ["after_think"], ["after_think_lstrip"]]


def _candidates(with_system: bool) -> list[dict[str, list[str]]]:
    """Every combination of each role's content changes, fewest changes first (the system's only
    when the format has a system turn)."""
    combos = [
        {role: ops for role, ops in (("system", system), ("user", user), ("assistant", think + trim)) if ops}
        for system in (_TRIMS if with_system else [[]]) for user in _TRIMS for think in _THINKS for trim in _TRIMS
    ]
    return sorted(combos, key=lambda c: sum(map(len, c.values())))


# strftime codes the app formats as Python does (English names, as in the C locale)
_DATE_CODES = set("dmyYbBaAHMSjp%")
# The check's day: a single-digit day and month, so a format that pads or not shows.
_CHECK_DAY = datetime(2024, 3, 5, 7, 8, 9)
_SYSTEM_TEXT = " system text 0, with 'quotes' and\nnewlines\n"  # the check's system message
# render_pieces' refusal of a system message the format has no piece for (ChatFormat.kt says the same).
NO_SYSTEM = ("this chat_format has no system turn (the model's chat template does not take a system message "
             "as fixed text): leave out the system message")


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
        generation_prompt, first_turn, next_turn = _turns(template, date_mark)
    except (TemplateError, ValueError, TypeError, LookupError):
        # Templates refuse what they do not support with an exception.
        return None
    try:
        with_system = _first_turn_with_system(template, date_mark, generation_prompt)
    except (TemplateError, ValueError, TypeError, LookupError):
        # A template that refuses a system message (Gemma, Mistral) or moves it (Mistral v0.3 puts it
        # in the last user turn) still chats: the app sends none.
        with_system = None
    if not all(set(re.findall(r"%(.)", fmt)) <= _DATE_CODES for fmt in dates):
        return None
    pieces = {"first_turn": first_turn, "first_turn_with_system": with_system, "next_turn": next_turn,
              **({"generation_prompt": generation_prompt} if generation_prompt else {}),
              **({"dates": dates} if dates else {})}
    # With the system case first; a template whose system message is not fixed text (Llama 2 trims it
    # together with the first user message, Phi-3.5 leaves out an empty one) is kept without it.
    for fmt in ([pieces, {**pieces, "first_turn_with_system": None}] if with_system else [pieces]):
        for content in _candidates(with_system=fmt["first_turn_with_system"] is not None):
            candidate = {**fmt, **({"content": content} if content else {})}
            try:
                if _renders_like(template, candidate):
                    return candidate
            except (TemplateError, ValueError, TypeError, LookupError):
                break  # the template refuses one of the check's conversations: these pieces do not do
    return None


def render_pieces(fmt: dict[str, Any], messages: list[dict[str, str]], now: datetime | None = None) -> str:
    """The prompt for an alternating conversation ending in a user turn, from the piece lists,
    with `now` (default: the clock) for the dates."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    if has_system and fmt.get("first_turn_with_system") is None:
        raise ValueError(NO_SYSTEM)
    head, rest = (messages[:2], messages[2:]) if has_system else (messages[:1], messages[1:])
    ops = fmt.get("content", {})
    text = _fill(fmt["first_turn_with_system" if has_system else "first_turn"], head, ops)
    for i in range(0, len(rest), 2):
        text += _fill(fmt["next_turn"], rest[i:i + 2], ops)
    text += fmt.get("generation_prompt", "")
    dates = fmt.get("dates", [])
    if dates:
        day = now or datetime.now()
        text = _DATE_RE.sub(lambda m: day.strftime(dates[int(m.group(1))]), text)
    return text


def _renders_like(template, fmt: dict[str, Any]) -> bool:
    # Without a system message, with one and with an empty one: a template that leaves an empty one
    # out (Phi-3.5) does not render it as fixed text around its content.
    systems = [None, *([_SYSTEM_TEXT, ""] if fmt["first_turn_with_system"] is not None else [])]
    for system in systems:
        for turns in (1, 2, 3):
            conversation = _conversation(turns, system=system)
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


def _conversation(turns: int, system: str | None = None, marks: bool = False) -> list[dict[str, str]]:
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

    msgs: list[dict[str, str]] = [{"role": "system", "content": text("system", 0) if marks else system}] \
        if system is not None else []
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


def _turns(template, date_mark: Callable[[str], str]) -> tuple[str, list[str], list[str]]:
    """(generation prompt, first_turn, next_turn). The generation prompt is what the one-turn
    rendering has beyond what the two-turn one repeats of it: nothing for most templates, while
    DeepSeek-R1-Distill opens the answer with "<｜Assistant｜><think>\\n" but renders an earlier
    answer as "<｜Assistant｜>" and its content, so its "<think>\\n" only ever ends the prompt."""
    one = _conversation(1, marks=True)
    two = _conversation(2, marks=True)
    before = template.render(one, add_generation_prompt=True, strftime_now=date_mark)
    after = template.render(two, add_generation_prompt=True, strftime_now=date_mark)
    shared = len(os.path.commonprefix([before, after]))
    generation_prompt = before[shared:]
    if not after.endswith(generation_prompt) or _MARK_RE.search(generation_prompt):
        raise ValueError("a later turn changes the text of the earlier ones")
    end = len(after) - len(generation_prompt)
    return generation_prompt, _split(before[:shared], one), _split(after[shared:end], two[1:])


def _first_turn_with_system(template, date_mark: Callable[[str], str], generation_prompt: str) -> list[str]:
    msgs = _conversation(1, system=_SYSTEM_TEXT, marks=True)
    text = template.render(msgs, add_generation_prompt=True, strftime_now=date_mark)
    if not text.endswith(generation_prompt):
        raise ValueError("the generation prompt differs with a system message")
    return _split(text[:len(text) - len(generation_prompt)], msgs)
