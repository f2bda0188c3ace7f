"""A thin wrapper around the `ssh` program (never a Python ssh library) for a Linux board such as
a Raspberry Pi: run commands with their exit status, copy files, start a benchmark worker.

Going through the user's own ssh means their keys, agent, ~/.ssh/config host aliases and
known hosts; nothing here speaks the protocol. Every command runs with BatchMode, so a password
or host-key prompt fails at once with a message instead of waiting on a terminal nobody watches,
and under `sh -c`, so it means the same whatever the remote user's login shell is; with
keepalives, so a board that drops off the network is given up instead of waited on; and its
stdout and stderr apart, so what the login shell says on stderr is never parsed.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import transport
from .transport import Reply, TransportError, TransportTimeout, Wording, last_line

# ssh exits with 255 when it could not connect or log in (a remote command's own status otherwise).
SSH_FAILED = 255
# A board that drops off the network mid-copy or mid-benchmark is given up after about a minute
# (4 unanswered probes 15 s apart) instead of leaving ssh waiting on a dead TCP connection.
# Only when the user's ssh config sets no ServerAliveInterval for the host: -o would override theirs.
KEEPALIVE = ("-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4")
# ssh's own default level, whatever the user's config sets: its words on stderr are what ssh_failure reads, and
# LogLevel ERROR or QUIET silences "Timeout, server ... not responding" (QUIET every reason), DEBUG buries them.
# Nothing of ssh's stderr reaches the user but through those messages, so overriding theirs hides nothing.
LOG_LEVEL = ("-o", "LogLevel=INFO")

# ssh's words (exit 255) when a connection that was up is lost: it gave up on a board silent to its keepalives
# ("Timeout, server pi not responding."), or the network or the board cut the connection.
_GAVE_UP = "not responding"
_BROKE = "Broken pipe|Connection reset|closed by remote host|Read from remote host"

# What ssh says when it cannot get in, with what to do about it.
_FIXES = (
    ("Permission denied", "ssh could not log in without a password (nomoat runs it with BatchMode): install your "
                          "key on the board with `ssh-copy-id {host}`, or name the key for this host in "
                          "~/.ssh/config (or in a file given with --ssh-config)"),
    # Before "Host key verification failed", which ssh prints for this too: here connecting once does not help,
    # ssh refuses a changed key until the old one is removed.
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "the board's host key is not the one this computer knows for it. If "
                                               "the board was reinstalled (a fresh Raspberry Pi OS image makes new "
                                               "keys), remove the old key with `{keygen}` and connect once with "
                                               "`ssh {host}` to accept the new one; if it was not, someone may be "
                                               "intercepting the connection: do not go on"),
    ("Host key verification failed", "this computer does not know the board's host key yet: connect once with "
                                     "`ssh {host}` and accept it"),
    ("Could not resolve hostname", "check the host name (a Raspberry Pi is often raspberrypi.local) or use its "
                                   "IP address"),
    ("Connection refused", "no ssh server answers there: enable SSH on the board (Raspberry Pi OS: "
                           "`sudo raspi-config`, Interface Options, SSH) or check the port"),
    # A connection that was up and is lost (see _LOST): before "timed out", which "Read from remote host pi:
    # Connection timed out" also holds.
    (_GAVE_UP, "the board stopped answering (ssh's keepalives): check that it is on and on this network"),
    (_BROKE, "the connection to the board broke: check that it is on and on this network"),
    ("timed out", "the board does not answer: check that it is on and on this network"),
    ("No route to host", "the board does not answer: check that it is on and on this network"),
)

# Either way the command may have run, in part or whole: an SshTimeout, so that deploy names the step cut off.
_LOST = re.compile(f"{_GAVE_UP}|{_BROKE}", re.I)
# ssh's words when it could not connect or log in (checked first: "kex_exchange_identification: read:
# Connection reset by peer" is a refused login, not a lost session): the command never reached the board.
_NOT_IN = re.compile(r"Permission denied|Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|"
                     r"Could not resolve hostname|Connection refused|connect to host .*timed out|No route to host|"
                     r"kex_exchange_identification|banner exchange", re.I)
# How long the check that a board still answers may take, after a command on it did not finish in its time.
PROBE_S = 20

# What to check when a board went silent or its connection broke, for messages that name the step (deploy.py).
GONE_BOARD_ADVICE = "check that the board is on and on this network"


class SshError(TransportError):
    """ssh is missing, the board cannot be reached or logged into, or a copy failed."""


class SshTimeout(SshError, TransportTimeout):
    """A command on the board did not finish in its time, or ssh lost its connection while it ran (the board
    stopped answering its keepalives, or the network cut it): see ssh_failure and SshOverdue."""


@dataclass(frozen=True)
class SshHost:
    """One board as ssh reaches it: run commands on it with shell() and push()."""

    host: str  # [user@]host, ssh://[user@]host[:port], or a Host alias from the ssh config
    ssh: str  # path of the ssh program
    config: str | None = None  # ssh -F FILE instead of ~/.ssh/config
    keepalive: tuple[str, ...] = KEEPALIVE  # () when the config sets its own
    # How deploy's messages speak of it: a board, not a phone.
    words: ClassVar[Wording] = Wording(
        noun="board", requirement="The board needs the usual Linux tools (coreutils or busybox).",
        push_advice="check the network and the free space on the board",
        writable_dir="one in your home folder there, e.g. ~/nomoat")

    @property
    def name(self) -> str:
        return self.host

    def command(self, remote: str, *extra: str) -> list[str]:
        """The argv that runs the POSIX shell command `remote` on the board, stdin and stdout passed through;
        extra: more ssh options."""
        options = [*(["-F", self.config] if self.config else []), "-T", "-o", "BatchMode=yes", *LOG_LEVEL,
                   *self.keepalive, *extra]
        # "--" before the host: a host that starts with "-" cannot be read as an option.
        return [self.ssh, *options, "--", self.host, f"sh -c {shlex.quote(remote)}"]

    def shell(self, command: str, timeout: float | None = 600) -> Reply:
        """Run command with the board's sh; (stdout, stderr, exit status)."""
        result = self._run(command, timeout=timeout)
        return Reply(result.stdout, result.stderr, result.returncode)

    def push(self, local: Path, remote: str, timeout: float | None = None) -> None:
        """Copy one file to the board, creating its folder; `cat` on the far side, so the board needs
        neither scp nor sftp. timeout None: the deadline transport.push_deadline gives the file's size
        (ssh's keepalives give up on a board gone silent, not on a copy stuck writing to a failing SD card)."""
        folder, path = shlex.quote(os.path.dirname(remote) or "."), shlex.quote(remote)
        with open(local, "rb") as source:
            deadline = transport.push_deadline(os.fstat(source.fileno()).st_size) if timeout is None else timeout
            result = self._run(f"mkdir -p {folder} && cat > {path}", stdin=source, timeout=deadline)
        if result.returncode != 0:
            raise SshError(f"copying {local.name} to {remote} on {self.host} failed (exit {result.returncode}): "
                           f"{last_line(result.stderr)}")

    def home(self) -> str:
        """The remote user's home folder (relative --remote-dir paths are taken from it)."""
        reply = self.shell('printf "%s" "$HOME"', timeout=60)
        if reply.status != 0 or not reply.out.startswith("/"):
            raise SshError(f"could not read $HOME on {self.host} ({reply.error()}); pass an absolute --remote-dir.")
        return reply.out

    def _run(self, command: str, stdin=subprocess.DEVNULL, timeout: float | None = 600) -> subprocess.CompletedProcess:
        try:
            # A session of its own, as adb's (adb.run_adb): the terminal's Ctrl-C reaches only nomoat.
            raw = subprocess.run(self.command(command), capture_output=True, stdin=stdin, timeout=timeout,
                                 start_new_session=True)
        except FileNotFoundError as e:
            raise SshError(f"cannot run {self.ssh}: {e.strerror}. Install the ssh client (`apt install "
                           "openssh-client`).") from e
        except subprocess.TimeoutExpired as e:
            raise SshOverdue(self, timeout) from e
        result = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(errors="replace"),
                                             raw.stderr.decode(errors="replace"))
        if result.returncode == SSH_FAILED:
            raise ssh_failure(self.host, result.stderr)
        return result

    def answers(self, timeout: float | None = None) -> bool:
        """Whether a new ssh connection to the board runs `true` within timeout seconds (None: PROBE_S)."""
        timeout = PROBE_S if timeout is None else timeout
        argv = self.command("true", "-o", f"ConnectTimeout={max(1, int(timeout) // 2)}")
        try:
            return subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout,
                                  start_new_session=True).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


class SshOverdue(SshTimeout):
    """A command on the board that did not finish in its time. ssh's keepalives had not given up on the board,
    which does not prove it answers (they give up a minute or more after it went silent), so a new connection
    tells which it is: a board that answers it has the command stuck (a failing SD card or disk blocks every
    read), one that does not went silent. Found out when first asked (symptom, advice: PROBE_S at most), so
    that a cleanup given a few seconds after an interrupt is not held up by it."""

    def __init__(self, board: SshHost, seconds: float) -> None:
        # Not TransportTimeout.__init__: symptom and advice are worked out below.
        Exception.__init__(self, f"a command on {board.host} did not finish in {seconds:.0f} s; check that the board "
                                 f"is on and that `ssh {board.host} true` answers (if it does, the command is stuck "
                                 "there: check the board's storage with `dmesg`), then try again.")
        self.seconds = seconds
        self.board = board

    @functools.cached_property
    def board_answers(self) -> bool:
        return self.board.answers()

    @property
    def symptom(self) -> str:
        return ("the board still answers ssh, so the step is stuck there" if self.board_answers
                else "the board stopped answering")

    @property
    def advice(self) -> str:
        if self.board_answers:
            return "check the board's storage (`dmesg` on it shows a failing SD card or disk)"
        return f"{GONE_BOARD_ADVICE}, and that `ssh {self.board.host} true` answers"


def ssh_failure(host: str, stderr: str) -> SshError:
    """The error for ssh's exit 255: it could not get in (never_ran), or lost a connection that was up (an
    SshTimeout: the command may have run), or another failure of its own."""
    message = connection_failure(host, stderr)
    if _NOT_IN.search(stderr):
        error = SshError(message)
        error.never_ran = True
        return error
    if _LOST.search(stderr):
        said = last_line(stderr).rstrip(".")
        gave_up = re.search(_GAVE_UP, stderr, re.I)
        return SshTimeout(message, seconds=None, advice=GONE_BOARD_ADVICE,
                          symptom=f"{'ssh gave up on the board' if gave_up else 'the connection to the board broke'}"
                                  f" ({said})")
    return SshError(message)


def connection_failure(host: str, stderr: str) -> str:
    """ssh's reason for failing, and the fix for it."""
    said = last_line(stderr).rstrip(".")  # "Host key verification failed." then ". " would say it twice
    # ssh names the known_hosts file and the entry to remove when the key changed ("remove with:").
    keygen = re.search(r"^\s*(ssh-keygen -f .+ -R .+?)\s*$", stderr, re.M)
    for pattern, fix in _FIXES:
        if re.search(pattern, stderr, re.I):
            fix = fix.format(host=host, keygen=keygen.group(1) if keygen else
                             f"ssh-keygen -R {shlex.quote(known_hosts_name(host))}")
            return f"ssh to {host} failed: {said}. {fix}."
    return f"ssh to {host} failed: {said}. Check that `ssh {host} true` works in a terminal."


def known_hosts_name(host: str) -> str:
    """How known_hosts names the board of --ssh HOST: without the user, "[host]:port" for another port
    than 22 (a Host alias stays as it is: only ssh's config knows its HostName)."""
    rest = host.removeprefix("ssh://").rsplit("@", 1)[-1]
    name, _, port = rest.rpartition(":") if host.startswith("ssh://") and ":" in rest else (rest, "", "")
    return f"[{name}]:{port}" if port and port != "22" else name


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
    name = host.rsplit("@", 1)[-1]
    if not host.startswith("ssh://") and name.count(":") == 1:  # an IPv6 address has two or more
        # ssh would look up "host:2222" (or scp's "host:") as a name and fail with advice about names.
        where, _, port = name.partition(":")
        fixed = f"ssh://{host.rsplit('@', 1)[0] + '@' if '@' in host else ''}{where}:{port or 22}"
        raise SshError(f"--ssh {host!r}: ssh takes no ':' after the host (scp's host: or host:PORT). Give "
                       f"{fixed}, or [user@]host with the port in a Host entry of your ssh config.")
    if config is not None and not Path(config).is_file():
        raise SshError(f"--ssh-config {config} is not a file; point it at an ssh config file or drop it.")
    ssh = find_ssh()
    board = SshHost(host=host, ssh=ssh, config=config, keepalive=keepalive_options(ssh, host, config))
    board.shell("true", timeout=60)  # raises SshError with ssh's reason and its fix
    return board


def keepalive_options(ssh: str, host: str, config: str | None = None) -> tuple[str, ...]:
    """KEEPALIVE, unless the ssh config already sets a ServerAliveInterval for this host: then theirs
    stands. `ssh -G` prints the options ssh would use, without connecting."""
    argv = [ssh, "-G", *(["-F", config] if config else []), "--", host]
    try:
        printed = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return KEEPALIVE
    match = re.search(r"^serveraliveinterval (\d+)$", printed.stdout, re.MULTILINE)
    return () if match and int(match.group(1)) > 0 else KEEPALIVE
