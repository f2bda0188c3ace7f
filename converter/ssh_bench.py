"""Benchmark a deployed bundle on a board over ssh, with `nomoat bench`'s own harness.

runtime/bench_worker runs on the board, started by ssh, and this computer drives it with the same
JSON lines as a local worker (the worker's seam: only the argv that starts it knows where it
runs), so the rounds, the summary and the table are `nomoat bench`'s, measured there: the
machine line and the peak RSS are the board's. The board needs nomoat's runtime (`pip install
nomoat` for the Python that --remote-python names).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .deploy import DeployError
from .deploy_bench import DEFAULT_TIMEOUT_S
from .ssh import SshHost
from .transport import TransportError, last_line

DEFAULT_REMOTE_PYTHON = "python3"
# The README's Raspberry Pi steps install nomoat there (Raspberry Pi OS refuses `pip install` into its own
# Python: PEP 668); taken, when the board has it, before the default.
README_VENV_PYTHON = "~/nomoat-venv/bin/python"


def remote_python(board: SshHost, given: str | None) -> str:
    """--remote-python, or the README's venv's Python when the board has one, else python3."""
    if given is not None:
        return given
    venv = README_VENV_PYTHON.replace("~", "$HOME", 1)
    return README_VENV_PYTHON if board.shell(f'test -x "{venv}"', timeout=60).status == 0 else DEFAULT_REMOTE_PYTHON
WORKER_MODULE = "nomoat.runtime.bench_worker"


def check_remote_runtime(board: SshHost, python: str) -> None:
    """Refuse before deploying when the board's Python cannot run the benchmark worker, or runs
    another nomoat release than this one (the worker's messages are only checked to match their own)."""
    from importlib.metadata import version

    # `python` is a command, not a path (like rsync's --rsync-path): "~/venv/bin/python" or "nice python3" work.
    probe = f"import importlib.metadata as m, {WORKER_MODULE}, onnxruntime; print(m.version('nomoat'))"
    reply = board.shell(f"{python} -c {shlex.quote(probe)}", timeout=120)
    if reply.status == 127:
        raise DeployError(f"{python!r} is not a command on {board.name}: install Python 3 there, or pass "
                          "--remote-python with the Python that has nomoat (e.g. ~/nomoat-venv/bin/python).")
    if reply.status != 0:
        raise DeployError(f"{python} on {board.name} cannot run nomoat's benchmark ({reply.error()}): "
                          f"install nomoat's wheel in a venv there (`pip wheel --no-deps -w dist .` here, then "
                          f"`python3 -m venv ~/nomoat-venv && ~/nomoat-venv/bin/pip install` the .whl there: "
                          f"README, \"Raspberry Pi\"; {README_VENV_PYTHON} is then found by itself), or pass "
                          "--remote-python with the Python that has it.")
    # stdout's last line: a wrapper or an environment manager may print a notice before it.
    here, there = version("nomoat"), last_line(reply.out)
    if there != here:
        raise DeployError(f"{board.name} has nomoat {there} and this computer {here}; install the same release "
                          f"on both (this checkout's wheel: `{python} -m pip install nomoat-{here}-py3-none-any.whl` "
                          "there) so the benchmark's messages match.")


def worker_argv(board: SshHost, python: str, options: dict[str, Any]) -> list[str]:
    """The ssh command that starts a bench worker on the board (exec: closing ssh ends the worker)."""
    from nomoat.runtime.bench_worker import local_worker_argv
    from nomoat.runtime.cli_bench import NOMOAT_ENGINE

    worker = local_worker_argv(NOMOAT_ENGINE, options, python="python")[1:]  # the module and its flags
    return board.command(f"exec {python} {shlex.join(worker)}")


def bench_over_ssh(board: SshHost, device_path: str, bundle: Path, prompt_tokens: int, new_tokens: int,
                   rounds: int, threads: int | None, python: str = DEFAULT_REMOTE_PYTHON,
                   progress: Callable[[str], None] | None = None, prompt_lookup: int = 0,
                   timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Measure the bundle deployed at device_path (a copy of the local `bundle`) on the board; the
    report `nomoat bench` prints, plus where it ran. prompt_lookup > 0 adds prompt-lookup decoding
    with up to that many drafts a pass, in rows of its own, alternating with plain decoding. A
    benchmark not finished within `timeout` seconds is given up, its workers killed on the board:
    ssh's keepalives end a board gone silent, not a worker hung on a board that still answers."""
    from nomoat.runtime.bench import synthetic_prompt_ids
    from nomoat.runtime.bench_worker import WorkerOverdue, WorkerProcess
    from nomoat.runtime.cli_bench import Config, measure_configs
    from nomoat.runtime.manifest import read_manifest

    say = progress or (lambda _msg: None)
    manifest = read_manifest(bundle, verify_files=False)
    # The prompt is cut here, from the local copy of the same tokenizer the board loads.
    prompt = synthetic_prompt_ids(bundle / manifest.tokenizer.tokenizer_file, prompt_tokens)
    lookups = [0, prompt_lookup] if prompt_lookup else [0]
    configs = [Config(threads, prompt_tokens, new_tokens, lookup) for lookup in lookups]
    deadline = time.monotonic() + timeout  # for every worker's every reply, and the bandwidth probe

    def start_worker(c: Config) -> WorkerProcess:
        # prompt_lookup only when asked: a board's older nomoat need not know the option.
        options = {"bundle": device_path, "threads": c.threads, "name": f"nomoat on {board.name}",
                   **({"prompt_lookup": c.prompt_lookup} if c.prompt_lookup else {})}
        return WorkerProcess(c.label, worker_argv(board, python, options), deadline=deadline,
                             stop_hung=lambda pid: stop_worker(board, pid, say))

    def board_bandwidth(threads: Sequence[int]) -> dict[int, float]:
        return read_bandwidth_over_ssh(board, python, threads, say, timeout=min(300.0, deadline - time.monotonic()))

    say(f"benchmarking on {board.name}: {rounds} rounds of {prompt_tokens}+{new_tokens} tokens "
        f"after 1 warm-up, with {python} there ...")
    try:
        report = measure_configs(configs, lambda _config: prompt, start_worker, rounds, warmup=1,
                                 probe=board_bandwidth)
    except WorkerOverdue as e:
        raise DeployError(f"the benchmark on {board.name} had not finished within {timeout:g} s: {e}\n"
                          "The board may be too slow for this many rounds, or the worker stuck (swapping, "
                          "out of memory): give it longer with --bench-timeout, or ask for fewer "
                          "--rounds/--new-tokens.") from None
    return {"bundle": device_path, "device_path": device_path, "host": board.name, **report}


def stop_worker(board: SshHost, pid: int, say: Callable[[str], None]) -> None:
    """Kill a bench worker left busy or hung on the board (after a deadline, Ctrl-C or an error): closing its
    ssh connection does not end a process that never reads or writes again. Only a bench worker: the pid may
    have been reused since it announced itself. A kill that fails is said, with what to do."""
    pid = int(pid)
    say(f"stopping the benchmark worker (pid {pid}) on {board.name} ...")
    # Exit 0 when the worker is gone or the pid is another process's; kill's own status otherwise.
    command = (f"[ ! -e /proc/{pid} ] || ! grep -q bench_worker /proc/{pid}/cmdline 2>/dev/null || "
               f"kill -9 {pid}")
    try:
        reply = board.shell(command, timeout=15)
        failed = reply.error() if reply.status != 0 else None
    except TransportError as e:
        failed = str(e)
    if failed:
        say(f"warning: could not stop the benchmark worker (pid {pid}) on {board.name} ({failed}); it may still "
            f"be running there: `ssh {board.name} kill -9 {pid}`")


def read_bandwidth_over_ssh(board: SshHost, python: str, threads: Sequence[int],
                            say: Callable[[str], None], timeout: float = 300) -> dict[int, float]:
    """The board's read bandwidth at each thread count (nomoat.runtime.bandwidth run there), for
    the decode-against-ceiling column; {} with a warning if it cannot be had: the rounds matter more."""
    command = f"{python} -m nomoat.runtime.bandwidth {' '.join(str(int(t)) for t in threads)}"
    try:
        reply = board.shell(command, timeout=max(1.0, timeout))
        if reply.status != 0:
            raise ValueError(reply.error())
        return {int(t): float(bw) for t, bw in json.loads(last_line(reply.out)).items()}
    # ssh lost the board or the probe overran its time, a failed run, not JSON, not a map of rates
    except (TransportError, ValueError, AttributeError, TypeError) as e:
        say(f"warning: could not measure the read bandwidth on {board.name} ({e}); the table has no ceiling column")
        return {}
