"""The `nomoat` dispatcher: its version, and the install line when the converter's extra is missing."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import nomoat
import pytest
from nomoat.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"nomoat {nomoat.__version__}\n"
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert nomoat.__version__ == declared


@pytest.mark.parametrize("missing", ["gguf", "torch"])
def test_a_converter_library_missing_at_run_time_is_the_install_line(tmp_path, monkeypatch, capsys, missing):
    """The verb's module imports, but its stages reach for gguf or torch later: without the extra that
    was a traceback."""
    from tiny_models import make_tiny_hf_dir

    if missing == "gguf":
        model = tmp_path / "m.gguf"
        model.write_bytes(b"GGUF")
    else:
        model = make_tiny_hf_dir(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, missing, None)  # `import gguf` now raises ModuleNotFoundError
    code = main(["convert", "--model", str(model), "--target", "rpi5", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"missing dependency '{missing}'" in err and "pip install 'nomoat[convert]'" in err and "'.[convert]'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def reader_gone(*argv: str) -> tuple[int, str]:
    """Run `nomoat ARGV | head -c 0`: the pipe's reader is gone before the output is written."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "nomoat", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command has started writing: its writes meet a closed pipe
    stderr = proc.stderr.read()
    return proc.wait(timeout=120), stderr


@pytest.mark.parametrize("verb", [["targets"], ["targets", "--json"]])
def test_a_reader_that_leaves_early_ends_the_command_quietly(verb):
    status, stderr = reader_gone(*verb)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert status == 141, (status, stderr)  # as a program killed by SIGPIPE: 128 + 13


def _shell(command: str):
    import subprocess

    return subprocess.run(f"{sys.executable} -m nomoat {command}", shell=True, stderr=subprocess.PIPE, timeout=120)


def test_closed_streams_and_a_full_disk_are_one_line_errors():
    """`>&-` and `> /dev/full` ended in tracebacks (AttributeError on None, OSError)."""
    assert _shell("targets > /dev/null").returncode == 0  # the baseline: stdout open and writable
    result = _shell("targets >&-")
    assert result.returncode == 2
    assert result.stderr == b"nomoat: error: standard output is closed; give the command somewhere to write " \
                            b"(e.g. >/dev/null)\n"
    result = _shell("targets > /dev/full")
    assert result.returncode == 1
    assert result.stderr == b"nomoat: error: cannot write the output: No space left on device\n"


def test_generate_from_a_closed_stdin_says_so(tmp_path):
    result = _shell(f"generate {tmp_path} --prompt - <&-")
    assert result.returncode == 2
    assert b"--prompt - reads the prompt from standard input, which is closed" in result.stderr


def test_an_answer_on_a_terminal_that_is_not_utf8_is_whole(monkeypatch, capsys):
    """Under a Latin-1 (or ASCII) locale a character the terminal cannot show ended the answer with an
    encoding error, taken for a bad message; now it shows as '?' and the answer goes on."""
    import subprocess

    code = ("import sys; from nomoat.__main__ import run_command; "
            "sys.exit(run_command(lambda: print('caf\u00e9 \u304a end') or 0))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                            env={**__import__("os").environ, "PYTHONIOENCODING": "latin-1"})
    assert result.returncode == 0 and result.stdout == "café ? end\n".encode("latin-1"), result


class _FailingModel:
    """A model whose answer fails (a ValueError, as a sampler's NaN logits raise) after `written`."""

    def __init__(self, written: str):
        self.written = written

    def stream(self, *args, **kwargs):
        yield type("Event", (), {"text": self.written, "finish_reason": None})()
        raise ValueError("cannot sample: the largest logit is nan (NaN or infinite logits)")

    def chat(self, system=None):
        return type("Chat", (), {"stream": lambda _, *args, **kwargs: self.stream()})()


@pytest.mark.parametrize("verb", ["generate", "chat"])
@pytest.mark.parametrize("written, gap", [("Once upon", "\n"), ("Once upon\n", ""), ("", "")])
def test_an_error_after_part_of_an_answer_starts_on_a_line_of_its_own(verb, written, gap, monkeypatch):
    """stdout and stderr on one terminal: the error was glued to the answer's unfinished line."""
    import argparse
    import io

    from nomoat.runtime import cli_chat, cli_generate

    terminal = io.StringIO()  # both streams, as a terminal shows them
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdin", io.StringIO("tell a story\n"))
    module = cli_generate if verb == "generate" else cli_chat
    monkeypatch.setattr(module, "load_model", lambda verb, args: _FailingModel(written))
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(["bundle", *(["--prompt", "tell a story"] if verb == "generate" else [])])
    module.run(args)
    error = ("nomoat generate: error: " if verb == "generate" else "[") + "cannot sample"
    assert terminal.getvalue().startswith(written + gap + error), terminal.getvalue()


class _RecordingModel:
    """A model whose chat records what it is sent and the system message of each reset."""

    def __init__(self):
        self.sent, self.systems = [], []

    def chat(self, system=None):
        model = self

        class Chat:
            def reset(self, system=None):
                model.systems.append(system)

            def stream(self, text, *args, **kwargs):
                model.sent.append(text)
                yield type("Event", (), {"text": "ok", "finish_reason": "stop", "stats": None})()

        return Chat()


def _chat_reading(stdin: str, monkeypatch, capsys) -> tuple[_RecordingModel, str]:
    """`nomoat chat bundle` in-process with stdin piped: the model, and what went to stderr."""
    import argparse
    import io

    from nomoat.runtime import cli_chat

    model = _RecordingModel()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.setattr(cli_chat, "load_model", lambda name, args: model)
    parser = argparse.ArgumentParser()
    cli_chat.add_arguments(parser)
    assert cli_chat.run(parser.parse_args(["bundle"])) == 0
    return model, capsys.readouterr().err


def test_a_piped_line_ending_in_a_backslash_continues_the_message(monkeypatch, capsys):
    """llama.cpp's rule, from a pipe as in a terminal: the backslash dropped, the line break kept; a
    backslash followed by anything (a space) is text; the end of input after one ends the message."""
    model, _ = _chat_reading("one \\\ntwo\nC:\\dir\\ \n/system Be\\\nterse.\nlast\\", monkeypatch, capsys)
    assert model.sent == ["one \ntwo", "C:\\dir\\", "last"]
    assert model.systems == ["Be\nterse."]


def test_system_alone_says_the_system_message_is_removed(monkeypatch, capsys):
    model, err = _chat_reading("/system Be terse.\n/system\n", monkeypatch, capsys)
    assert model.systems == ["Be terse.", None]
    assert err.splitlines() == ["[system message set; conversation reset]",
                                "[system message removed; conversation reset]"]


def _pi_demo_main():
    """`python -m pi_demo`'s main (pi_demo is a folder copied next to the bundle, not an installed package)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from pi_demo.__main__ import main as pi_demo

    return pi_demo


def test_pi_demo_chat_names_itself_in_its_errors(tmp_path, capsys):
    assert _pi_demo_main()(["chat", str(tmp_path / "no-bundle")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pi_demo chat: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("command", [["nomoat", "chat"], ["nomoat", "generate"], ["pi_demo", "chat"],
                                     ["pi_demo", "serve"]])
def test_help_says_the_bundles_default_in_words_not_none(command, capsys):
    with pytest.raises(SystemExit):
        (main if command[0] == "nomoat" else _pi_demo_main())([command[1], "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"default: [^()]*\) \(default", text) is None, text  # said in words, then "(default: None)"
    assert "None =" not in text, text
    if command[1] == "serve":
        return
    for flag in ("--top-k", "--top-p", "--min-p", "--repetition-penalty", "--frequency-penalty", "--seed"):
        help_ = re.search(re.escape(flag) + r" [A-Z_]+ (.*?)(?= --[a-z]|$)", text)[1]
        assert "default: the bundle's" in help_ and "None" not in help_, (flag, help_)
