"""Chat with a bundle in the terminal. Answers stream as they are generated; the conversation
keeps its KV cache, so each turn only prefills the new message.
Commands: /reset (new conversation), /system TEXT (set the system message and reset),
/stats (speed of the last answer), /quit. Ctrl-C stops an answer; Ctrl-D quits."""

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
    from .errors import BundleError, ContextOverflowError
    from .model import check_utf8

    if sys.stdin is None:  # started with stdin closed (`<&-`): checked before minutes of loading
        print("nomoat chat: error: standard input is closed, so there is nothing to read messages from; "
              "give it a terminal or a pipe, or use `nomoat generate BUNDLE --prompt TEXT`", file=sys.stderr)
        return 2
    if args.system is not None:
        try:
            check_utf8(args.system, "the system message")
        except ValueError as e:
            print(f"nomoat chat: error: {e}", file=sys.stderr)
            return 2
    # A line that is not UTF-8 reaches the runtime's check, which refuses that message only.
    tolerate_undecodable_stdin()
    try:
        if refusal := lookup_refusal(args):
            print(f"nomoat chat: error: {refusal}", file=sys.stderr)
            return 2
        model = load_model("chat", args)
    except BundleError as e:
        print(f"nomoat chat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading: as Ctrl-C in `nomoat generate`
        print(file=sys.stderr)
        return 128 + signal.SIGINT
    if args.grammar is not None:
        try:
            model.constraint(args.grammar)  # a grammar this bundle's tokenizer cannot take: said once, not every turn
        except ValueError as e:
            print(f"nomoat chat: error: {e}", file=sys.stderr)
            return 1
    chat = model.chat(system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("nomoat chat — /reset, /system TEXT, /stats, /quit; Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            chat.reset(system=args.system)
            print("[conversation reset]", file=sys.stderr)
            continue
        command, *rest = text.split(None, 1)  # "/systemd keeps restarting" is a message, not /system
        if command == "/system":
            try:
                check_utf8(rest[0] if rest else "", "the system message")
            except ValueError as e:
                print(f"[{e}; the system message is unchanged]", file=sys.stderr)
                continue
            args.system = rest[0] if rest else None
            chat.reset(system=args.system)
            print("[system message set; conversation reset]", file=sys.stderr)
            continue
        if text == "/stats":
            print(_stats_line(chat.stats), file=sys.stderr)
            continue
        answer = AnswerWriter()
        try:
            for event in chat.stream(text, args.max_new_tokens, prompt_lookup=args.prompt_lookup,
                                     **sampling_kwargs(args)):
                answer.write(event.text)
            sys.stdout.write("\n")
            sys.stdout.flush()
            if interactive:
                print(_stats_line(chat.stats), file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except ContextOverflowError as e:
            print(f"\n[{e} Type /reset to start over.]", file=sys.stderr)
        except ValueError as e:  # this message cannot be a prompt (not UTF-8 text): refused, the chat goes on
            print(f"{answer.line_break()}[{e}]", file=sys.stderr)
        except Exception as e:  # the template refused the conversation (e.g. a system message): the turn only
            if not is_template_error(e):
                raise
            hint = "; /system alone drops the system message" if args.system is not None else ""
            print(f"{answer.line_break()}[the chat template failed: {e}{hint}]", file=sys.stderr)
