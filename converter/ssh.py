"""A thin wrapper around the `ssh` program (never a Python ssh library) for a Linux board such as
a Raspberry Pi: run commands with their exit status, copy files, start a benchmark worker.

Going through the user's own ssh means their keys, agent, ~/.ssh/config host aliases and
known hosts; nothing here speaks the protocol. Every command runs with BatchMode, so a password
or host-key prompt fails at once with a message instead of waiting on a terminal nobody watches,
and under `sh -c`, so it means the same whatever the remote user's login shell is.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .transport import TransportError, last_line

# ssh exits with 255 when it could not connect or log in (a remote command's own status otherwise).
SSH_FAILED = 255

# What ssh says when it cannot get in, with what to do about it.
_FIXES = (
    ("Permission denied", "ssh could not log in without a password (nomoat runs it with BatchMode): install your "
                          "key on the board with `ssh-copy-id {host}`, or name the key for this host in "
                          "~/.ssh/config (or in a file given with --ssh-config)"),
    ("Host key verification failed", "this computer does not know the board's host key yet: connect once with "
                                     "`ssh {host}` and accept it"),
    ("Could not resolve hostname", "check the host name (a Raspberry Pi is often raspberrypi.local) or use its "
                                   "IP address"),
    ("Connection refused", "no ssh server answers there: enable SSH on the board (Raspberry Pi OS: "
                           "`sudo raspi-config`, Interface Options, SSH) or check the port"),
    ("timed out", "the board does not answer: check that it is on and on this network"),
    ("No route to host", "the board does not answer: check that it is on and on this network"),
)


class SshError(TransportError):
    """ssh is missing, the board cannot be reached or logged into, or a copy failed."""


@dataclass(frozen=True)
class SshHost:
    """One board as ssh reaches it: run commands on it with shell() and push()."""

    host: str  # [user@]host, ssh://[user@]host[:port], or a Host alias from the ssh config
    ssh: str  # path of the ssh program
    config: str | None = None  # ssh -F FILE instead of ~/.ssh/config

    @property
    def name(self) -> str:
        return self.host

    def command(self, remote: str) -> list[str]:
        """The argv that runs the POSIX shell command `remote` on the board, stdin and stdout passed through."""
        options = [*(["-F", self.config] if self.config else []), "-T", "-o", "BatchMode=yes"]
        # "--" before the host: a host that starts with "-" cannot be read as an option.
        return [self.ssh, *options, "--", self.host, f"sh -c {shlex.quote(remote)}"]

    def shell(self, command: str, timeout: float | None = 600) -> tuple[str, int]:
        """Run command with the board's sh; (stdout and stderr, exit status)."""
        result = self._run(command, timeout=timeout)
        return result.stdout + result.stderr, result.returncode

    def push(self, local: Path, remote: str, timeout: float | None = None) -> None:
        """Copy one file to the board, creating its folder; `cat` on the far side, so the board needs
        neither scp nor sftp."""
        folder, path = shlex.quote(os.path.dirname(remote) or "."), shlex.quote(remote)
        with open(local, "rb") as source:
            result = self._run(f"mkdir -p {folder} && cat > {path}", stdin=source, timeout=timeout)
        if result.returncode != 0:
            raise SshError(f"copying {local.name} to {remote} on {self.host} failed (exit {result.returncode}): "
                           f"{last_line(result.stderr)}")

    def home(self) -> str:
        """The remote user's home folder (relative --remote-dir paths are taken from it)."""
        out, status = self.shell('printf "%s" "$HOME"', timeout=60)
        if status != 0 or not out.startswith("/"):
            raise SshError(f"could not read $HOME on {self.host} ({last_line(out)}); pass an absolute --remote-dir.")
        return out

    def _run(self, command: str, stdin=subprocess.DEVNULL, timeout: float | None = 600) -> subprocess.CompletedProcess:
        try:
            raw = subprocess.run(self.command(command), capture_output=True, stdin=stdin, timeout=timeout)
        except FileNotFoundError as e:
            raise SshError(f"cannot run {self.ssh}: {e.strerror}. Install the ssh client (`apt install "
                           "openssh-client`).") from e
        except subprocess.TimeoutExpired as e:
            raise SshError(f"a command on {self.host} did not finish in {timeout:.0f} s; check that `ssh {self.host} "
                           "true` answers, then try again.") from e
        result = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(errors="replace"),
                                             raw.stderr.decode(errors="replace"))
        if result.returncode == SSH_FAILED:
            raise SshError(connection_failure(self.host, result.stderr))
        return result


def connection_failure(host: str, stderr: str) -> str:
    """ssh's reason for failing, and the fix for it."""
    said = last_line(stderr)
    for pattern, fix in _FIXES:
        if re.search(pattern, stderr, re.I):
            return f"ssh to {host} failed: {said}. {fix.format(host=host)}."
    return f"ssh to {host} failed: {said}. Check that `ssh {host} true` works in a terminal."


def find_ssh() -> str:
    """`ssh` on PATH; an SshError that says how to install it otherwise."""
    found = shutil.which("ssh")
    if found is None:
        raise SshError("ssh is not installed (not on PATH). Install the OpenSSH client: Debian/Ubuntu "
                       "`apt install openssh-client`.")
    return found


def connect(host: str, config: str | None = None) -> SshHost:
    """The board named `host`, checked reachable with `true` so a bad host fails before any work."""
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise SshError(f"--ssh {host!r} is not a host: give [user@]host or a Host alias from your ssh config.")
    if config is not None and not Path(config).is_file():
        raise SshError(f"--ssh-config {config} is not a file; point it at an ssh config file or drop it.")
    board = SshHost(host=host, ssh=find_ssh(), config=config)
    board.shell("true", timeout=60)  # raises SshError with ssh's reason and its fix
    return board
