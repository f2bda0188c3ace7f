"""The runtime on the Pythons a device may have besides the 3.11 nomoat is developed on.

Raspberry Pi OS bookworm ships 3.11 (`nox -s pi` runs that), but Raspberry Pi OS and Debian
trixie ship 3.13, Ubuntu 24.04 and Termux on Android 3.12 or newer. For each such interpreter
found on this machine (on PATH, under pyenv, or listed in $NOMOAT_PYTHONS), a fresh venv gets
this checkout's wheel and only the runtime's dependencies, at the versions installed here, so any
difference is the interpreter's. There the real model's int4 bundle (converted here by the
converter on 3.11) must give this interpreter's greedy tokens and logits, `nomoat generate` must
answer, `nomoat convert` must name the missing extra, and `pi_demo serve` must answer an OpenAI
client with the same text.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import converter_fingerprint, is_current, stamp_of
from checkout_wheel import build_wheel
from real_model import smollm2_gguf_path
from test_pi_qemu import PROMPTS, RUNTIME_DEPS, TOKENS, _free_port, _wait_for_line

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "pythons"
VERSIONS = ("3.12", "3.13")


def _interpreter(version: str) -> str | None:
    """An interpreter of that version that runs: from $NOMOAT_PYTHONS, PATH or pyenv's versions."""
    listed = [p for p in os.environ.get("NOMOAT_PYTHONS", "").split(os.pathsep) if p]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [*listed, shutil.which(f"python{version}"),
                  *sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"), reverse=True)]
    for exe in filter(None, candidates):
        # A pyenv shim exists for every version but runs only the active ones: ask the interpreter.
        probe = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return exe
    return None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1800, **kw)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def wheel() -> Path:
    return build_wheel(BUILD / "dist")


@pytest.fixture(scope="module")
def bundle() -> Path:
    """SmolLM2's int4 bundle for a Pi 5, converted on this interpreter; reused while nothing changed."""
    gguf = smollm2_gguf_path()
    args = ["--target", "rpi5"]
    path, fingerprint = BUILD / "rpi5", converter_fingerprint(str(gguf), str(args))
    if not is_current(path, fingerprint):
        _run([sys.executable, "-m", "nomoat", "convert", "--model", gguf, *args, "--out", path,
              "--skip-verify", "--force", "--quiet"])
        stamp_of(path).write_text(fingerprint)
    return path


@pytest.fixture(scope="module", params=VERSIONS)
def venv(request, wheel) -> Path:
    """A fresh venv of that Python with the wheel and the runtime's dependencies (this machine's versions)."""
    exe = _interpreter(request.param)
    if exe is None:
        pytest.skip(f"no Python {request.param} here (on PATH, under pyenv, or in $NOMOAT_PYTHONS)")
    env = BUILD / f"venv-{request.param}"
    shutil.rmtree(env, ignore_errors=True)
    _run([exe, "-m", "venv", env])
    constraints = BUILD / "constraints.txt"
    constraints.write_text("".join(f"{p}=={importlib.metadata.version(p)}\n" for p in RUNTIME_DEPS))
    _run([env / "bin" / "python", "-m", "pip", "install", "-q", "--only-binary=:all:", "-c", constraints,
          wheel, "openai"])
    return env


def test_only_the_runtime_is_installed(venv):
    listed = json.loads(_run([venv / "bin" / "python", "-m", "pip", "list", "--format=json"]).stdout)
    installed = {p["name"].lower(): p["version"] for p in listed}
    for dep in RUNTIME_DEPS:
        assert installed[dep] == importlib.metadata.version(dep)
    assert not {"torch", "transformers", "onnx", "gguf"} & set(installed)


def test_greedy_tokens_and_logits_match_this_interpreters(venv, bundle, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    guest = str(REPO / "tests" / "pi_guest.py")
    here, there = tmp_path / "here.npz", tmp_path / "there.npz"
    # The same machine and the same ONNX Runtime kernels: only the interpreter differs.
    _run([sys.executable, guest, bundle, prompts, TOKENS, here, "--lookup", "8"])
    _run([venv / "bin" / "python", guest, bundle, prompts, TOKENS, there, "--reference", here, "--lookup", "8"])
    a, b = np.load(here), np.load(there)
    for i in range(len(PROMPTS)):
        assert a[f"prompt{i}"].tolist() == b[f"prompt{i}"].tolist()
        assert a[f"greedy{i}"].tolist() == b[f"greedy{i}"].tolist()
        np.testing.assert_allclose(a[f"logits{i}"], b[f"logits{i}"], atol=1e-4)
    assert a["lookup0"].tolist() == b["lookup0"].tolist()
    assert b["lookup0_drafted_accepted"].tolist() == a["lookup0_drafted_accepted"].tolist()


def test_cli_generates_and_names_the_missing_converter(venv, bundle, tmp_path):
    nomoat = venv / "bin" / "nomoat"
    answer = _run([nomoat, "generate", bundle, "--prompt", PROMPTS[0], "--max-new-tokens", "16"]).stdout
    assert "Paris" in answer
    refused = subprocess.run([nomoat, "convert", "--model", str(smollm2_gguf_path()), "--target", "rpi5",
                              "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    assert "pip install 'nomoat[convert]'" in refused.stderr and "Traceback" not in refused.stderr


def test_server_answers_an_openai_client(venv, bundle, tmp_path):
    # pi_demo is not in the wheel (it is the Pi's demo app, copied next to the bundle as on a Pi).
    shutil.copytree(REPO / "pi_demo", tmp_path / "pi_demo", ignore=shutil.ignore_patterns("__pycache__"))
    port = _free_port()
    server = subprocess.Popen([str(venv / "bin" / "python"), "-m", "pi_demo", "serve", str(bundle),
                               "--port", str(port)], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(server, "serving", timeout=300)
        client = _run([venv / "bin" / "python", "-c", _CLIENT, str(port), bundle.name, PROMPTS[0]]).stdout
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0
    whole, streamed = json.loads(client)
    expected = _run([venv / "bin" / "nomoat", "generate", bundle, "--prompt", PROMPTS[0], "--max-new-tokens",
                     "16"]).stdout.strip()
    assert whole.strip() == expected and "Paris" in whole
    # The streamed request finds the first one's tokens in the KV cache and computes only the
    # prompt's last token anew, a one-row matmul whose int8 activations round unlike the batched
    # prefill's: at a near-tie the greedy path may part after the answer itself (see test_pi_qemu).
    assert streamed.startswith(whole[:whole.index("Paris") + len("Paris")]), (streamed, whole)


# The openai client itself, on the interpreter under test: a whole and a streamed greedy answer.
_CLIENT = """
import json, sys, openai
client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none", max_retries=0)
messages = [{"role": "user", "content": sys.argv[3]}]
whole = client.chat.completions.create(model=sys.argv[2], messages=messages, max_tokens=16, temperature=0)
chunks = client.chat.completions.create(model=sys.argv[2], messages=messages, max_tokens=16, temperature=0, stream=True)
print(json.dumps([whole.choices[0].message.content, "".join(c.choices[0].delta.content or "" for c in chunks)]))
"""
