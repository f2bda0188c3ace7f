"""`nomoat deploy --adb` with a phone that stops answering after the push, during one of the shell steps
(sha256sum, sync, chmod, the swap): each step has a deadline (shrunk here), past which one line names the
step, the device and what to do, and the phone keeps one whole bundle. The same private adb server and
loopback device as test_deploy_adb.py (its fixtures).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import test_deploy_adb as adb_tests
from nomoat.__main__ import main
from nomoat.converter import adb as adb_module
from nomoat.converter import deploy as deploy_module
from nomoat.converter.deploy import deploy_bundle
from test_deploy_adb import deploy_cli, tree_hashes

pytestmark = pytest.mark.android

# test_deploy_adb's fixtures (a module of their own here: their own adb server and device)
adb_server, connected, fake, remote = adb_tests.adb_server, adb_tests.connected, adb_tests.fake, adb_tests.remote
bundle, padded_bundle = adb_tests.bundle, adb_tests.padded_bundle

SHORT_S = 3  # each step's deadline in these tests
ADVICE = "Check the phone (awake, on its cable or wifi) and that `adb devices` lists it, then deploy again."


@pytest.fixture
def short_deadlines(monkeypatch):
    """Every shell step's deadline down to SHORT_S, whatever the bundle's size, and the cleanup's to 2 s."""
    monkeypatch.setattr(deploy_module, "STEP_S", float(SHORT_S))
    monkeypatch.setattr(deploy_module, "CHECK_GRACE_S", float(SHORT_S))
    monkeypatch.setattr(deploy_module, "CHECK_MIN_BYTES_PER_S", 1e15)
    monkeypatch.setattr(deploy_module, "SYNC_GRACE_S", float(SHORT_S))
    monkeypatch.setattr(deploy_module, "SYNC_MIN_BYTES_PER_S", 1e15)
    monkeypatch.setattr(deploy_module, "CLEANUP_AFTER_ERROR_S", 2.0)


def test_deadlines_grow_with_the_bundle():
    assert deploy_module.STEP_S == 60
    assert deploy_module.check_deadline(0) == 60
    assert deploy_module.check_deadline(1_000_000_000) == 160  # 1 GB: still done at a Pi 3's SD card speed
    assert deploy_module.sync_deadline(90_000_000) == 150  # as long as the push of it may take


# Each step's command as the phone receives it (precise enough not to match a path or another step).
@pytest.mark.parametrize("command, step", [
    ("&& sha256sum ./", "checking the copy with `sha256sum`"),
    ("( sync )", "flushing the copy to storage (`sync`)"),
    ("chmod -R a+rX", "making the bundle readable for the app (`chmod`)"),
])
def test_a_phone_gone_silent_after_the_push_is_given_up_with_one_line(bundle, padded_bundle, fake, remote, adb_server,
                                                                      short_deadlines, capsys, command, step):
    """A phone that leaves the wifi after the push keeps its connection open and says nothing: the step it
    was given gives up on it at its deadline, names itself, and the bundle deployed before stays."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    device.freeze_on_shell(command)
    rescue = threading.Timer(60, device.thaw)  # without a deadline the step would wait 10 minutes: end it for the test
    rescue.start()
    try:
        start = time.monotonic()
        status = main(deploy_cli(padded_bundle, dev.serial, adb_server, remote))
        seconds = time.monotonic() - start
    finally:
        rescue.cancel()
        device.thaw()
    out, err = capsys.readouterr()
    assert status == 2 and out == "", err
    assert seconds < 30, err
    assert [c for c in device.shell_log if command in c]  # the deploy got as far as that step
    assert err.strip().splitlines()[-1] == (
        f"nomoat deploy: error: {step} on {dev.serial} did not finish in {SHORT_S} s: the device stopped answering; "
        f"the bundle deployed before is unchanged. {ADVICE}"), err
    assert "Traceback" not in err
    assert tree_hashes(remote / "tiny-bundle") == before
    # Once the phone answers again, the next deploy tidies up what the silent one left.
    deploy_bundle(padded_bundle, dev, str(remote))
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == tree_hashes(padded_bundle)


class SlowSwap:
    """The device, but its swap pauses between its two renames for longer than the swap's deadline: a phone
    that stops answering while it swaps. Once given up on, its command is hung up on, as adbd does."""

    def __init__(self, device, pause: float):
        self.device, self.pause = device, pause

    @property
    def name(self) -> str:
        return self.device.name

    def shell(self, command: str, timeout: float | None = 600):
        if "if mv " in command:  # swap_in's command: its first `if mv` is the second rename
            command = command.replace("if mv ", f"sleep {self.pause}; if mv ", 1)
        return self.device.shell(command, timeout=timeout)

    def push(self, local, remote, timeout=None):
        self.device.push(local, remote, timeout)


def test_a_swap_given_up_on_still_finishes_on_the_phone(bundle, padded_bundle, fake, remote, adb_server,
                                                         short_deadlines, monkeypatch, capsys):
    """The swap's deadline passes between its two renames: the line says the phone holds one whole bundle or
    the other, the swap goes on there to put the new one in place, and its staging folder is not removed
    meanwhile (an `rm -rf` racing the rename could empty the new bundle)."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    monkeypatch.setattr(adb_module, "pick_device", lambda *_args: SlowSwap(dev, pause=SHORT_S + 2))
    assert main(deploy_cli(padded_bundle, dev.serial, adb_server, remote)) == 2
    err = capsys.readouterr().err
    target = f"{remote}/tiny-bundle"
    assert err.strip().splitlines()[-1] == (
        f"nomoat deploy: error: moving the checked bundle into {target} on {dev.serial} did not finish in {SHORT_S} s: "
        f"the device stopped answering; {target} holds the bundle deployed before or the new one, whole (a swap under "
        f"way finishes on the device; the next deploy there tidies up). {ADVICE}"), err
    assert "could not remove the staging folder" not in err
    assert not [c for c in device.shell_log if c.startswith("( rm -rf ") and ".partial-" in c]
    wait_for(lambda: tree_hashes(Path(target)) == tree_hashes(padded_bundle)
             and sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"], what="the swap to finish on the phone")


def wait_for(done, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if done():
                return
        except FileNotFoundError:  # between the two renames
            pass
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout} s for {what}")
