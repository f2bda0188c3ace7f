"""python -m pi_demo {chat,serve} BUNDLE ...: chat in the terminal, or serve OpenAI's API over HTTP."""

from __future__ import annotations

import argparse
import importlib
import sys

from nomoat.__main__ import run_command
from nomoat.help_format import DefaultsHelpFormatter

# command -> (module with add_arguments/run, one-line help). The chat is the runtime's own
# `nomoat chat`: one REPL to maintain, and the Pi gets every fix made to it.
COMMANDS = {
    "chat": ("nomoat.runtime.cli_chat", "chat with a bundle in the terminal (streams; /reset, /system, /stats)"),
    "serve": ("pi_demo.serve", "serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, ...)"),
}


def main(argv: list[str] | None = None) -> int:
    # As `nomoat`: `pi_demo chat ... | head -1` ends quietly, Ctrl-C while the model loads with 130.
    return run_command(lambda: _dispatch(argv), prog="pi_demo")


def _dispatch(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pi_demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{chat,serve}")
    for name, (module_name, help_) in COMMANDS.items():
        module = importlib.import_module(module_name)  # cheap (~0.1 s): nothing loads a model before run()
        command = sub.add_parser(name, help=help_, description=module.__doc__,
                                 formatter_class=DefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run, command_name=f"pi_demo {name}")  # its errors' prefix
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
