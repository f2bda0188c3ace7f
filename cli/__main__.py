"""The `nomoat` command: a thin dispatcher that imports each verb's module only when used."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from collections.abc import Callable

from . import __version__
from .help_format import DefaultsHelpFormatter

# verb -> (module, one-line help). Converter verbs need `pip install 'nomoat[convert]'`.
VERBS = {
    "convert": ("nomoat.converter.cli_convert", "turn a model (+ LoRA adapters) into a bundle for a device"),
    "targets": ("nomoat.converter.cli_targets", "list the device targets and their recipes"),
    "inspect": ("nomoat.converter.cli_inspect", "show a bundle's manifest, recipe, memory estimate and quality report"),
    "merge": ("nomoat.converter.cli_merge", "merge LoRA adapters into a model and write a Hugging Face folder (fp32)"),
    "generate": ("nomoat.runtime.cli_generate", "generate text from a bundle for one prompt"),
    "chat": ("nomoat.runtime.cli_chat", "chat with a bundle in the terminal"),
    "bench": ("nomoat.runtime.cli_bench", "measure prefill/decode speed and memory of a bundle, or compare several"),
    "deploy": ("nomoat.converter.cli_deploy", "copy a bundle to a phone (adb) or a board (ssh), check it there"),
}


# What the [convert] extra brings; a verb that reaches for one of them without it gets the install line.
CONVERT_EXTRA = {"torch", "transformers", "safetensors", "onnx", "onnx_ir", "gguf", "sentencepiece", "google",
                 "tqdm", "huggingface_hub"}


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _dispatch(sys.argv[1:] if argv is None else argv))


def run_command(command: Callable[[], int], prog: str = "nomoat") -> int:
    """command()'s exit status, ended as a shell expects where the command does not end itself: quietly
    when stdout's reader leaves, and on Ctrl-C. Shared with `python -m pi_demo`."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): said now, not as a traceback at the first answer
        print(f"{prog}: error: standard output is closed; give the command somewhere to write (e.g. >/dev/null)",
              file=sys.stderr)
        return 2
    if hasattr(sys.stdout, "reconfigure") and (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        # A terminal whose locale is not UTF-8 (Latin-1, ASCII): a character it cannot show would end the
        # answer with an encoding error, taken for a bad message; shown as "?" instead, as stderr does.
        sys.stdout.reconfigure(errors="replace")
    try:
        status = command()
        sys.stdout.flush()  # inside the try: a reader gone shows at the last flush too
        return status
    except BrokenPipeError:
        return _reader_gone()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EIO):
            raise
        # stdout a full disk (`> /dev/full`) or a terminal gone: one line, not a traceback
        print(f"{prog}: error: cannot write the output: {e.strerror}", file=sys.stderr)
        _drop_stdout()
        return 1
    except (KeyboardInterrupt, ImportError) as e:
        if not interrupted(e):
            raise
        # Ctrl-C where a verb does not stop on it itself (while its modules import, say): no traceback,
        # the shell's status for SIGINT, a newline after the terminal's echoed ^C.
        print(file=sys.stderr)
        return 128 + signal.SIGINT


def interrupted(error: BaseException) -> bool:
    """Is this Ctrl-C? Also when it came while a compiled module initialized (onnxruntime, as the
    model loads): pybind11 raises ImportError("initialization failed") from the KeyboardInterrupt,
    and a package's own __init__ may wrap that ImportError in another."""
    while isinstance(error, ImportError):
        error = error.__cause__ or error.__context__
    return isinstance(error, KeyboardInterrupt)


def _reader_gone() -> int:
    """stdout's reader left (`nomoat targets | head -1`): end quietly, as a program killed by SIGPIPE.

    Python ignores SIGPIPE, so the write raises instead; stdout goes to /dev/null so that the
    interpreter's own flush at exit does not print the error again.
    """
    _drop_stdout()
    return 128 + signal.SIGPIPE


def _drop_stdout() -> None:
    """What is left in stdout's buffer goes nowhere: the interpreter's flush at exit would fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _dispatch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nomoat", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nomoat {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_) in VERBS.items():
        sub.add_parser(verb, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        args = parser.parse_args(argv)  # prints help or the "invalid choice" error
        parser.print_help()
        return 2
    verb = argv[0]
    try:
        module = importlib.import_module(VERBS[verb][0])
    except ModuleNotFoundError as e:
        return _missing(verb, e)
    verb_parser = argparse.ArgumentParser(prog=f"nomoat {verb}", description=module.__doc__,
                                          formatter_class=DefaultsHelpFormatter)
    module.add_arguments(verb_parser)
    args = verb_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except ModuleNotFoundError as e:
        # The converter imports its heavy libraries when a stage needs them, not with the verb.
        if (e.name or "").split(".")[0] not in CONVERT_EXTRA:
            raise
        return _missing(verb, e)


def _missing(verb: str, error: ModuleNotFoundError) -> int:
    print(f"nomoat {verb}: missing dependency {error.name!r}. The converter needs the extra: "
          "pip install 'nomoat[convert]' --extra-index-url https://download.pytorch.org/whl/cpu "
          "(until nomoat is on PyPI: '.[convert]' in its checkout, README \"Install\")", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
