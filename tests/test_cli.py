"""The `nomoat` dispatcher: its version, and the install line when the converter's extra is missing."""

from __future__ import annotations

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


class _FailingModel:
    """A model whose answer fails (a ValueError, as a sampler's NaN logits raise) after `written`."""

    def __init__(self, written: str):
        self.written = written

    def stream(self, *args, **kwargs):
        yield type("Event", (), {"text": self.written})()
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
