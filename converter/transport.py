"""What the device transports (adb for a phone, ssh for a board like a Raspberry Pi) share."""

from __future__ import annotations

from typing import NamedTuple


class TransportError(Exception):
    """The transport program is missing, the device cannot be reached, or a command could not be
    run there; the message says what to do. AdbError and SshError are the two kinds.

    never_ran: True when the transport knows the command never reached the device (ssh could not connect,
    adb found no such device), so it did nothing there; False when it may have run, in part or whole."""

    never_ran: bool = False


class TransportTimeout(TransportError):
    """A command on the device got no answer: it did not finish in the time it was given (`seconds`), or the
    transport gave up on a device that went silent or cut the connection (ssh's keepalives: `seconds` None).
    A caller that knows which step it was (deploy.py) names it, with the transport's `symptom` (what it saw:
    "the device stopped answering") and `advice` ("check the phone ...")."""

    def __init__(self, message: str, seconds: float | None, advice: str,
                 symptom: str = "the device stopped answering") -> None:
        super().__init__(message)
        self.seconds = seconds
        self.advice = advice
        self.symptom = symptom


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
