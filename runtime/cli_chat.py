"""Chat with a bundle in the terminal. Answers stream as they are generated; the conversation
keeps its KV cache, so each turn only prefills the new message.
Commands: /reset (new conversation), /system TEXT (set the system message and reset; alone: remove
it), /stats (speed of the last answer), /quit. A line that ends in a backslash continues on the next
(the backslash dropped, the line break kept), as in llama.cpp; in a terminal a multi-line paste is
one message too. Ctrl-C stops an answer; Ctrl-D quits."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .cli_generate import (
    AnswerWriter,
    add_sampling_arguments,
    drafts_note,
    is_template_error,
    load_model,
    lookup_refusal,
    sampling_kwargs,
    tolerate_undecodable_stdin,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder written by `nomoat convert`")
    p.add_argument("--system", default=None, help="system message")
    add_sampling_arguments(p)


def _stats_line(stats) -> str:
    return (f"[{stats.prefill_tokens} new prompt tokens ({stats.cached_tokens} cached) @ "
            f"{stats.prefill_tokens_per_second:.0f} tok/s, {stats.generated_tokens} tokens @ "
            f"{stats.decode_tokens_per_second:.1f} tok/s{drafts_note(stats)}]")


def run(args: argparse.Namespace) -> int:
    from .errors import BundleError
    from .model import check_utf8

    name = getattr(args, "command_name", "nomoat chat")  # "pi_demo chat" under `python -m pi_demo`
    if sys.stdin is None:  # started with stdin closed (`<&-`): checked before minutes of loading
        print(f"{name}: error: standard input is closed, so there is nothing to read messages from; "
              "give it a terminal or a pipe, or use `nomoat generate BUNDLE --prompt TEXT`", file=sys.stderr)
        return 2
    if args.system is not None:
        try:
            check_utf8(args.system, "the system message")
        except ValueError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            return 2
    # A line that is not UTF-8 reaches the runtime's check, which refuses that message only.
    tolerate_undecodable_stdin()
    try:
        if refusal := lookup_refusal(args):
            print(f"{name}: error: {refusal}", file=sys.stderr)
            return 2
        model = load_model(name, args)
    except BundleError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading: as Ctrl-C in `nomoat generate`
        print(file=sys.stderr)
        return 128 + signal.SIGINT
    if args.grammar is not None:
        try:
            model.constraint(args.grammar)  # a grammar this bundle's tokenizer cannot take: said once, not every turn
        except ValueError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            return 1
    return converse(model.chat(system=args.system), args, name)


def converse(chat, args: argparse.Namespace, name: str) -> int:
    """Read messages and answer them until /quit or the end of input."""
    interactive = sys.stdin.isatty()
    if interactive:
        use_readline()
        print(f"{name} — /reset, /system TEXT, /stats, /quit; end a line with \\ to continue on the next; "
              "Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            message = read_message("> " if interactive else "", "... " if interactive else "")
        except KeyboardInterrupt:  # at the prompt: a new prompt (what was typed of the message is dropped)
            print(file=sys.stderr)
            continue
        if message is None:
            return 0
        text = message.strip()
        if text in ("/quit", "/exit"):
            return 0
        if text and not slash_command(text, chat, args):
            answer(text, chat, args, interactive)


def use_readline() -> None:
    """Make input() read through readline, as importing it does: no cap on a line's length (the terminal's
    own line editing keeps 4,095 bytes and drops the rest without a word), arrow keys that move instead of
    typing ^[[A, this session's history, and a multi-line paste as one message (bracketed paste, readline
    8.1+). Some Pythons are built without it: those read as before."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


def read_message(prompt: str, continuation: str) -> str | None:
    """The next message: a line, or lines joined while each ends in a backslash (its last character;
    dropped, the line break kept), as llama.cpp's interactive mode takes them. None at the end of
    input; the end of input after a backslash ends the message there."""
    lines: list[str] = []
    while True:
        try:
            line = input(continuation if lines else prompt)
        except EOFError:
            return "\n".join(lines) if lines else None
        if not line.endswith("\\"):
            return "\n".join([*lines, line])
        lines.append(line[:-1])


def slash_command(text: str, chat, args: argparse.Namespace) -> bool:
    """Carry out text if it is a command (/reset, /system, /stats); False if it is a message."""
    if text == "/reset":
        chat.reset(system=args.system)
        print("[conversation reset]", file=sys.stderr)
        return True
    command, *rest = text.split(None, 1)  # "/systemd keeps restarting" is a message, not /system
    if command == "/system":
        set_system(rest[0] if rest else None, chat, args)
        return True
    if text == "/stats":
        print(_stats_line(chat.stats), file=sys.stderr)
        return True
    return False


def set_system(system: str | None, chat, args: argparse.Namespace) -> None:
    """/system TEXT: a new conversation with that system message; /system alone: without one."""
    from .model import check_utf8

    try:
        check_utf8(system or "", "the system message")
    except ValueError as e:
        print(f"[{e}; the system message is unchanged]", file=sys.stderr)
        return
    args.system = system
    chat.reset(system=system)
    print(f"[system message {'set' if system is not None else 'removed'}; conversation reset]", file=sys.stderr)


def answer(text: str, chat, args: argparse.Namespace, interactive: bool) -> None:
    """Stream the answer to one message; a failure or Ctrl-C ends this turn only, with a note why."""
    from .errors import ContextOverflowError

    writer = AnswerWriter()
    whole = False  # the answer came to its end: Chat keeps the turn even if Ctrl-C comes now
    try:
        end = None
        for event in chat.stream(text, args.max_new_tokens, prompt_lookup=args.prompt_lookup,
                                 **sampling_kwargs(args)):
            writer.write(event.text)
            whole = event.finish_reason is not None
            end = event if whole else end
        sys.stdout.write("\n")
        sys.stdout.flush()
        if interactive:
            print(_stats_line(chat.stats), file=sys.stderr)
        if end is not None and end.stats is not None and end.stats.context_full:
            # Said now, not at the next message's refusal: the answer may have stopped mid-sentence.
            cut = ", which cut this answer off" if end.finish_reason == "length" else ""
            print(f"[the conversation filled the bundle's context of {chat.model.max_context} tokens{cut}: "
                  "no next message fits. Type /reset to start over.]", file=sys.stderr)
    except KeyboardInterrupt:
        # Chat drops a turn cut short, so that the KV cache and the history agree: say so, since the
        # half answer stays on the screen.
        print("\n[stopped; the answer is whole and stays in the conversation]" if whole else
              "\n[stopped: this message and the answer so far are left out of the conversation]", file=sys.stderr)
    except ContextOverflowError as e:
        print(f"\n[{e} Type /reset to start over.]", file=sys.stderr)
    except ValueError as e:  # this message cannot be a prompt (not UTF-8 text): refused, the chat goes on
        print(f"{writer.line_break()}[{e}]", file=sys.stderr)
    except Exception as e:  # the template refused the conversation (e.g. a system message): the turn only
        if not is_template_error(e):
            raise
        # A template that refuses a system message says so in its own words ("roles must alternate"):
        # name the likely cause and the way out.
        hint = (" (this model's template may not accept a system message: /system alone drops it)"
                if args.system is not None else "")
        print(f"{writer.line_break()}[the chat template failed: {e}{hint}]", file=sys.stderr)
