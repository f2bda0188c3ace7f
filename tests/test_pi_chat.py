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


# `python -m pi_demo`, each answer slowed to a token per 0.1 s: a Ctrl-C then lands mid-answer.
SLOW_PI_DEMO = """
import sys, time
from nomoat.runtime.model import Model
stream_ids = Model.stream_ids
def slow(*args, **kwargs):
    for event in stream_ids(*args, **kwargs):
        time.sleep(0.1)
        yield event
Model.stream_ids = slow
from pi_demo.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def child_env() -> dict[str, str]:
    """This environment with pi_demo importable from the checkout (and what PYTHONPATH held kept)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def start_chat(bundle: Path, *flags: str, program: tuple[str, ...] = ("-m", "pi_demo")) -> Terminal:
    argv = [sys.executable, *program, "chat", str(bundle), "--temperature", "0", "--max-new-tokens", "12",
            "--threads", "1", *flags]
    term = Terminal(argv, env={**child_env(), "TERM": "dumb"}, cwd=str(REPO))
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


def test_a_line_longer_than_the_terminals_line_buffer_reaches_the_model_whole(terminal, bundle):
    """The terminal's own line editing keeps 4,095 bytes of a line and drops the rest without a word;
    readline has no such cap. The whole line overflows the tiny context: the error's count of tokens
    is the whole line's."""
    from nomoat.runtime import ContextOverflowError, Model

    text = " ".join(f"word{i}" for i in range(900))
    assert len(text.encode()) > 4095
    terminal.wait_until_reading()
    terminal.sendline(text)
    seen = terminal.expect(r"the prompt has (\d+) tokens and the bundle's context holds")
    terminal.expect(PROMPT)
    with pytest.raises(ContextOverflowError, match=r"the prompt has (\d+) tokens") as whole:
        Model.load(bundle, threads=1).chat().send(text, 12)
    assert seen[0] in str(whole.value)


def test_a_line_ending_in_a_backslash_continues_and_a_pasted_block_is_one_message(terminal, bundle):
    from nomoat.runtime import Model

    terminal.wait_until_reading()
    terminal.sendline("Tell me about the quick brown fox \\")
    terminal.expect(r"\n\.\.\. ")  # the continuation's prompt
    terminal.sendline("and the lazy dog.")
    seen = [stats_of(terminal.expect(STATS))]
    terminal.expect(PROMPT)
    terminal.wait_until_reading()
    # A paste as a terminal in bracketed-paste mode sends it: between ESC[200~ and ESC[201~, Enter as CR.
    terminal.send("\x1b[200~And Paris?\rAnd Rome?\x1b[201~\r")
    seen.append(stats_of(terminal.expect(STATS)))
    terminal.expect(PROMPT)
    terminal.sendline("/stats")
    assert stats_of(terminal.expect(STATS)) == seen[1]  # one answer each: no line was a message of its own
    chat = Model.load(bundle, threads=1).chat()
    expected = []
    for text in ("Tell me about the quick brown fox \nand the lazy dog.", "And Paris?\nAnd Rome?"):
        chat.send(text, 12, temperature=0)
        expected.append((chat.stats.prefill_tokens, chat.stats.cached_tokens, chat.stats.generated_tokens))
    assert seen == expected


def test_ctrl_c_mid_answer_says_the_turn_is_left_out_of_the_conversation(bundle):
    from nomoat.runtime import Model

    term = start_chat(bundle, "--max-new-tokens", "30", program=("-c", SLOW_PI_DEMO))
    try:
        term.sendline(TURNS[0])
        term.expect(re.escape(TURNS[0]) + r"\n\s*\S")  # the echo, then the answer's first characters
        term.send("\x03")
        term.expect(r"\n\[stopped: this message and the answer so far are left out of the conversation\]")
        term.expect(PROMPT)
        term.sendline(TURNS[1])
        prefilled, cached, _ = stats_of(term.expect(STATS, timeout=120))
    finally:
        term.close()
    chat = Model.load(bundle, threads=1).chat()
    chat.send(TURNS[1], 30, temperature=0)
    # The prompt is the new message alone, as in a new conversation: the stopped turn is not in it.
    assert prefilled + cached == chat.stats.prefill_tokens + chat.stats.cached_tokens


def test_pi_demo_chat_ends_quietly_when_its_reader_leaves(bundle):
    """`python -m pi_demo chat BUNDLE < questions | head -1`: as `nomoat chat`, the status of a program
    that SIGPIPE ended, and no traceback."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "pi_demo", "chat", str(bundle), "--max-new-tokens", "4",
                             "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(), cwd=str(REPO))
    proc.stdout.close()  # before the first answer is written
    proc.stdin.write(b"hi\nand again\n")
    proc.stdin.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in stderr, stderr  # 128 + SIGPIPE
