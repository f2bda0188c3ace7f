"""`nomoat deploy --adb` stopped part way: a device that goes silent mid-push, Ctrl-C, SIGTERM and
SIGHUP, and a signal during the swap. The same private adb server and loopback device as
test_deploy_adb.py (its fixtures); the signals go to a `python -m nomoat deploy` process, as a
terminal, a CI timeout or a closed ssh session would send them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_deploy_adb as adb_tests
from nomoat.__main__ import main
from nomoat.converter import adb as adb_module
from nomoat.converter import deploy as deploy_module
from nomoat.converter import transport
from nomoat.converter.deploy import deploy_bundle
from test_deploy_adb import deploy_cli, tree_hashes

pytestmark = pytest.mark.android

# test_deploy_adb's fixtures (a module of their own here: their own adb server and device)
adb_server, connected, fake, remote = adb_tests.adb_server, adb_tests.connected, adb_tests.fake, adb_tests.remote
bundle, padded_bundle = adb_tests.bundle, adb_tests.padded_bundle

UNCHANGED = "the bundle deployed before is unchanged"
LEFT_FOR_NEXT = "a later deploy there removes it once it has been left for 10 minutes"


def wait_for_push_of(remote: Path, name: str, at_least: int = 1, timeout: float = 30) -> None:
    """Until the staging copy of name holds at_least bytes: the push is under way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.stat().st_size >= at_least for p in remote.glob(f".tiny-bundle.partial-*/{name}")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no push of {name} began in {timeout} s: {sorted(p.name for p in remote.iterdir())}")


def start_deploy(bundle: Path, serial: str, port: int, remote: Path,
                 cleanup_after_error_s: float | None = None) -> subprocess.Popen[str]:
    """`nomoat deploy` in its own process group, as a shell runs a foreground job: with the signals live.
    A test run started in the background of a script (`nohup .ci/run &`) has SIGINT and SIGHUP ignored,
    and a child would inherit that: Python then never raises KeyboardInterrupt, and nomoat leaves an
    ignored SIGHUP ignored (as nohup asks). cleanup_after_error_s: deploy.CLEANUP_AFTER_ERROR_S in that
    process, as a test in this one would monkeypatch it."""
    nomoat = [sys.executable, "-m", "nomoat"]
    if cleanup_after_error_s is not None:
        nomoat = [sys.executable, "-c", "import sys; from nomoat.converter import deploy; "
                  "deploy.CLEANUP_AFTER_ERROR_S = float(sys.argv.pop(1)); from nomoat.__main__ import main; "
                  "sys.exit(main())", str(cleanup_after_error_s)]
    return subprocess.Popen([*nomoat, *deploy_cli(bundle, serial, port, remote)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_signals)


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


@pytest.fixture
def live_signals():
    """This process's SIGINT raising KeyboardInterrupt and SIGTERM at its default, as in a terminal,
    whatever the test run inherited (see start_deploy); restored after."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def finish(p: subprocess.Popen[str], timeout: float) -> tuple[str, str, float]:
    """(stdout, stderr, seconds) of p, which must end within timeout."""
    start = time.monotonic()
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"nomoat deploy still ran {timeout} s after it was stopped:\n{err}") from None
    return out, err, time.monotonic() - start


def test_a_device_gone_silent_mid_push_is_given_up_with_one_line(bundle, padded_bundle, fake, remote, adb_server,
                                                                 monkeypatch, capsys):
    """A phone that leaves the wifi mid-push keeps its connection open and says nothing: the push's deadline
    (a minute plus a second a MB, shrunk here) gives up on it, and the cleanup does not wait long either."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    monkeypatch.setattr(transport, "PUSH_GRACE_S", 3.0)
    monkeypatch.setattr(transport, "PUSH_MIN_BYTES_PER_S", 1e9)
    monkeypatch.setattr(deploy_module, "CLEANUP_AFTER_ERROR_S", 2.0)
    device.freeze_on_push("padding.bin")
    status, seconds = device.timed_while_frozen(lambda: main(deploy_cli(padded_bundle, dev.serial, adb_server, remote)))
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert seconds < 30, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nomoat deploy: error: pushing padding.bin failed: padding.bin did not reach "
                           f"{dev.serial} in 3 s") and "stopped answering" in last and "deploy again" in last, err
    assert f"could not remove the staging folder {remote}/.tiny-bundle.partial-" in err and LEFT_FOR_NEXT in err
    assert "Traceback" not in err
    assert tree_hashes(remote / "tiny-bundle") == before
    # Once the device answers again, a deploy tidies up what the silent one kept, once it has been left long enough
    # (here at once) not to be another deploy's copy under way.
    monkeypatch.setattr(deploy_module, "STALE_STAGING_S", 0)
    deploy_bundle(padded_bundle, dev, str(remote))
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == tree_hashes(padded_bundle)


def test_push_deadline_grows_with_the_file():
    assert transport.push_deadline(0) == 60
    assert transport.push_deadline(90_000_000) == 150  # SmolLM2-135M's weights: 2.5 minutes at worst


@pytest.mark.parametrize("signum, how", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stopped by SIGTERM"),
                                         (signal.SIGHUP, "stopped by SIGHUP")])
def test_a_signal_mid_push_says_one_line_and_leaves_the_old_bundle(bundle, padded_bundle, fake, remote, adb_server,
                                                                   signum, how):
    """Ctrl-C (to the whole foreground group, as a terminal sends it), a CI timeout's SIGTERM or a closed
    terminal's SIGHUP: the staging folder goes, the old bundle stays, and one line says so."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    device.throttle_push(0.05)  # 6 MiB in 64 KiB chunks: about 5 s, time to be interrupted
    p = start_deploy(padded_bundle, dev.serial, adb_server, remote)
    wait_for_push_of(remote, "padding.bin", at_least=128 * 1024)
    if signum == signal.SIGINT:
        os.killpg(p.pid, signum)
    else:
        p.send_signal(signum)
    out, err, _ = finish(p, timeout=30)
    assert p.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"nomoat deploy: {how}; {UNCHANGED}"
    assert out == ""
    assert sorted(x.name for x in remote.iterdir()) == ["tiny-bundle"]  # no staging folder left
    assert tree_hashes(remote / "tiny-bundle") == before


def test_ctrl_c_on_a_silent_device_returns_in_seconds(bundle, padded_bundle, fake, remote, adb_server, monkeypatch):
    """Ctrl-C while the device says nothing: the cleanup gets a few seconds, not a minute, and says that a
    later deploy removes what it could not."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    device.freeze_on_push("padding.bin")
    try:
        # The cleanup after an error gets a minute in that process (15 s by default): a Ctrl-C whose cleanup is
        # given that time instead of CLEANUP_AFTER_INTERRUPT_S then runs past finish's 30 s, far beyond the bound
        # below, which leaves a loaded machine 20 s for the interrupt, adb's start and kill, and the exit.
        p = start_deploy(padded_bundle, dev.serial, adb_server, remote, cleanup_after_error_s=60.0)
        wait_for_push_of(remote, "padding.bin")
        time.sleep(1)
        os.killpg(p.pid, signal.SIGINT)
        _, err, seconds = finish(p, timeout=30)
    finally:
        device.thaw()
    assert p.returncode == 130 and seconds < deploy_module.CLEANUP_AFTER_INTERRUPT_S + 20, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line]
    assert LEFT_FOR_NEXT in lines[-2] and lines[-1] == f"nomoat deploy: interrupted; {UNCHANGED}"
    assert tree_hashes(remote / "tiny-bundle") == before
    monkeypatch.setattr(deploy_module, "STALE_STAGING_S", 0)  # the staging folder left counts as left long ago
    deploy_bundle(padded_bundle, dev, str(remote))
    assert sorted(x.name for x in remote.iterdir()) == ["tiny-bundle"]


class SignalDuringSwap:
    """The device, but a signal comes to this process just as the swap's command starts."""

    def __init__(self, device, signum: int):
        self.device, self.signum, self.swapped = device, signum, False

    @property
    def name(self) -> str:
        return self.device.name

    def shell(self, command: str, timeout: float | None = 600):
        if "if mv " in command:  # swap_in's command
            os.kill(os.getpid(), self.signum)
            reply = self.device.shell(command, timeout=timeout)
            self.swapped = reply.status == 0
            return reply
        return self.device.shell(command, timeout=timeout)

    def push(self, local, remote, timeout=None):
        self.device.push(local, remote, timeout)


@pytest.mark.parametrize("signum, how", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stopped by SIGTERM")])
def test_a_signal_during_the_swap_waits_for_it(bundle, padded_bundle, fake, remote, adb_server, monkeypatch, capsys,
                                               live_signals, signum, how):
    """Cut between its two renames, the swap would leave no bundle under the name: the signal waits until
    it is done, and the line then says the new bundle is in place."""
    _, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    slow = SignalDuringSwap(dev, signum)
    monkeypatch.setattr(adb_module, "pick_device", lambda *_args: slow)
    try:
        status = main(deploy_cli(padded_bundle, dev.serial, adb_server, remote))
    except KeyboardInterrupt:
        status = None  # the signal got through mid-deploy
    err = capsys.readouterr().err
    assert slow.swapped and status == 128 + signum, err
    assert err.strip().splitlines()[-1] == f"nomoat deploy: {how}; the new bundle is in place at {remote}/tiny-bundle"
    assert sorted(x.name for x in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == tree_hashes(padded_bundle)
