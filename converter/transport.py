"""What the device transports (adb for a phone, ssh for a board like a Raspberry Pi) share."""

from __future__ import annotations


class TransportError(Exception):
    """The transport program is missing, the device cannot be reached, or a command could not be
    run there; the message says what to do. AdbError and SshError are the two kinds."""
