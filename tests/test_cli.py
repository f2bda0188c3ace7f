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
    assert f"missing dependency '{missing}'" in err and "pip install 'nomoat[convert]'" in err
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
