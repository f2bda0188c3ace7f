"""Host one benchmark engine in its own process, and drive such processes round by round.

Each engine runs in a separate process so the peak RSS it reports is its own (VmHWM, the peak
of the process's own address space: bench.peak_rss_bytes) and engines cannot share warmed-up
allocations. The worker speaks JSON lines:

    parent -> worker   {"cmd": "round", "prompt_ids": [...], "new_tokens": 128}
                       {"cmd": "generate", "prompt_ids": [...], "new_tokens": 16}  |  {"cmd": "quit"}
    worker -> parent   {"event": "started", "pid": 4242}   (first, before the engine loads: the pid a parent
                                                          kills a hung worker by, where it runs)
                       {"event": "ready", "name": ..., "model_bytes": ..., "load_s": ..., "machine": {...},
                        "rss_before_load_bytes": ..., "peak_rss_bytes": ..., "libraries": {"onnxruntime": "1.23.0"}}
                       {"event": "round", "result": {...RoundResult...}}
                       {"event": "tokens", "ids": [...]}   (untimed: to check the engine's answers)

Only the argv that starts a worker knows where it runs: `python -m nomoat.runtime.bench_worker`
here, the same behind `adb shell` or `ssh` for a phone or a Pi.

    python -m nomoat.runtime.bench_worker --engine nomoat.runtime.bench:NomoatEngine \\
        --options '{"bundle": "build/host", "threads": 2}'
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .bench import BenchError, Engine, RoundResult, machine_info, measure_once, peak_rss_bytes
from .errors import BundleError, OrtOptionsError

# -- the worker side -----------------------------------------------------------------------


def load_engine(ref: str, options: dict[str, Any]) -> Engine:
    """Build the engine named "package.module:Factory" with keyword options."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise BenchError(f"engine reference {ref!r} must look like 'package.module:Factory'")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if factory is None:
        raise BenchError(f"module {module_name!r} has no {attr!r}")
    return factory(**options)


def _protocol_stream() -> IO[str]:
    """A private copy of stdout for the protocol; fd 1 itself then points at stderr, so a
    native library that prints to stdout (llama.cpp, ONNX Runtime) cannot corrupt a message."""
    sys.stdout.flush()
    private = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return private


def _send(stream: IO[str], message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def serve(engine: Engine, commands: IO[str], replies: IO[str]) -> None:
    """Prepare the engine, announce it, then answer round commands until quit or EOF."""
    start = time.perf_counter()
    before_load = rss_before_load(engine)
    engine.prepare()
    # The bandwidth ceiling's inputs, from engines that know them (nomoat's; not the peers').
    ceiling = {key: getattr(engine, key)() for key in ("weight_bytes_per_token", "threads_used")
               if hasattr(engine, key)}
    _send(replies, {"event": "ready", "name": engine.name, "model_bytes": engine.model_bytes(),
                    "load_s": time.perf_counter() - start,
                    "rss_before_load_bytes": before_load, "peak_rss_bytes": peak_rss_bytes(),
                    "machine": machine_info(), "libraries": library_versions(getattr(engine, "libraries", ())),
                    **ceiling})
    for line in commands:
        message = json.loads(line)
        if message["cmd"] == "quit":
            return
        if message["cmd"] == "round":
            result = measure_once(engine, message["prompt_ids"], int(message["new_tokens"]))
            _send(replies, {"event": "round", "result": result.to_dict()})
        elif message["cmd"] == "generate":
            engine.reset()
            ids = [int(t) for t in engine.run(message["prompt_ids"], int(message["new_tokens"]))]
            _send(replies, {"event": "tokens", "ids": ids})
        else:
            raise BenchError(f"unknown worker command {message['cmd']!r}")


def library_versions(distributions: Sequence[str]) -> dict[str, str | None]:
    """The installed version of each distribution (pip name) the engine runs on, None if not installed:
    a comparison is of these releases, and the next release of any of them may move its numbers."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: installed(name) for name in distributions}


def rss_before_load(engine: Engine) -> int:
    """The process's peak RSS with the engine's library imported but no model loaded: what Python, this
    harness and the library cost before any weights (an engine that imports torch starts hundreds of MB
    above one that does not). Engines without `import_library` import theirs in `prepare`: for them it is
    Python and the harness alone."""
    import_library = getattr(engine, "import_library", None)
    if callable(import_library):
        import_library()
    return peak_rss_bytes()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nomoat.runtime.bench_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, help="engine factory as 'package.module:Factory'")
    parser.add_argument("--options", default="{}", help="JSON object of keyword arguments for the factory")
    args = parser.parse_args(argv)
    replies = _protocol_stream()
    _send(replies, {"event": "started", "pid": os.getpid()})
    try:
        serve(load_engine(args.engine, json.loads(args.options)), sys.stdin, replies)
    except (BenchError, BundleError, OrtOptionsError) as e:
        # A problem the user can fix: its one line reaches them through the parent, not a traceback.
        print(e, file=sys.stderr)
        return 1
    return 0


# -- the parent side -----------------------------------------------------------------------


def local_worker_argv(engine: str, options: dict[str, Any], python: str = sys.executable) -> list[str]:
    """The command that starts a worker on this machine."""
    return [python, "-m", "nomoat.runtime.bench_worker", "--engine", engine, "--options", json.dumps(options)]


class WorkerOverdue(BenchError):
    """A worker sent no reply by its deadline (and was killed)."""


class WorkerProcess:
    """A running worker: send it rounds, read back RoundResults. Use as a context manager."""

    QUIT_WAIT_S = 30.0  # for a worker to end after its quit, before it is taken for hung and killed

    def __init__(self, label: str, argv: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | None = None, deadline: float | None = None,
                 stop_hung: Callable[[int], None] | None = None):
        """deadline: a time.monotonic() by which every reply must have come (None: wait as long as it
        takes); a worker still silent then is killed and WorkerOverdue raised. stop_hung(pid): kills a
        hung worker by the pid it announced, where killing argv's process does not reach it (behind
        ssh, the board's worker outlives the local ssh client)."""
        self.label = label
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.deadline = deadline
        self.stop_hung = stop_hung
        self.ready: dict[str, Any] = {}
        self.pid: int | None = None  # the worker's own pid, where it runs (its "started" message)
        self.answered: dict[str, int] = {}  # replies had, by event ("round": 3, counting the warm-up)
        self._awaiting = False  # a reply is due: the worker is loading or working on a command
        self._stdout_ended = False  # the worker's stdout reached its end: it exited, or its link went
        self._proc: subprocess.Popen | None = None
        self._stderr: IO[bytes] | None = None
        self._noise: list[str] = []  # lines on stdout before the ready message that were no message
        self._pending = b""  # bytes read from stdout past the last full line

    def start(self) -> dict[str, Any]:
        """Start the process and wait until the engine is loaded; return its ready message."""
        # stderr goes to a file, not a pipe: a chatty engine cannot fill a pipe and block, and
        # the tail is at hand to explain a crash.
        self._stderr = tempfile.TemporaryFile()
        self._awaiting = True
        # stdout is read raw (_read_line), never through a buffered file object: the selector must see
        # every byte not yet consumed, or a line already buffered would wait out the deadline.
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, bufsize=0, env=self.env, cwd=self.cwd)
        self.ready = self._receive("ready")
        return self.ready

    @property
    def rss_before_load_mb(self) -> float | None:
        """Its peak RSS before the model loaded, library imported (None from a worker older than that count)."""
        before = self.ready.get("rss_before_load_bytes")
        return before / 1e6 if before is not None else None

    def measure(self, prompt_ids: Sequence[int], new_tokens: int) -> RoundResult:
        self._command({"cmd": "round", "prompt_ids": list(prompt_ids), "new_tokens": new_tokens})
        return RoundResult.from_dict(self._receive("round")["result"])

    def generate(self, prompt_ids: Sequence[int], new_tokens: int) -> list[int]:
        """The token ids the engine generates (greedy, untimed): to check it answers sensibly."""
        self._command({"cmd": "generate", "prompt_ids": list(prompt_ids), "new_tokens": new_tokens})
        return self._receive("tokens")["ids"]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._awaiting:
            # Closed with a reply due: Ctrl-C, or an error, came while the worker was busy. It may be hung,
            # and a quit would wait behind its work: end it now.
            self._kill(proc)
        elif proc.poll() is None:
            try:
                self._command_to(proc, {"cmd": "quit"})
                proc.wait(timeout=self.QUIT_WAIT_S)
            except BrokenPipeError:  # its end of the pipe is closed: it has exited, or is exiting
                proc.kill()
                proc.wait()
            except subprocess.TimeoutExpired:  # it did not take its quit: hung
                self._kill(proc)
        if self._stderr is not None:
            self._stderr.close()

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, message: dict[str, Any]) -> None:
        if self._proc is None:
            raise BenchError(f"worker {self.label} is not running")
        self._awaiting = True
        try:
            self._command_to(self._proc, message)
        except BrokenPipeError:
            self._awaiting = False  # its end of the pipe is closed: it ended by itself, no reply will come
            raise BenchError(self._died_message()) from None

    @staticmethod
    def _command_to(proc: subprocess.Popen, message: dict[str, Any]) -> None:
        # stdin is unbuffered (bufsize=0 for the raw stdout): a write may take only part of a long prompt.
        data = memoryview((json.dumps(message) + "\n").encode())
        while data:
            data = data[proc.stdin.write(data):]

    def _receive(self, event: str) -> dict[str, Any]:
        while True:
            line = self._read_line(event)
            if not line:
                raise BenchError(self._died_message())
            message = _message(line)
            if message is not None and message.get("event") == "started" and not self.ready:
                self.pid = message.get("pid")
                continue
            if message is not None:
                break
            if self.ready:
                # Once ready, the worker's stdout is its own protocol stream (fd 1 went to stderr).
                raise BenchError(f"worker {self.label} printed {line.strip()[:200]!r} on its protocol stream "
                                 f"while {event!r} was expected; something else writes to its stdout")
            # Before the ready message, a line that is no message is whatever ran before the worker
            # took stdout over: a wrapper script, conda or pyenv noting the environment, a login shell.
            self._noise.append(line.rstrip("\n"))
        if message.get("event") != event:
            raise BenchError(f"worker {self.label} sent {message!r} while {event!r} was expected")
        self.answered[event] = self.answered.get(event, 0) + 1
        self._awaiting = False
        return message

    def _read_line(self, event: str) -> str:
        """The next line on the worker's stdout ('' at its end), by the deadline."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._pending:
            if self.deadline is not None:
                # A reply already in the pipe at the deadline is still taken (a zero wait looks).
                with selectors.DefaultSelector() as waiting:  # not select(): it fails on fds past 1023
                    waiting.register(fd, selectors.EVENT_READ)
                    if not waiting.select(max(0.0, self.deadline - time.monotonic())):
                        raise self._overdue(event)
            chunk = os.read(fd, 65536)
            if not chunk:
                self._stdout_ended = True
                line, self._pending = self._pending, b""
                return line.decode(errors="replace")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace") + "\n"

    def _overdue(self, event: str) -> WorkerOverdue:
        """Kill the worker that missed the deadline; the error that says so, with its stderr's tail."""
        self._kill(self._proc)
        pid = f" (pid {self.pid})" if self.pid is not None else ""
        tail = self._stderr_tail().strip()
        return WorkerOverdue(f"worker {self.label}{pid} sent no reply by the deadline, {self._doing(event)}, and "
                             "was stopped" + (f"; the end of its stderr:\n{tail}" if tail else "."))

    def _doing(self, event: str) -> str:
        """What the worker was doing when its reply for `event` ("ready", "round" or "tokens") was due."""
        count = self.answered.get(event, 0) + 1
        if event == "ready":
            return "loading its model"
        if event == "round":
            return f"in round {count} (the warm-up counted)"
        return f"generating its answer {count} (untimed)"

    def _kill(self, proc: subprocess.Popen) -> None:
        """End the worker: its process here, and through stop_hung where it runs, unless its stdout was
        seen to end (it exited there, or the link to it is gone)."""
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # A process here that ended unseen (Ctrl-C also ends a local ssh client, which exits 255 as for a
        # lost link) leaves the worker behind it running.
        self._awaiting = False  # no reply will come now (and a Ctrl-C during stop_hung must not run it again)
        if self.stop_hung is not None and self.pid is not None and not self._stdout_ended:
            self.stop_hung(self.pid)

    def _died_message(self) -> str:
        code = self._proc.wait() if self._proc is not None else None
        tail = self._stderr_tail()
        noise = f"before it, on stdout: {' | '.join(self._noise)[-500:]}\n" if self._noise else ""
        return f"worker {self.label} ({' '.join(self.argv[:4])} ...) {how_it_ended(code)}:\n{noise}{tail}"

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-3000:]


def how_it_ended(code: int | None) -> str:
    """'exited with code 1', or the signal that ended the process by name: a worker killed by the kernel
    leaves no word of its own on stderr, so the signal is all the user gets."""
    if code is None or code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    # The kernel's out-of-memory killer sends SIGKILL, and says so in its log.
    why = " (out of memory? check dmesg)" if -code == signal.SIGKILL else ""
    return f"was killed by {name}{why}"


def _message(line: str) -> dict[str, Any] | None:
    """The worker's message on this line; None for a line that is not one (not a JSON object)."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


@dataclass
class Job:
    """One system under test: its worker and the prompt/generation it is measured on."""

    worker: WorkerProcess
    prompt_ids: list[int]
    new_tokens: int
    rounds: list[RoundResult] = field(default_factory=list)


def run_alternating(jobs: Sequence[Job], rounds: int, warmup: int = 1, pause_s: float = 0.25,
                    on_round: Callable[[Job, int, RoundResult], None] | None = None) -> None:
    """Measure every job `rounds` times, alternating A B C C B A A B C ... so that machine drift
    (thermal throttling, other load) spreads evenly over the systems: in a fixed order A would
    always run first in a round, and a machine slowing down steadily would favour it, where over
    each forward and backward pair every system's mean position is the same. The first `warmup`
    rounds of each job are run and thrown away (first-run allocations, weight pre-packing)."""
    for index in range(warmup + rounds):
        for job in round_order(jobs, index):
            # Engines with spinning thread pools keep burning cores briefly after a run; a
            # pause keeps that from slowing the next engine down.
            time.sleep(pause_s)
            result = job.worker.measure(job.prompt_ids, job.new_tokens)
            if index >= warmup:
                job.rounds.append(result)
                if on_round is not None:
                    on_round(job, index - warmup, result)


def round_order(jobs: Sequence[Job], index: int) -> Sequence[Job]:
    """The jobs in the order round `index` (warm-ups counted) runs them: forward, then backward."""
    return jobs if index % 2 == 0 else jobs[::-1]


if __name__ == "__main__":
    sys.exit(main())
