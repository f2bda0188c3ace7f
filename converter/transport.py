"""What the device transports (adb for a phone, ssh for a board like a Raspberry Pi) share."""

from __future__ import annotations


class TransportError(Exception):
    """The transport program is missing, the device cannot be reached, or a command could not be
    run there; the message says what to do. AdbError and SshError are the two kinds."""


def last_line(text: str) -> str:
    """A program's last non-empty line of output: usually its error, short enough for a one-line message."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
