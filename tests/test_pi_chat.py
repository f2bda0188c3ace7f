"""pi_demo chat, typed at through a pseudo-terminal: streaming, kept conversation, commands."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from pty_terminal import Terminal

REPO = Path(__file__).resolve().parents[1]
# The line printed after each answer (and by /stats).
STATS = r"\[(\d+) new prompt tokens \((\d+) cached\) @ \d+ tok/s, (\d+) tokens @ [\d.]+ tok/s\]"
PROMPT = "\n> "
TURNS = ("Tell me about the quick brown fox and the lazy dog, please.", "And Paris?")
REPEATING_TURNS = ("one two three one two three one two three", "one two three")  # prompt lookup finds drafts


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from tiny_models import tiny_fp32_bundle

    return tiny_fp32_bundle(tmp_path_factory, max_context=256)


def start_chat(bundle: Path, *flags: str) -> Terminal:
    argv = [sys.executable, "-m", "pi_demo", "chat", str(bundle), "--temperature", "0", "--max-new-tokens", "12",
            "--threads", "1", *flags]
    term = Terminal(argv, env={**os.environ, "PYTHONPATH": str(REPO), "TERM": "dumb"}, cwd=str(REPO))
    term.expect(r"/reset, /system TEXT, /stats, /quit", timeout=120)
    term.expect(PROMPT)
    return term


@pytest.fixture
def terminal(bundle):
    term = start_chat(bundle)
    yield term
    term.close()


def stats_of(match: re.Match) -> tuple[int, int, int]:
    return int(match[1]), int(match[2]), int(match[3])  # prefilled, cached, generated


def test_second_turn_prefills_only_its_new_tokens(terminal, bundle):
    from nomoat.runtime import Model

    seen = []
    for text in TURNS:
        terminal.sendline(text)
        seen.append(stats_of(terminal.expect(STATS)))  # printed after every answer
        terminal.expect(PROMPT)
    terminal.sendline("/stats")
    assert stats_of(terminal.expect(STATS)) == seen[1]

    # The same conversation in-process gives the counts the REPL printed ...
    model = Model.load(bundle, threads=1)
    chat = model.chat()
    expected, before = [], []
    for text in TURNS:
        before.append(chat._text)  # the conversation as the model has seen it so far
        chat.send(text, 12, temperature=0)
        s = model.last_stats
        expected.append((s.prefill_tokens, s.cached_tokens, s.generated_tokens))
    assert seen == expected
    # ... and they say: the whole first turn (prompt + answer) came from the cache, and only
    # the text the template wraps around the new message was run.
    (prefill1, cached1, generated1), (prefill2, cached2, _) = seen
    assert cached1 == 0 and cached2 >= prefill1 + generated1 - 1
    new_turn = model.render(chat.messages[:-1])[len(before[1]):]
    assert prefill2 <= len(model.encode(new_turn, add_bos=False)) + 1 < prefill1


def test_commands_and_ctrl_c_at_the_prompt(terminal):
    terminal.sendline(TURNS[0])
    first = stats_of(terminal.expect(STATS))
    terminal.expect(PROMPT)
    terminal.sendline("/system You are terse.")
    terminal.expect(r"\[system message set; conversation reset\]")
    terminal.expect(PROMPT)
    terminal.sendline(TURNS[0])
    with_system = stats_of(terminal.expect(STATS))
    assert with_system[0] + with_system[1] > first[0]  # the system message is in the prompt now
    terminal.expect(PROMPT)
    terminal.sendline("/reset")
    terminal.expect(r"\[conversation reset\]")
    terminal.expect(PROMPT)
    terminal.wait_until_reading()  # a Ctrl-C before the read blocks is only seen after the next line
    terminal.send("\x03")  # Ctrl-C while waiting for input: a new prompt, not the end of the program
    terminal.expect(PROMPT)
    terminal.sendline(TURNS[1])
    terminal.expect(STATS)
    terminal.sendline("/quit")
    assert terminal.wait() == 0


def test_prompt_lookup_drafts_from_the_conversation_and_says_how_many_drafts_were_kept(bundle):
    from nomoat.runtime import Model

    term = start_chat(bundle, "--prompt-lookup", "4")
    try:
        seen = []
        for text in REPEATING_TURNS:
            term.sendline(text)
            m = term.expect(r", (\d+)/(\d+) drafted tokens accepted\]")
            seen.append((int(m[1]), int(m[2])))
            term.expect(PROMPT)
    finally:
        term.close()
    chat = Model.load(bundle, threads=1).chat()
    expected = []
    for text in REPEATING_TURNS:
        chat.send(text, 12, temperature=0, prompt_lookup=4)
        expected.append((chat.stats.accepted_tokens, chat.stats.drafted_tokens))
    assert seen == expected and all(drafted > 0 for _, drafted in seen)


def test_a_message_that_starts_like_a_command_is_a_message(terminal, bundle):
    from nomoat.runtime import Model

    terminal.sendline(TURNS[0])
    terminal.expect(STATS)
    terminal.expect(PROMPT)
    terminal.sendline("/systemd keeps restarting nginx")
    match = terminal.expect(STATS + r"|\[system message set")
    assert match[1] is not None, "/systemd was taken for /system"
    chat = Model.load(bundle, threads=1).chat()
    for text in (TURNS[0], "/systemd keeps restarting nginx"):
        chat.send(text, 12, temperature=0)
    # an answer in the same conversation: the first turn came from the cache
    assert stats_of(match) == (chat.stats.prefill_tokens, chat.stats.cached_tokens, chat.stats.generated_tokens)
    assert stats_of(match)[1] > 0
