"""Chat messages as callers pass them: checked and normalized without importing Jinja.

Kept apart from chat_template.py so that the model module, which needs these for every chat call,
does not import Jinja (~3 MB of resident memory) in processes that never render a template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def validate_messages(messages: object) -> None:
    """Raise ValueError unless ``messages`` is a list of {'role': str, 'content': str, ...} dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{index}] has no {key!r} key")
            if not isinstance(message[key], str):
                raise ValueError(
                    f"messages[{index}][{key!r}] must be a string, got {type(message[key]).__name__}"
                )


def as_messages(
    prompt_or_messages: str | Sequence[Mapping[str, Any]], system: str | None = None
) -> list[dict[str, Any]]:
    """Normalize what a user passes to ``stream``/``chat``: a plain string becomes one user message;
    ``system``, if given, becomes a leading system message. Returns new dicts (the caller's are
    never modified)."""
    if isinstance(prompt_or_messages, str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt_or_messages}]
    else:
        validate_messages(prompt_or_messages)
        if not prompt_or_messages:  # the model would answer a conversation of nothing (the template's header)
            raise ValueError("messages is empty: give at least one {'role': ..., 'content': ...} message")
        messages = [dict(message) for message in prompt_or_messages]
    if system is not None:
        if not isinstance(system, str):
            raise ValueError(f"system must be a string, got {type(system).__name__}")
        if messages and messages[0]["role"] == "system":
            raise ValueError("system= was given but the messages already start with a system message")
        messages.insert(0, {"role": "system", "content": system})
    return messages
