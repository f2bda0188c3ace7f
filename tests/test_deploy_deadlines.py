"""`nomoat deploy --adb` with a phone that stops answering after the push, during one of the shell steps
(sha256sum, sync, chmod, the swap): each step has a deadline (shrunk here), past which one line names the
step, the device and what to do, and the phone keeps one whole bundle. A swap given up on that runs late, against
the next deploy's cleanup (the lock they share); the sync's deadline from what is left to write; a phone unplugged
mid-step. The same private adb server and loopback device as test_deploy_adb.py (its fixtures).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import test_deploy_adb as adb_tests
from nomoat.__main__ import main
from nomoat.converter import adb as adb_module
from nomoat.converter import deploy as deploy_module
from nomoat.converter.deploy import DeployError, SwapUnsettled, deploy_bundle
from nomoat.converter.transport import Reply
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
    assert deploy_module.sync_deadline(90_000_000) == 150  # as long as the push of it may take, when the device
    assert deploy_module.sync_deadline(2_000_000_000, pending=50_000_000) == 110  # does not say what is left


# Each step's command as the phone receives it (precise enough not to match a path or another step).
@pytest.mark.parametrize("command, step", [
    ("&& sha256sum ./", "checking the copy with `sha256sum`"),
    ("( cat /proc/meminfo )", "reading what is left to write to storage (`/proc/meminfo`)"),
    ("( sync )", "flushing the copy to storage (`sync`)"),
    ("chmod -R a+rX", "making the bundle readable for the app (`chmod`)"),
])
def test_a_phone_gone_silent_after_the_push_is_given_up_with_one_line(bundle, padded_bundle, fake, remote, adb_server,
                                                                      short_deadlines, monkeypatch, capsys, command,
                                                                      step):
    """A phone that leaves the wifi after the push keeps its connection open and says nothing: the step it
    was given gives up on it at its deadline, names itself, and the bundle deployed before stays."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    device.freeze_on_shell(command)
    status, seconds = device.timed_while_frozen(lambda: main(deploy_cli(padded_bundle, dev.serial, adb_server, remote)))
    out, err = capsys.readouterr()
    assert status == 2 and out == "", err
    assert seconds < 30, err
    assert [c for c in device.shell_log if command in c]  # the deploy got as far as that step
    assert err.strip().splitlines()[-1] == (
        f"nomoat deploy: error: {step} on {dev.serial} did not finish in {SHORT_S} s: the device stopped answering; "
        f"the bundle deployed before is unchanged. {ADVICE}"), err
    assert "Traceback" not in err
    assert tree_hashes(remote / "tiny-bundle") == before
    # Once the phone answers again, a deploy tidies up what the silent one left, once that has been left long enough
    # (here at once) not to be another deploy's copy under way.
    monkeypatch.setattr(deploy_module, "STALE_STAGING_S", 0)
    deploy_bundle(padded_bundle, dev, str(remote))
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == tree_hashes(padded_bundle)


class AtSwap:
    """The device, with `hook` run on swap_in's command (the one with `if mv`: its first is the second
    rename) before the device runs what it returns: a test's way to act at the swap."""

    def __init__(self, device, hook):
        self.device, self.hook = device, hook

    @property
    def name(self) -> str:
        return self.device.name

    def shell(self, command: str, timeout: float | None = 600):
        if "if mv " in command:
            command = self.hook(command)
        return self.device.shell(command, timeout=timeout)

    def push(self, local, remote, timeout=None):
        self.device.push(local, remote, timeout)


def slow_swap(device, pause: float) -> AtSwap:
    """A swap that pauses between its two renames for longer than the swap's deadline: a phone that stops
    answering while it swaps. Once given up on, its command is hung up on, as adbd does."""
    return AtSwap(device, lambda command: command.replace("if mv ", f"sleep {pause}; if mv ", 1))


def lock_taken_before_swap(device, lock: Path) -> AtSwap:
    """Another deploy takes the lock just before this one's swap starts."""

    def take(command: str) -> str:
        lock.mkdir()
        return command

    return AtSwap(device, take)


def test_a_swap_given_up_on_still_finishes_on_the_phone(bundle, padded_bundle, fake, remote, adb_server,
                                                         short_deadlines, monkeypatch, capsys):
    """The swap's deadline passes between its two renames: the line says the phone holds one whole bundle or
    the other, the swap goes on there to put the new one in place, and its staging folder is not removed
    meanwhile (an `rm -rf` racing the rename could empty the new bundle)."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    monkeypatch.setattr(adb_module, "pick_device", lambda *_args: slow_swap(dev, pause=SHORT_S + 2))
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


# --- a swap given up on that runs late, and the next deploy's cleanup (recover_interrupted_deploy) ---


class LateSwap:
    """The device, but its swap waits on the phone until the test creates the file `go`: at its start ("start"),
    or between its two renames ("between"), as on a phone that went silent as the swap arrived and came back
    later. Once it has run, the file `done` holds its exit status."""

    def __init__(self, device, go: Path, where: str):
        self.device, self.go, self.where = device, go, where
        self.done = go.with_name("done")

    @property
    def name(self) -> str:
        return self.device.name

    def shell(self, command: str, timeout: float | None = 600):
        if "if mv " in command:  # swap_in's command: its first `if mv` is the second rename
            wait = f"while [ ! -e {self.go} ]; do sleep 0.05; done; "
            if self.where == "between":
                command = command.replace("if mv ", f"{wait}if mv ", 1)
            # HUP ignored from the start, as in the swap's own command: the wait outlives the adb client
            command = (f"trap '' HUP PIPE; {wait if self.where == 'start' else ''}( {command} ); "
                       f"echo $? > {self.done}")
        return self.device.shell(command, timeout=timeout)

    def push(self, local, remote, timeout=None):
        self.device.push(local, remote, timeout)


class WholeBundleWatch:
    """Lists target every few milliseconds in a thread and notes each listing that is neither of the given
    bundles' (a bundle half emptied, a staging folder moved inside it); no target at all is fine (between
    a swap's two renames)."""

    def __init__(self, target: Path, *bundles: Path):
        self.target, self.allowed = target, [sorted(p.name for p in b.iterdir()) for b in bundles]
        self.seen: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                names = sorted(os.listdir(self.target))
            except FileNotFoundError:
                names = None
            if names is not None and names not in self.allowed and names not in self.seen:
                self.seen.append(names)
            time.sleep(0.005)

    def stop(self) -> list[list[str]]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.seen


def lock_message(serial: str, remote: Path) -> str:
    return (f"a swap from an earlier deploy may still be running on {serial} ({remote}/.tiny-bundle.swapping is "
            f"there), so nothing was changed: {remote}/tiny-bundle holds a whole bundle, the one deployed before or "
            "that swap's. Wait a minute and deploy again (a lock left behind is cleared once the device has "
            "restarted, or after 10 minutes).")


@pytest.mark.parametrize("where", ["start", "between"])
def test_a_late_swap_and_the_next_deploys_cleanup_never_run_at_once(bundle, padded_bundle, fake, remote, tmp_path,
                                                                    monkeypatch, where):
    """The phone goes silent as the swap arrives (SwapUnsettled), the user deploys again, and the phone comes back
    while that deploy cleans up, with storage slow enough that `rm -rf` of a folder takes seconds. Unguarded,
    the late swap renamed the staging folder into the bundle's place while the cleanup's `rm -rf` emptied it
    (an empty bundle; "start"), or the cleanup put the old bundle back between the swap's two renames and the
    staging folder went inside it ("between"). With the lock, one waits for the other: the bundle's name holds a
    whole bundle throughout, and the next deploy either goes through or says the swap may still be running."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    target = remote / "tiny-bundle"
    go = tmp_path / "go"
    late = LateSwap(dev, go, where)
    monkeypatch.setattr(deploy_module, "STEP_S", 5.0)
    with pytest.raises(SwapUnsettled):
        deploy_bundle(padded_bundle, late, str(remote))
    [staging] = remote.glob(".tiny-bundle.partial-*")
    staged = len(list(staging.iterdir()))
    monkeypatch.setattr(deploy_module, "STEP_S", 60.0)  # the next deploy's steps, with the slow rm below
    # The late swap's staging folder counts as left long ago, so the next deploy's cleanup goes for it: the race.
    monkeypatch.setattr(deploy_module, "STALE_STAGING_S", 0)
    device.slow_rm(0.4)
    watch = WholeBundleWatch(target, bundle, padded_bundle)
    outcome: dict[str, object] = {}

    def deploy_again() -> None:
        try:
            outcome["result"] = deploy_bundle(padded_bundle, dev, str(remote))
        except DeployError as e:
            outcome["error"] = str(e)

    again = threading.Thread(target=deploy_again)
    again.start()
    try:
        # The phone comes back once the next deploy is at work: its cleanup got to the staging folder (a file of
        # it gone, or the folder renamed), or it ended (refused while the swap holds the lock).
        wait_for(lambda: not again.is_alive() or not staging.exists() or len(list(staging.iterdir())) < staged,
                 what="the next deploy's cleanup", timeout=60)
    finally:
        go.touch()  # never leave the swap waiting on the "phone"
    again.join(timeout=120)
    wait_for(late.done.exists, what="the late swap to end", timeout=60)
    wait_for(lambda: not (remote / ".tiny-bundle.swapping").exists(), what="the lock to go", timeout=30)
    seen = watch.stop()
    assert seen == [], f"{target} held neither bundle whole: {seen}; the next deploy: {outcome}"
    assert "result" in outcome or outcome.get("error") == lock_message(dev.serial, remote), outcome
    assert tree_hashes(target) == tree_hashes(padded_bundle)  # the late swap's bundle, or the next deploy's
    deploy_bundle(padded_bundle, dev, str(remote))  # and the device is fit for the next one
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(target) == tree_hashes(padded_bundle)


def test_a_lock_held_by_a_swap_makes_the_next_deploy_wait(bundle, padded_bundle, fake, remote, adb_server, capsys):
    """A swap still running on the phone holds REMOTE_DIR/.NAME.swapping: the next deploy touches nothing and says
    to wait, in one line."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    lock = remote / ".tiny-bundle.swapping"
    lock.mkdir()
    os.utime(lock, (time.time() - 30,) * 2)  # taken half a minute ago: that swap may well still run
    device.events.clear()
    assert main(deploy_cli(padded_bundle, dev.serial, adb_server, remote)) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"nomoat deploy: error: {lock_message(dev.serial, remote)}", err
    assert not [e for e in device.events if e[0] == "SEND"]  # nothing pushed
    assert sorted(p.name for p in remote.iterdir()) == [".tiny-bundle.swapping", "tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == before


def uptime_s() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


@pytest.mark.parametrize("made", ["eleven minutes ago", "before the device's last boot", "in the future"])
def test_a_lock_left_behind_is_cleared(bundle, padded_bundle, fake, remote, monkeypatch, made):
    """A lock no swap can still hold (its swap was killed, or the device restarted mid-swap): the next deploy
    clears it and goes on. Older than STALE_LOCK_S; or made before the device last booted, or dated after now
    (a board without a clock that restarted and set its clock back), whatever its age."""
    _, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    now = time.time()
    if made == "eleven minutes ago":
        mtime = now - 11 * 60
    else:
        monkeypatch.setattr(deploy_module, "STALE_LOCK_S", 10**9)  # only the restart can tell
        mtime = now - uptime_s() - 60 if made == "before the device's last boot" else now + 3600
    lock = remote / ".tiny-bundle.swapping"
    lock.mkdir()
    os.utime(lock, (mtime, mtime))
    deploy_bundle(padded_bundle, dev, str(remote))
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == tree_hashes(padded_bundle)


def test_a_swap_that_finds_the_lock_taken_changes_nothing(bundle, padded_bundle, fake, remote):
    """Another deploy is swapping (or cleaning up) at the same place: this swap does not start, its staging
    folder goes, the bundle deployed before stays, and the other's lock is left to it."""
    _, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    lock = remote / ".tiny-bundle.swapping"
    with pytest.raises(DeployError) as caught:
        deploy_bundle(padded_bundle, lock_taken_before_swap(dev, lock), str(remote))
    assert str(caught.value) == (
        f"moving the checked bundle into {remote}/tiny-bundle did not start on {dev.serial}: another deploy is "
        f"swapping or cleaning up there ({lock} is there), so the bundle deployed before is unchanged. Wait a "
        "minute and deploy again.")
    assert sorted(p.name for p in remote.iterdir()) == [".tiny-bundle.swapping", "tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == before


# --- the sync's deadline ---


class Meminfo:
    """A device that answers `cat /proc/meminfo` with text (None: fails, as where /proc is not readable), and
    notes every command with its timeout."""

    def __init__(self, text: str | None):
        self.text, self.ran = text, []

    name = "phone"

    def shell(self, command: str, timeout: float | None = 600):
        self.ran.append((command, timeout))
        if command == "cat /proc/meminfo":
            return Reply(self.text or "", "" if self.text else "cat: /proc/meminfo: Permission denied\n",
                         0 if self.text else 1)
        return Reply("", "", 0)


MEMINFO = ("MemTotal:        3881712 kB\nMemFree:          312420 kB\nDirty:             51200 kB\n"
           "Writeback:          2048 kB\nAnonPages:       1234567 kB\n")


@pytest.mark.parametrize("meminfo, deadline", [
    (MEMINFO, 60 + (51200 + 2048) * 1024 / 1e6),  # what is left to write, at 1 MB/s: not the 2 GB copy
    (None, 60 + 2000),  # the device does not say: the whole copy
    ("MemTotal: 3881712 kB\n", 60 + 2000),
])
def test_the_syncs_deadline_is_for_what_is_left_to_write(meminfo, deadline):
    """Most of a copy is written back during the push and the check: sync's deadline counts what /proc/meminfo
    says is still to write (Dirty, Writeback), read just before, so a 2 GB bundle does not get 34 minutes."""
    device = Meminfo(meminfo)
    deploy_module.flush_to_storage(device, 2_000_000_000)
    assert [command for command, _ in device.ran] == ["cat /proc/meminfo", "sync"]
    assert device.ran[0][1] == deploy_module.STEP_S
    assert device.ran[1][1] == pytest.approx(deadline)


# --- a device that goes away (unplugged) ---


class Unplugged:
    """The device, but unplugged (`adb disconnect`) just before the command that contains `at` is sent."""

    def __init__(self, device, port: int, at: str):
        self.device, self.port, self.at = device, port, at

    @property
    def name(self) -> str:
        return self.device.name

    def shell(self, command: str, timeout: float | None = 600):
        if self.at in command:
            adb_tests.adb(self.port, "disconnect", self.device.serial)
        return self.device.shell(command, timeout=timeout)

    def push(self, local, remote, timeout=None):
        self.device.push(local, remote, timeout)


@pytest.mark.parametrize("at, step", [
    ("&& sha256sum ./", "checking the copy with `sha256sum` on {serial} failed; the bundle deployed before is "
                        "unchanged. "),
    ("if mv ", "moving the checked bundle into {target} could not start on {serial}, so the bundle deployed "
               "before is unchanged: "),
])
def test_a_device_unplugged_mid_deploy_names_the_step(bundle, padded_bundle, fake, remote, adb_server, monkeypatch,
                                                      capsys, at, step):
    """USB unplugged during a step: one line names the step and says the bundle deployed before stays, then adb's
    own words. Unplugged as the swap is sent, adb says the device is not there: the swap never ran, so that is
    sure too (not "may be under way")."""
    _, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    monkeypatch.setattr(deploy_module, "CLEANUP_AFTER_ERROR_S", 5.0)
    monkeypatch.setattr(adb_module, "pick_device", lambda *_args: Unplugged(dev, adb_server, at))
    try:
        assert main(deploy_cli(padded_bundle, dev.serial, adb_server, remote)) == 2
    finally:
        adb_tests.adb(adb_server, "connect", dev.serial)
        adb_tests.wait_for_state(adb_server, dev.serial)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    prefix = "nomoat deploy: error: " + step.format(serial=dev.serial, target=f"{remote}/tiny-bundle")
    assert last.startswith(prefix) and last.endswith(
        f"`adb shell` on {dev.serial} failed (exit 1): error: device '{dev.serial}' not found. Check the connection "
        "with `adb devices`."), err
    assert tree_hashes(remote / "tiny-bundle") == before
    monkeypatch.setattr(deploy_module, "STALE_STAGING_S", 0)  # what the unplugged deploy left counts as left long ago
    deploy_bundle(padded_bundle, dev, str(remote))  # plugged back in, a deploy tidies up
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]


def test_a_phone_gone_silent_during_the_bench_is_given_up_near_its_timeout(bundle, fake, remote, adb_server, capsys):
    """The phone stops answering while the app benchmarks: each read of its log gets what is left of
    --bench-timeout (a few seconds at least), not a step's minute, and stopping the app a few more. The new
    bundle is in place by then (its path is already printed), and the one line says so."""
    device, dev = fake
    hang = threading.Event()

    def busy_app(extras):
        hang.wait(60)
        yield from ()

    device.install_app(busy_app)
    device.freeze_on_shell("logcat -d")
    try:
        status, seconds = device.timed_while_frozen(
            lambda: main(adb_tests.bench_cli(bundle, dev.serial, adb_server, remote, "--bench-timeout", "2")))
    finally:
        hang.set()
    out, err = capsys.readouterr()
    deployed = f"{remote}/tiny-bundle"
    assert status == 2 and out.strip() == deployed, err
    assert seconds < 30, err  # the deploy, then 5 s for the read and 10 for the app's stop; not 60 + 30
    assert err.strip().splitlines()[-1] == (
        f"nomoat deploy: error: reading the app's log (`logcat -d`) on {dev.serial} did not finish in 5 s: the device "
        f"stopped answering; the new bundle is in place at {deployed}. Check the phone (awake, on its cable or wifi) "
        "and that `adb devices` lists it, then deploy again with --bench to measure it."), err
    assert (Path(deployed) / "manifest.json").is_file()
