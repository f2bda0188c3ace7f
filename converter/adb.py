"""A thin wrapper around the `adb` program (never a Python adb library): find it, pick the
device, run shell commands with their exit status, push files.

Going through the user's own adb means the same server, USB permissions and authorized
keys as their `adb devices`; nothing here speaks the wire protocol.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import transport
from .transport import Reply, TransportError, TransportTimeout, Wording, last_line

# Old phones (adbd without the shell_v2 feature) always report exit status 0 for `adb shell`,
# so every command echoes its own status after this marker and we parse it back.
_STATUS_MARKER = "__nomoat_rc="
_STATUS_RE = re.compile(re.escape(_STATUS_MARKER) + r"(\d+)\s*$")

# What adb says when it has no such device to send a command to ("error: device 'X' not found").
_NO_DEVICE = re.compile(r"device '[^']*' not found|no devices/emulators found")

# `adb devices` states other than "device", with what to do about them.
_STATE_FIXES = {
    "unauthorized": "unlock the phone and accept the 'Allow USB debugging?' prompt (tick 'Always allow'); "
                    "if there is no prompt, revoke USB debugging authorizations in Developer options and replug",
    "offline": "unplug and replug the cable (or `adb reconnect`); if it stays offline, `adb kill-server` "
               "and try again",
    "no permissions": "your user may not open the USB device: add a udev rule for it (Debian: "
                      "`apt install android-sdk-platform-tools-common`) and replug",
    "authorizing": "wait a moment for the phone to finish authorizing this computer, then try again",
    "connecting": "wait a moment for the connection to come up, then try again",
    "recovery": "the phone is in recovery mode: reboot it into Android",
    "sideload": "the phone is in sideload mode: reboot it into Android",
    "bootloader": "the phone is in the bootloader: reboot it into Android",
}


class AdbError(TransportError):
    """adb is missing, no usable device, or an adb command failed; the message says what to do."""


class AdbTimeout(AdbError, TransportTimeout):
    """An adb command did not finish in its time (the device stopped answering)."""


# What to check when a phone stops answering, for messages that name the step (deploy.py).
SILENT_PHONE_ADVICE = "check the phone (awake, on its cable or wifi) and that `adb devices` lists it"


@dataclass(frozen=True)
class Device:
    """One device as seen by one adb server: run commands on it with shell() and push()."""

    serial: str
    adb: str  # path of the adb program
    server_port: int | None = None  # None: the user's adb server (5037 or $ANDROID_ADB_SERVER_PORT)
    # How deploy's messages speak of it: a phone, not a board.
    words: ClassVar[Wording] = Wording(noun="phone", requirement="Android 7 or newer is needed.",
                                       push_advice="check the cable (or the wifi) and the free space on the phone",
                                       writable_dir="over adb, e.g. /data/local/tmp/nomoat")

    @property
    def name(self) -> str:
        """How messages name the device (deploy.py speaks to an ssh host the same way)."""
        return self.serial

    def shell(self, command: str, timeout: float | None = 600) -> Reply:
        """Run command with the device's /system/bin/sh; (stdout, stderr, exit status)."""
        result = run_adb(self.adb, self.server_port, ["-s", self.serial, "shell",
                                                      f"( {command} ); echo \"{_STATUS_MARKER}$?\""], timeout=timeout)
        out = result.stdout.replace("\r\n", "\n")  # old devices run the shell on a pty
        match = _STATUS_RE.search(out)
        if match is None:  # adb itself failed (device gone, server died), before or while the command ran
            error = AdbError(f"`adb shell` on {self.serial} failed (exit {result.returncode}): "
                             f"{last_line(out + result.stderr)}. Check the connection with `adb devices`.")
            # adb found no such device (unplugged, or off the network): then the command never reached it
            error.never_ran = _NO_DEVICE.search(out + result.stderr) is not None
            raise error
        # Newer devices (shell_v2) keep stderr apart; older ones mix it into stdout already.
        return Reply(out[:match.start()], result.stderr.replace("\r\n", "\n"), int(match.group(1)))

    def push(self, local: Path, remote: str, timeout: float | None = None) -> None:
        """Copy one file to the device (adb creates the remote parent folders). timeout None: the
        deadline transport.push_deadline gives the file's size."""
        deadline = transport.push_deadline(local.stat().st_size) if timeout is None else timeout
        try:
            result = run_adb(self.adb, self.server_port, ["-s", self.serial, "push", str(local), remote],
                             timeout=deadline)
        except AdbTimeout as e:
            raise AdbError(f"{local.name} did not reach {self.serial} in {deadline:.0f} s (at least "
                           f"{transport.PUSH_MIN_BYTES_PER_S / 1e6:g} MB/s was expected): the device stopped "
                           "answering, as a phone that left the wifi or a loose cable does") from e
        if result.returncode != 0:
            raise AdbError(f"`adb push` of {local.name} to {remote} failed: "
                           f"{_last_error(result.stdout + result.stderr)}")


def find_adb() -> str:
    """$ADB if set, else `adb` on PATH; an AdbError that says how to install it otherwise."""
    configured = os.environ.get("ADB")
    if configured:
        if shutil.which(configured) is None:
            raise AdbError(f"$ADB is {configured!r}, which is not an executable program. Point ADB at adb "
                           "or unset it to use the adb on PATH.")
        return configured
    found = shutil.which("adb")
    if found is None:
        raise AdbError("adb is not installed (not on PATH). Install it: Debian/Ubuntu `apt install adb`, "
                       "or the Android SDK Platform-Tools (https://developer.android.com/tools/releases/"
                       "platform-tools); or set ADB=/path/to/adb.")
    return found


def run_adb(adb: str, server_port: int | None, args: list[str],
            timeout: float | None = 60) -> subprocess.CompletedProcess[str]:
    """adb [-P PORT] ARGS, capturing its output. stdin is closed so a shell cannot wait on it.

    adb runs in a session of its own: the terminal's Ctrl-C then reaches only nomoat, which stops adb
    itself (subprocess.run kills it on the way out), and a command that must not be cut in half (the
    swap, deploy.swap_in_whole) runs to its end while nomoat holds the signal."""
    command = [adb, *(["-P", str(server_port)] if server_port else []), *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=timeout, start_new_session=True)
    except FileNotFoundError as e:
        raise AdbError(f"cannot run {adb}: {e.strerror}. Install adb (`apt install adb`) or fix $ADB.") from e
    except subprocess.TimeoutExpired as e:
        raise AdbTimeout(f"`adb {' '.join(args[:3])}` did not finish in {timeout:.0f} s; check the cable and "
                         "`adb devices`, then try again.", seconds=timeout, advice=SILENT_PHONE_ADVICE) from e


def list_devices(adb: str, server_port: int | None = None) -> list[tuple[str, str]]:
    """(serial, state) for each device the adb server knows (starting the server if needed)."""
    result = run_adb(adb, server_port, ["devices"])
    if result.returncode != 0:
        raise AdbError(f"`adb devices` failed: {_last_error(result.stdout + result.stderr)}. "
                       "Try `adb kill-server` and run again.")
    return parse_devices(result.stdout)


def parse_devices(text: str) -> list[tuple[str, str]]:
    """Rows of `adb devices`: "SERIAL<tab>STATE", after a header and "* daemon ..." notes."""
    devices = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("List of devices", "*", "adb server")):
            continue
        serial, _, state = line.partition("\t")
        if not state:
            serial, _, state = line.strip().partition(" ")
        devices.append((serial.strip(), state.strip()))
    return devices


def pick_device(serial: str | None = None, server_port: int | None = None) -> Device:
    """The device to use: the one --serial names, else the one $ANDROID_SERIAL names (as adb itself
    takes it), else the only one attached; AdbError otherwise."""
    adb = find_adb()
    devices = list_devices(adb, server_port)
    named_by = "--serial"
    if serial is None and os.environ.get("ANDROID_SERIAL"):
        serial, named_by = os.environ["ANDROID_SERIAL"], "$ANDROID_SERIAL"
    if serial is not None:
        chosen = [d for d in devices if d[0] == serial]
        if not chosen:
            raise AdbError(f"no device {serial!r} ({named_by}) in `adb devices` (found: "
                           f"{_serials(devices) or 'none'}). Check the serial, or `adb connect HOST:PORT` for a "
                           "network device.")
    elif not devices:
        raise AdbError("no Android device found by adb. Plug the phone in with a data cable, enable "
                       "Developer options > USB debugging and accept the prompt; or `adb connect HOST:PORT` "
                       "for wireless debugging. `adb devices` must list it as 'device'.")
    elif len(devices) > 1:
        raise AdbError(f"several devices are attached ({_serials(devices)}); choose one with --serial "
                       "(or set $ANDROID_SERIAL, as for adb itself).")
    else:
        chosen = devices
    serial, state = chosen[0]
    if state != "device":
        raise AdbError(f"device {serial} is {state!r}, not ready: {_fix_for(state)}.")
    return Device(serial=serial, adb=adb, server_port=server_port)


def _fix_for(state: str) -> str:
    for known, fix in _STATE_FIXES.items():
        if state.startswith(known):
            return fix
    return "get it to show as 'device' in `adb devices`"


def _serials(devices: list[tuple[str, str]]) -> str:
    return ", ".join(f"{s} ({state})" for s, state in devices)


def _last_error(text: str) -> str:
    """adb's own error line ("adb: error: ..." / "error: ..."), else its last line of output."""
    errors = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return errors[-1] if errors else last_line(text)
