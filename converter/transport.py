"""What the device transports (adb for a phone, ssh for a board like a Raspberry Pi) share."""

from __future__ import annotations

from typing import NamedTuple

# Neither adb nor ssh notices a copy that stopped moving: adb has no keepalive (a phone that drops off wifi
# mid-push leaves its connection open and silent), and ssh's keepalives see a board that went silent, not one
# whose storage stopped taking writes (a failing SD card). So a push gets a deadline from the file's size: a
# minute, plus a second a MB (1 MB/s is slower than a working cable, wifi or network pushes; USB 2 does 20-40).
# Module values, read at each push, so a test can shrink them.
PUSH_GRACE_S = 60.0
PUSH_MIN_BYTES_PER_S = 1e6


def push_deadline(size: int) -> float:
    """Seconds a push of size bytes may take before the device counts as gone (see PUSH_GRACE_S)."""
    return PUSH_GRACE_S + size / PUSH_MIN_BYTES_PER_S


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


class Wording(NamedTuple):
    """How deploy's messages speak of a device reached one way: a phone over adb, a board over ssh."""

    noun: str  # "phone"
    requirement: str  # what a device whose df or sha256sum is missing or unlike the usual lacks, as a sentence
    push_advice: str  # what to check when a push failed
    writable_dir: str  # a --remote-dir such a device lets one write


# For a device that does not say (a test's stand-in): nothing that holds for one kind only.
ANY_DEVICE = Wording(noun="device", requirement="The device needs the usual `df` and `sha256sum`.",
                     push_advice="check the connection and the free space on the device",
                     writable_dir="a folder you own there")
