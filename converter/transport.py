"""What the device transports (adb for a phone, ssh for a board like a Raspberry Pi) share."""

from __future__ import annotations

from typing import NamedTuple


class TransportError(Exception):
    """The transport program is missing, the device cannot be reached, or a command could not be
    run there; the message says what to do. AdbError and SshError are the two kinds."""


class TransportTimeout(TransportError):
    """A command on the device did not finish in the time it was given: the device stopped answering (a
    phone off the wifi or on a loose cable, a board that hangs). A caller that knows which step it was
    (deploy.py) names it, with `seconds` and the transport's own `advice` ("check the phone ...")."""

    def __init__(self, message: str, seconds: float, advice: str) -> None:
        super().__init__(message)
        self.seconds = seconds
        self.advice = advice


class Reply(NamedTuple):
    """What a command on the device printed and its exit status. stdout and stderr are kept apart
    where the transport can (ssh; adb on phones with shell_v2): a board's login shell says its own
    notices (`bash: warning: setlocale: ...`) on stderr, which must not end up in what is parsed;
    stderr is for the error messages."""

    out: str
    err: str
    status: int

    def error(self) -> str:
        """The line that says what went wrong: stderr's last, else stdout's."""
        return last_line(self.err) if self.err.strip() else last_line(self.out)


def last_line(text: str) -> str:
    """A program's last non-empty line of output: usually its error, short enough for a one-line message."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
