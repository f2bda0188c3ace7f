"""Drive a program through a pseudo-terminal, as a person at a keyboard would (a small pexpect).

The standard library's pty is enough and keeps the tests free of another dependency. The child
gets the terminal as its controlling tty, so a Ctrl-C written to it arrives as SIGINT, exactly
as when typed.
"""

from __future__ import annotations

import os
import platform
import pty
import re
import select
import signal
import time
from collections.abc import Sequence

# System calls a program sleeps in while it waits for a line from its terminal (read, or
# readline's select/poll), by their numbers on each architecture.
_INPUT_SYSCALLS = {
    "x86_64": {"0", "7", "23", "270", "271"},  # read, poll, select, pselect6, ppoll
    "aarch64": {"63", "72", "73"},  # read, pselect6, ppoll
}


class Terminal:
    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None):
        pid, fd = pty.fork()
        if pid == 0:  # the child: nothing but exec, so no state of the test process leaks in
            # ... not even its signal handling: a person's terminal starts programs with Ctrl-C
            # live, but a test run started in the background of a script (`.ci/run &`) inherits
            # SIGINT ignored, and Python then never raises KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGQUIT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            if cwd:
                os.chdir(cwd)
            os.execvpe(argv[0], list(argv), env if env is not None else os.environ)
        self.pid, self.fd = pid, fd
        self.seen = ""  # everything read so far (for failure messages)
        self._pending = ""  # read but not yet matched

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def sendline(self, text: str) -> None:
        self.send(text + "\r")  # Enter sends CR; the terminal turns it into the newline input() reads

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait until the output matches `pattern`; consume the output up to the end of the match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self._pending)
            if match:
                self._pending = self._pending[match.end():]
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {pattern!r}; "
                                     f"the terminal showed:\n{self.seen[-3000:]}")
            data = self._read(remaining)
            if data is None:
                raise AssertionError(f"the program ended before printing {pattern!r}; "
                                     f"the terminal showed:\n{self.seen[-3000:]}")

    def _read(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.fd], [], [], min(timeout, 1.0))
        if not ready:
            return ""
        try:
            data = os.read(self.fd, 4096).decode(errors="replace")
        except OSError:  # EIO: the child closed the terminal
            return None
        if not data:
            return None
        data = data.replace("\r\n", "\n")
        self.seen += data
        self._pending += data
        return data

    def wait_until_reading(self, timeout: float = 30.0) -> None:
        """Wait until the child sleeps in a system call that waits for the keyboard.

        A Ctrl-C sent while the program is between printing its prompt and blocking on the read
        is only noticed after the next line (Python's handler sets a flag the blocked read never
        checks): the race a person never loses and a loaded test machine can. Linux only; elsewhere
        (no /proc/PID/syscall) it falls back to a pause.
        """
        waiting = _INPUT_SYSCALLS.get(platform.machine())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{self.pid}/syscall") as f:
                    call = f.read().split()[0]
            except (OSError, IndexError):
                waiting = None
            if waiting is None:  # nothing to read the child's state from: a person's pause
                time.sleep(0.5)
                return
            if state == "S" and call in waiting:
                return
            self._read(0.05)
        raise AssertionError(f"the program was not waiting for input within {timeout:.0f} s:\n{self.seen[-3000:]}")

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status, once the child ends (its output is drained meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            self._read(0.1)
        raise AssertionError(f"the program did not end within {timeout:.0f} s:\n{self.seen[-3000:]}")

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
        os.close(self.fd)
