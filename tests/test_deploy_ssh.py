"""`nomoat deploy --ssh [--bench]` against the real OpenSSH client and server.

The "board" is this machine: a private sshd on a free loopback port with its own host key and
authorized key (config, pid and keys in a temp dir), reached through an ssh config file given
with --ssh-config, so the user's ~/.ssh is never read or written. Commands run in a real login
session (the worker's environment is sshd's, not pytest's). What this cannot show: an arm64
board's speed; the runtime on arm64 is tests/test_pi_qemu.py's part.

Marked `ssh`: they run in `nox -s pi` (root, like the Pi tests), where `.ci/run` has installed
openssh-server; missing sshd fails them there rather than skipping.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from nomoat.__main__ import main
from nomoat.converter import deploy as deploy_module
from nomoat.converter.deploy import DeployError, deploy_bundle
from nomoat.converter.ssh import (
    KEEPALIVE,
    SshError,
    SshHost,
    SshOverdue,
    SshTimeout,
    connect,
    connection_failure,
    keepalive_options,
    ssh_failure,
)
from nomoat.converter.transport import Reply, TransportTimeout, last_line
from test_deploy_adb import bundle_file_names, count_hashing

SSHD = "/usr/sbin/sshd"
ALIAS = "nomoat-board"
# What bash prints on stderr at each login on a board whose locale is not generated (LC_ALL sent by the client).
LOCALE_WARNING = "-bash: warning: setlocale: LC_ALL: cannot change locale (en_GB.UTF-8)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nomoat-test", "-f", str(path)],
                   check=True, capture_output=True)


def client_config(folder: Path, port: int, key: Path, known_hosts: Path, name: str = "ssh_config") -> Path:
    """An ssh config with one Host alias, as a user would keep in ~/.ssh/config."""
    path = folder / name
    path.write_text(f"Host {ALIAS}\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
                    f"  IdentityFile {key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking yes\n"
                    f"  UserKnownHostsFile {known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
                    "  ConnectTimeout 10\n  LogLevel ERROR\n")
    return path


class Board:
    def __init__(self, folder: Path, port: int, config: Path, process: subprocess.Popen, noisy_config: Path):
        self.folder, self.port, self.config, self.process = folder, port, config, process
        self.noisy_config = noisy_config  # logs in with a key whose session prints LOCALE_WARNING on stderr first

    def cli(self, bundle: Path, remote: Path | str, *extra: str) -> list[str]:
        return ["deploy", str(bundle), "--ssh", ALIAS, "--ssh-config", str(self.config),
                "--remote-dir", str(remote), *extra]

    def host(self) -> SshHost:
        return connect(ALIAS, str(self.config))


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    missing = [tool for tool in (SSHD, "ssh", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install openssh-server openssh-client")
    folder = tmp_path_factory.mktemp("sshd")
    keygen(folder / "host_key")
    keygen(folder / "client_key")
    keygen(folder / "noisy_key")
    # The noisy key's sessions run a forced command that prints bash's locale warning on stderr, then the
    # command asked for: a login shell that complains at every login, whatever the login shell is.
    forced = f"echo '{LOCALE_WARNING}' >&2; eval \\\"$SSH_ORIGINAL_COMMAND\\\""
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text()
                                            + f'command="{forced}" ' + (folder / "noisy_key.pub").read_text())
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "LogLevel VERBOSE\n")
    host_key = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder, when run as root
    log = open(folder / "sshd.log", "wb")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], stdout=log, stderr=log)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {(folder / 'sshd.log').read_text()}")
            time.sleep(0.1)
    config = client_config(folder, port, folder / "client_key", folder / "known_hosts")
    noisy = client_config(folder, port, folder / "noisy_key", folder / "known_hosts", name="ssh_config_noisy")
    try:
        yield Board(folder, port, config, process, noisy)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from tiny_models import tiny_fp32_bundle

    return tiny_fp32_bundle(tmp_path_factory, max_context=96, name="tiny-bundle")


@pytest.fixture(scope="module")
def other_bundle(bundle, tmp_path_factory) -> Path:
    """Another valid bundle of the same name: the tiny one with a listed extra file."""
    from tiny_models import padded_copy

    return padded_copy(bundle, tmp_path_factory.mktemp("other") / "tiny-bundle", "extra.bin", 3 * 1024 * 1024 + 17)


@pytest.fixture
def remote(tmp_path) -> Path:
    return tmp_path / "board" / "nomoat"


def traced_python(folder: Path, python: str = sys.executable) -> Path:
    """A Python for the board that notes each start with sshd's $SSH_CONNECTION (set only in an ssh
    session), so a test can tell the worker really ran behind ssh."""
    script = folder / "traced-python"
    script.write_text(f'#!/bin/sh\necho "started over ssh from: $SSH_CONNECTION" >> {folder / "starts.log"}\n'
                      f'exec {python} "$@"\n')
    script.chmod(0o755)
    return script


@pytest.mark.ssh
def test_deploy_over_ssh_lands_every_file_and_prints_the_path(board, bundle, remote, capsys):
    assert main(board.cli(bundle, remote)) == 0
    out, err = capsys.readouterr()
    deployed = remote / "tiny-bundle"
    assert out.strip().splitlines() == [str(deployed)]
    assert tree_hashes(deployed) == tree_hashes(bundle)
    assert f"to {ALIAS}" in err and "checking sha256" in err
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]  # no staging left


@pytest.mark.ssh
def test_redeploy_over_ssh_replaces_the_old_bundle(board, bundle, other_bundle, remote):
    host = board.host()
    deploy_bundle(bundle, host, str(remote), android_app=False)
    (remote / "tiny-bundle" / "stale.txt").write_text("from an older deploy")
    result = deploy_bundle(other_bundle, host, str(remote), android_app=False)
    assert result.device_path == str(remote / "tiny-bundle")
    assert tree_hashes(remote / "tiny-bundle") == tree_hashes(other_bundle)  # stale.txt is gone
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]


@pytest.mark.ssh
def test_a_copy_that_fails_midway_keeps_the_deployed_bundle(board, bundle, other_bundle, remote, monkeypatch):
    host = board.host()
    deploy_bundle(bundle, host, str(remote), android_app=False)
    before = tree_hashes(remote / "tiny-bundle")
    real_push, pushed = SshHost.push, []

    def push_then_fail(self, local, remote_path, timeout=None):
        if local.name == "extra.bin":  # the others went over first
            raise SshError("copying extra.bin failed: No space left on device")
        real_push(self, local, remote_path, timeout)
        pushed.append(local.name)

    monkeypatch.setattr(SshHost, "push", push_then_fail)
    with pytest.raises(DeployError, match="extra.bin.*No space left"):
        deploy_bundle(other_bundle, host, str(remote), android_app=False)
    assert pushed  # a real partial copy was cleaned up, not an empty one
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == before


@pytest.mark.ssh
def test_deploy_over_ssh_hashes_each_file_once(board, other_bundle, remote, monkeypatch, capsys):
    """The check before connecting is the one the deploy uses: each file is read once here, not twice."""
    hashed = count_hashing(monkeypatch)
    assert main(board.cli(other_bundle, remote)) == 0, capsys.readouterr().err
    assert hashed == Counter(bundle_file_names(other_bundle))


@pytest.mark.ssh
def test_a_board_that_hangs_in_a_step_is_given_up_with_one_line(board, bundle, other_bundle, remote, monkeypatch,
                                                                 capsys):
    """A board stuck in sha256sum (a failing SD card, say): the step's deadline (shrunk here) gives up on it,
    and one line names the step, the board and what to check: not whether ssh reaches the board (it does),
    its storage; the bundle deployed before stays."""
    deploy_bundle(bundle, board.host(), str(remote), android_app=False)
    before = tree_hashes(remote / "tiny-bundle")
    monkeypatch.setattr(deploy_module, "CHECK_GRACE_S", 2.0)
    monkeypatch.setattr(deploy_module, "CHECK_MIN_BYTES_PER_S", 1e15)
    real_shell = SshHost.shell

    def hanging_sha256sum(self, command, timeout=600):
        return real_shell(self, f"sleep 10; {command}" if "sha256sum" in command else command, timeout)

    monkeypatch.setattr(SshHost, "shell", hanging_sha256sum)
    assert main(board.cli(other_bundle, remote)) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"nomoat deploy: error: checking the copy with `sha256sum` on {ALIAS} did not finish in 2 s: the board still "
        "answers ssh, so the step is stuck there; the bundle deployed before is unchanged. Check the board's storage "
        "(`dmesg` on it shows a failing SD card or disk), then deploy again."), err
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]  # the board answers again: staging went
    assert tree_hashes(remote / "tiny-bundle") == before


def sshd_sessions(board: Board, listener: bool = False) -> list[psutil.Process]:
    """The board's sshd processes that serve connections (and the listener itself, if asked)."""
    root = psutil.Process(board.process.pid)
    return [p for p in root.children(recursive=True) if p.name() == "sshd"] + ([root] if listener else [])


class FrozenBoard:
    """SIGSTOP to the board's sshd processes once the step whose command holds `at` (made to last long enough) has
    started on the board, as a board that drops off the network mid-step: its connections stay open and say
    nothing. The board is this machine: the step's command first creates a file, which a thread here waits for,
    so the freeze comes after ssh has logged in and the command runs, however long that took. SIGCONT again in
    thaw()."""

    def __init__(self, board: Board, at: str, listener: bool):
        self.board, self.at, self.listener = board, at, listener
        self.started = board.folder / "frozen-step-started"
        self.stopped: list[psutil.Process] = []
        self.watcher: threading.Thread | None = None
        self._thawed = threading.Event()

    def install(self, monkeypatch) -> None:
        real_shell = SshHost.shell
        self.started.unlink(missing_ok=True)

        def shell(host, command, timeout=600):
            if self.at in command and self.watcher is None:
                self.watcher = threading.Thread(target=self._freeze_once_started, daemon=True)
                self.watcher.start()
                command = f"touch {shlex.quote(str(self.started))}; sleep 30; {command}"
            return real_shell(host, command, timeout)

        monkeypatch.setattr(SshHost, "shell", shell)

    def _freeze_once_started(self) -> None:
        deadline = time.monotonic() + 60
        while not self.started.exists():
            if self._thawed.wait(0.01) or time.monotonic() > deadline:
                return  # the step never started: nothing frozen, which the tests check
        self.freeze()

    def freeze(self) -> None:
        for p in sshd_sessions(self.board, self.listener):
            p.suspend()
            self.stopped.append(p)

    def thaw(self) -> None:
        self._thawed.set()
        if self.watcher is not None:
            self.watcher.join(timeout=10)  # a freeze under way ends before the resume below
        for p in self.stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()


@pytest.mark.ssh
def test_a_board_that_drops_off_mid_step_is_named_with_the_step(board, bundle, other_bundle, remote, tmp_path,
                                                                monkeypatch, capsys):
    """The board goes silent during sha256sum: ssh's keepalives (1 s apart here, from the user's config) give up
    on it with "Timeout, server ... not responding" (exit 255). That is the step cut off, not a failure to log
    in: one line names the step and says the bundle deployed before stays. The user's config sets LogLevel ERROR,
    under which ssh would not say it (its level for those words is INFO)."""
    deploy_bundle(bundle, board.host(), str(remote), android_app=False)
    before = tree_hashes(remote / "tiny-bundle")
    config = tmp_path / "ssh_config"
    config.write_text(board.config.read_text() + "  ServerAliveInterval 1\n  ServerAliveCountMax 2\n")
    frozen = FrozenBoard(board, "sha256sum", listener=False)
    frozen.install(monkeypatch)
    try:
        start = time.monotonic()
        status = main(["deploy", str(other_bundle), "--ssh", ALIAS, "--ssh-config", str(config),
                       "--remote-dir", str(remote)])
        seconds = time.monotonic() - start
    finally:
        frozen.thaw()
    err = capsys.readouterr().err
    assert status == 2 and frozen.stopped and seconds < 60, err
    assert err.strip().splitlines()[-1] == (
        f"nomoat deploy: error: checking the copy with `sha256sum` on {ALIAS} was cut off: ssh gave up on the board "
        "(Timeout, server 127.0.0.1 not responding); the bundle deployed before is unchanged. Check that the board is "
        "on and on this network, then deploy again."), err
    assert tree_hashes(remote / "tiny-bundle") == before


@pytest.mark.ssh
def test_a_board_silent_past_a_steps_deadline_is_told_from_a_stuck_step(board, bundle, other_bundle, remote,
                                                                       monkeypatch, capsys):
    """The step's deadline passes before ssh's keepalives give up (a minute or more), and a new connection gets no
    answer either: the board went silent, and the line says to check that it is on, not its storage."""
    from nomoat.converter import ssh as ssh_module

    deploy_bundle(bundle, board.host(), str(remote), android_app=False)
    before = tree_hashes(remote / "tiny-bundle")
    monkeypatch.setattr(deploy_module, "CHECK_GRACE_S", 5.0)  # the board is frozen well before
    monkeypatch.setattr(deploy_module, "CHECK_MIN_BYTES_PER_S", 1e15)
    monkeypatch.setattr(deploy_module, "CLEANUP_AFTER_ERROR_S", 2.0)
    monkeypatch.setattr(ssh_module, "PROBE_S", 4)
    frozen = FrozenBoard(board, "sha256sum", listener=True)  # new connections get no banner
    frozen.install(monkeypatch)
    try:
        assert main(board.cli(other_bundle, remote)) == 2
    finally:
        frozen.thaw()
    err = capsys.readouterr().err
    assert frozen.stopped
    assert err.strip().splitlines()[-1] == (
        f"nomoat deploy: error: checking the copy with `sha256sum` on {ALIAS} did not finish in 5 s: the board "
        "stopped answering; the bundle deployed before is unchanged. Check that the board is on and on this network, "
        f"and that `ssh {ALIAS} true` answers, then deploy again."), err
    assert tree_hashes(remote / "tiny-bundle") == before


@pytest.mark.ssh
def test_a_swap_ssh_could_not_even_send_is_no_unsettled_swap(board, bundle, other_bundle, remote, tmp_path,
                                                            monkeypatch, capsys):
    """ssh cannot connect as the swap is sent (the board's sshd went down: "Connection refused"): the swap never
    ran, so the line says the bundle deployed before stays, not that a swap may be under way."""
    deploy_bundle(bundle, board.host(), str(remote), android_app=False)
    before = tree_hashes(remote / "tiny-bundle")
    closed = client_config(tmp_path, free_port(), board.folder / "client_key", board.folder / "known_hosts")
    real_shell = SshHost.shell

    def shell(host, command, timeout=600):
        if "if mv " in command:  # swap_in's command goes to a port where nothing listens
            host = SshHost(host=host.host, ssh=host.ssh, config=str(closed), keepalive=host.keepalive)
        return real_shell(host, command, timeout)

    monkeypatch.setattr(SshHost, "shell", shell)
    assert main(board.cli(other_bundle, remote)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"nomoat deploy: error: moving the checked bundle into {remote}/tiny-bundle could not start on {ALIAS}, so "
        f"the bundle deployed before is unchanged: ssh to {ALIAS} failed: ") and "Connection refused" in last, err
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]  # its staging folder went
    assert tree_hashes(remote / "tiny-bundle") == before


@pytest.mark.ssh
def test_a_float16_cache_bundle_goes_to_a_board(board, bundle, tmp_path, remote):
    """The Python runtime on a board loads float16 caches (only the Android app refuses them)."""
    half = Path(shutil.copytree(bundle, tmp_path / "half"))
    manifest = json.loads((half / "manifest.json").read_text())
    manifest["onnx"]["kv_dtype"] = "float16"
    (half / "manifest.json").write_text(json.dumps(manifest, indent=2))
    result = deploy_bundle(half, board.host(), str(remote), android_app=False)
    assert tree_hashes(Path(result.device_path)) == tree_hashes(half)


@pytest.mark.ssh
def test_a_relative_remote_dir_is_taken_from_the_home_folder(board, bundle, capsys):
    relative = f".cache/nomoat-test-{os.getpid()}-{time.monotonic_ns()}"
    home = Path(board.host().home())
    try:
        assert main(board.cli(bundle, f"~/{relative}")) == 0
        assert capsys.readouterr().out.strip() == str(home / relative / "tiny-bundle")
        assert tree_hashes(home / relative / "tiny-bundle") == tree_hashes(bundle)
        assert main(board.cli(bundle, "~", "--name", relative.split("/")[-1])) == 0
        assert capsys.readouterr().out.strip() == str(home / relative.split("/")[-1])
    finally:
        shutil.rmtree(home / relative.split("/")[-1], ignore_errors=True)
        shutil.rmtree(home / relative, ignore_errors=True)


@pytest.mark.ssh
def test_bench_over_ssh_runs_nomoat_bench_there_and_prints_its_table(board, bundle, remote, tmp_path, capsys):
    python = traced_python(tmp_path)
    assert main(board.cli(bundle, remote, "--bench", "--prompt-tokens", "16", "--new-tokens", "8", "--rounds", "3",
                          "--threads", "1", "--remote-python", str(python))) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    deployed = str(remote / "tiny-bundle")
    assert lines[0] == deployed and lines[1] == ""
    assert lines[2].startswith(f"nomoat bench {deployed} on ") and "3 rounds after 1 warm-up" in lines[2]
    assert lines[4].split()[:3] == ["threads", "prompt", "new"] and lines[5].split()[:3] == ["1", "16", "8"]
    assert lines[4].endswith("of ceiling") and lines[5].endswith("%")  # the board's own bandwidth
    assert "GB/s at 1 thread" in out
    assert "round 3:" in err
    # The runtime check, the worker and the bandwidth probe all started behind sshd, not as
    # children of this process.
    starts = (tmp_path / "starts.log").read_text().splitlines()
    assert len(starts) == 3 and all(f"127.0.0.1 {board.port}" in s for s in starts), starts


@pytest.mark.ssh
def test_bench_over_ssh_json_holds_rounds_measured_on_the_board(board, bundle, remote, capsys):
    assert main(board.cli(bundle, remote, "--bench", "--prompt-tokens", "12", "--new-tokens", "6", "--rounds", "2",
                          "--remote-python", sys.executable, "--json")) == 0
    report = json.loads(capsys.readouterr().out)  # stdout is the JSON object alone
    assert report["host"] == ALIAS and report["device_path"] == str(remote / "tiny-bundle")
    [result] = report["results"]
    assert (result["prompt_tokens"], result["new_tokens"], report["rounds"]) == (12, 6, 2)
    assert result["name"] == f"nomoat on {ALIAS}"
    assert len(result["rounds"]) == 2
    for r in result["rounds"]:
        assert r["prompt_tokens"] == 12 and r["new_tokens"] == 6
        assert r["decode_tps"] > 0 and r["prefill_tps"] > 0 and r["peak_rss_bytes"] > 0
    assert report["machine"]["cpus"] == os.cpu_count()
    # The ceiling's inputs: the bundle's count and the board's bandwidth at the worker's threads.
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert result["weight_bytes_per_token"] == manifest["onnx"]["weight_bytes_per_token"]
    assert list(report["read_bandwidth_bytes_per_s"]) == [str(result["threads_used"])]
    assert report["read_bandwidth_bytes_per_s"][str(result["threads_used"])] > 1e8


def test_a_board_without_the_bandwidth_probe_loses_only_the_ceiling():
    from nomoat.converter.ssh_bench import read_bandwidth_over_ssh

    class Board:
        name = "pi"

        def __init__(self, reply):
            self.reply, self.commands = reply, []

        def shell(self, command, timeout=None):
            self.commands.append(command)
            return self.reply

    said = []
    old = Board(Reply("", "/usr/bin/python3: No module named nomoat.runtime.bandwidth\n", 1))
    assert read_bandwidth_over_ssh(old, "python3", [1, 4], said.append) == {}
    assert old.commands == ["python3 -m nomoat.runtime.bandwidth 1 4"]
    assert "No module named nomoat.runtime.bandwidth" in said[0] and "no ceiling column" in said[0]
    garbled = Board(Reply("not json\n", "", 0))
    assert read_bandwidth_over_ssh(garbled, "python3", [1], said.append) == {} and len(said) == 2
    for reply in ('[4.5e9]', '{"1": null}'):  # JSON, but not a map of rates
        assert read_bandwidth_over_ssh(Board(Reply(reply, "", 0)), "python3", [1], said.append) == {}
    assert len(said) == 4
    ok = Board(Reply('{"1": 4.5e9, "4": 9e9}', "", 0))
    assert read_bandwidth_over_ssh(ok, "python3", [1, 4], said.append) == {1: 4.5e9, 4: 9e9} and len(said) == 4
    # The rates are read from stdout alone: a login shell's warning on stderr does not cost the column.
    warned = Board(Reply('{"1": 4.5e9}\n', f"{LOCALE_WARNING}\n", 0))
    assert read_bandwidth_over_ssh(warned, "python3", [1], said.append) == {1: 4.5e9} and len(said) == 4


@pytest.mark.parametrize("error", [
    SshOverdue(SshHost(host="pi", ssh="ssh"), 300),  # the probe overran its time
    SshTimeout("ssh to pi failed: Timeout, server pi not responding.", seconds=None, advice="check the board"),
    SshError("ssh to pi failed: Connection refused."),
])
def test_a_bandwidth_probe_that_ssh_gives_up_on_loses_only_the_ceiling(error):
    """The rounds were measured already: ssh losing the board, or the probe overrunning its time, costs the ceiling
    column with a warning, not the whole benchmark."""
    from nomoat.converter.ssh_bench import read_bandwidth_over_ssh

    class Lost:
        name = "pi"

        def shell(self, command, timeout=None):
            raise error

    said = []
    assert read_bandwidth_over_ssh(Lost(), "python3", [1, 4], said.append) == {}
    assert said == [f"warning: could not measure the read bandwidth on pi ({error}); the table has no ceiling column"]


@pytest.mark.ssh
def test_bench_over_ssh_with_prompt_lookup_measures_it_next_to_plain_decoding(board, bundle, remote, capsys):
    assert main(board.cli(bundle, remote, "--bench", "--prompt-tokens", "12", "--new-tokens", "6", "--rounds", "2",
                          "--remote-python", sys.executable, "--json", "--prompt-lookup", "3")) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["prompt_lookup"], len(r["rounds"])) for r in report["results"]] == [(0, 2), (3, 2)]
    plain, lookup = report["results"]
    # The board's worker counts the lookup rounds' drafts; plain rounds have none to count.
    assert all(r["drafted_tokens"] is not None for r in lookup["rounds"])
    assert all(r["drafted_tokens"] is None for r in plain["rounds"])
    assert all(r["new_tokens"] == 6 for result in report["results"] for r in result["rounds"])


@pytest.mark.ssh
def test_bench_with_a_python_without_nomoat_fails_before_the_push(board, bundle, remote, tmp_path, capsys):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    assert main(board.cli(bundle, remote, "--bench", "--prompt-tokens", "8", "--new-tokens", "4",
                          "--remote-python", str(bare / "bin" / "python"))) == 2
    err = capsys.readouterr().err
    assert "cannot run nomoat's benchmark" in err and "No module named 'nomoat'" in err
    assert "pip wheel --no-deps -w dist ." in err and "--remote-python" in err
    # In a venv: Raspberry Pi OS refuses `python3 -m pip install` into its own Python (PEP 668).
    assert "python3 -m venv ~/nomoat-venv && ~/nomoat-venv/bin/pip install" in err
    assert not (remote / "tiny-bundle").exists()


@pytest.mark.ssh
def test_bench_with_another_nomoat_release_on_the_board_is_refused(board, bundle, remote, tmp_path, capsys):
    """Its metadata says 9.9.9 (a dist-info ahead on sys.path), as after `pip install nomoat` of another release."""
    from importlib.metadata import version

    site = tmp_path / "other-release"
    (site / "nomoat-9.9.9.dist-info").mkdir(parents=True)
    (site / "nomoat-9.9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: nomoat\nVersion: 9.9.9\n")
    python = tmp_path / "python-other-release"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    assert main(board.cli(bundle, remote, "--bench", "--prompt-tokens", "8", "--new-tokens", "4",
                          "--remote-python", str(python))) == 2
    err = capsys.readouterr().err
    assert f"nomoat-board has nomoat 9.9.9 and this computer {version('nomoat')}" in err
    assert f"pip install nomoat-{version('nomoat')}-py3-none-any.whl" in err
    assert not (remote / "tiny-bundle").exists()


@pytest.mark.ssh
def test_bench_with_a_missing_python_names_it(board, bundle, remote, capsys):
    assert main(board.cli(bundle, remote, "--bench", "--prompt-tokens", "8", "--new-tokens", "4",
                          "--remote-python", "no-such-python3")) == 2
    err = capsys.readouterr().err
    assert "'no-such-python3' is not a command on nomoat-board" in err
    assert not (remote / "tiny-bundle").exists()


@pytest.mark.ssh
def test_an_unknown_host_key_is_refused_with_the_fix(board, tmp_path):
    config = client_config(tmp_path, board.port, board.folder / "client_key", tmp_path / "empty_known_hosts")
    with pytest.raises(SshError, match=r"Host key verification failed.*connect once with `ssh nomoat-board`"):
        connect(ALIAS, str(config))


@pytest.mark.ssh
@pytest.mark.parametrize("level", ["ERROR", "QUIET", "DEBUG3"])
def test_a_key_the_board_does_not_know_is_refused_with_the_fix(board, tmp_path, level):
    """Whatever LogLevel the user's config sets (QUIET silences ssh's reason, DEBUG3 buries it under debug
    lines), nomoat reads ssh's reason at its default level."""
    keygen(tmp_path / "stranger")
    config = client_config(tmp_path, board.port, tmp_path / "stranger", board.folder / "known_hosts")
    config.write_text(config.read_text().replace("LogLevel ERROR", f"LogLevel {level}"))
    with pytest.raises(SshError, match=r"Permission denied.*ssh-copy-id nomoat-board"):
        connect(ALIAS, str(config))


@pytest.mark.ssh
def test_no_server_listening_is_refused_with_the_fix(board, bundle, tmp_path, capsys):
    config = client_config(tmp_path, free_port(), board.folder / "client_key", board.folder / "known_hosts")
    assert main(["deploy", str(bundle), "--ssh", ALIAS, "--ssh-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nomoat deploy: error: ssh to nomoat-board failed: ") and "Connection refused" in err
    assert "raspi-config" in err and len(err.strip().splitlines()) == 1


@pytest.mark.ssh
def test_shell_reports_output_and_exit_status(board):
    host = board.host()
    assert host.shell("echo out; echo err >&2; exit 3") == Reply("out\n", "err\n", 3)
    # Under sh whatever the login shell: POSIX syntax, quotes passed through intact.
    assert host.shell("x='a b'; printf '%s|' \"$x\" \"it's\"") == Reply("a b|it's|", "", 0)


@pytest.mark.ssh
def test_a_login_shell_that_warns_on_stderr_garbles_nothing(board, bundle, capsys):
    """A board whose login prints `bash: warning: setlocale: ...` on stderr: $HOME, the version check, the
    copy's checks and the bandwidth probe read stdout only; stderr is kept for the error messages."""
    noisy = connect(ALIAS, str(board.noisy_config))
    reply = noisy.shell("echo out; echo err >&2; exit 3")
    assert (reply.out, reply.status) == ("out\n", 3)
    assert reply.err == f"{LOCALE_WARNING}\nerr\n" and reply.error() == "err"
    home = board.host().home()
    assert noisy.home() == home
    relative = f".cache/nomoat-noisy-{os.getpid()}-{time.monotonic_ns()}"
    try:
        assert main(["deploy", str(bundle), "--ssh", ALIAS, "--ssh-config", str(board.noisy_config),
                     "--remote-dir", f"~/{relative}", "--bench", "--prompt-tokens", "8", "--new-tokens", "4",
                     "--rounds", "1", "--threads", "1", "--remote-python", sys.executable, "--json"]) == 0
        out, err = capsys.readouterr()
        report = json.loads(out)
        assert report["device_path"] == str(Path(home) / relative / "tiny-bundle")  # not $HOME + the warning
        assert tree_hashes(Path(report["device_path"])) == tree_hashes(bundle)
        assert report["read_bandwidth_bytes_per_s"]["1"] > 1e8  # the ceiling column is there
        assert "warning: could not measure" not in err
    finally:
        shutil.rmtree(Path(home) / relative, ignore_errors=True)
    with pytest.raises(DeployError, match=r"checking .* failed on nomoat-board \(exit 1\): .*denied$"):
        from nomoat.converter.deploy import shell

        shell(noisy, "echo 'cannot write: permission denied' >&2; exit 1", "checking the board")


@pytest.mark.ssh
def test_a_folder_that_is_not_a_bundle_is_refused_before_the_copy(board, bundle, remote, monkeypatch, capsys):
    """`--remote-dir /home/pi --name Documents` must not wipe the user's Documents; a bundle deployed before
    is replaced as ever, and --force replaces the folder all the same."""
    documents = remote / "Documents"
    documents.mkdir(parents=True)
    (documents / "thesis.tex").write_text("three years of work")
    (remote / "notes.txt").write_text("a file, not a folder")
    real_push, pushed = SshHost.push, []

    def counting_push(self, local, remote_path, timeout=None):
        pushed.append(local.name)
        real_push(self, local, remote_path, timeout)

    monkeypatch.setattr(SshHost, "push", counting_push)
    for name in ("Documents", "notes.txt"):
        assert main(board.cli(bundle, remote, "--name", name)) == 2
        err = capsys.readouterr().err
        assert f"{remote / name} on {ALIAS} exists and is not a bundle (it has no manifest.json)" in err
        assert "--force" in err and len(err.strip().splitlines()) == 1
    assert pushed == []  # refused before anything was copied
    assert (documents / "thesis.tex").read_text() == "three years of work"
    assert (remote / "notes.txt").read_text() == "a file, not a folder"
    assert sorted(p.name for p in remote.iterdir()) == ["Documents", "notes.txt"]  # no staging folder
    assert main(board.cli(bundle, remote, "--name", "Documents", "--force")) == 0
    assert tree_hashes(documents) == tree_hashes(bundle)
    assert sorted(p.name for p in remote.iterdir()) == ["Documents", "notes.txt"]


@pytest.mark.ssh
def test_a_python_that_prints_on_stdout_before_the_worker_does_not_break_the_bench(board, bundle, remote, tmp_path,
                                                                                  capsys):
    """A conda or pyenv notice, or a wrapper's echo, on stdout before the worker's ready message."""
    python = tmp_path / "noisy-python"
    python.write_text(f'#!/bin/sh\necho "conda: base environment activated"\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    assert main(board.cli(bundle, remote, "--bench", "--prompt-tokens", "8", "--new-tokens", "4", "--rounds", "1",
                          "--threads", "1", "--remote-python", str(python), "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert [len(r["rounds"]) for r in report["results"]] == [1]
    assert report["read_bandwidth_bytes_per_s"]  # the probe's last line is still its JSON


def running(pid: int) -> bool:
    """Whether the process is alive: neither gone nor a zombie waiting for its parent to reap it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone_from_the_board(pid: int, after: str) -> None:
    """Wait (10 s) until the worker is gone; otherwise kill it, so it is not left behind stopped, and fail."""
    gone = time.monotonic() + 10
    while running(pid):
        if time.monotonic() > gone:
            os.kill(pid, 9)
            pytest.fail(f"the worker {pid} still ran on the board after {after}")
        time.sleep(0.1)


def freezing_python(folder: Path, at_round: int) -> Path:
    """A Python for the board whose bench worker stops itself (SIGSTOP) when its round `at_round` begins,
    warm-up counted, after writing its pid to folder/frozen.pid: a worker hung on a board that still
    answers ssh, which ssh's keepalives never give up on."""
    site = folder / "freezing-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, signal\n"
        "import nomoat.runtime.bench as bench\n"
        "real, calls = bench.measure_once, []\n"
        "def measure_once(*args, **kwargs):\n"
        "    calls.append(1)\n"
        f"    if len(calls) == {at_round}:\n"
        f"        open({str(folder / 'frozen.pid')!r}, 'w').write(str(os.getpid()))\n"
        "        os.kill(os.getpid(), signal.SIGSTOP)\n"
        "    return real(*args, **kwargs)\n"
        "bench.measure_once = measure_once\n")
    script = folder / "freezing-python"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return script


@pytest.mark.ssh
def test_a_worker_hung_on_the_board_is_given_up_at_bench_timeout_and_killed_there(board, bundle, remote, tmp_path,
                                                                                 capsys):
    python = freezing_python(tmp_path, at_round=2)  # after the warm-up: loading and one round went well
    argv = board.cli(bundle, remote, "--bench", "--prompt-tokens", "8", "--new-tokens", "4", "--rounds", "3",
                     "--threads", "1", "--remote-python", str(python), "--bench-timeout", "20")
    outcome: list[int] = []
    began = time.monotonic()
    run = threading.Thread(target=lambda: outcome.append(main(argv)), daemon=True)
    run.start()
    run.join(timeout=120)
    frozen = tmp_path / "frozen.pid"
    pid = int(frozen.read_text()) if frozen.exists() else None
    if run.is_alive():  # the old way: waiting on the frozen worker for ever. Free it, then fail.
        if pid is not None:
            os.kill(pid, 9)
        run.join(timeout=30)
        pytest.fail("deploy --bench waited past --bench-timeout on a worker hung on the board")
    took = time.monotonic() - began
    out, err = capsys.readouterr()
    assert outcome == [2] and pid is not None
    assert out.strip() == str(remote / "tiny-bundle")  # deployed, whatever the benchmark did
    assert f"the benchmark on {ALIAS} had not finished within 20 s: worker 1 thr, 8+4 tok (pid {pid}) sent no " \
           "reply by the deadline, in round 2 (the warm-up counted), and was stopped." in err
    assert "give it longer with --bench-timeout" in err
    assert took < 20 + 60, took  # the deploy and the runtime check come before the benchmark's 20 s
    # Killed on the board, where the ssh client's end did not reach it (a zombie until its parent reaps it).
    assert_gone_from_the_board(pid, "the benchmark gave up")


@pytest.mark.ssh
def test_ctrl_c_during_a_hung_benchmark_kills_the_worker_on_the_board(board, bundle, remote, tmp_path):
    """Ctrl-C, how a user gives up long before --bench-timeout: typed at the terminal, it reaches nomoat and its
    ssh client, not the worker on the board, which would live on stopped (or swapping) there."""
    from pty_terminal import Terminal

    python = freezing_python(tmp_path, at_round=2)
    argv = [sys.executable, "-m", "nomoat", *board.cli(bundle, remote, "--bench", "--prompt-tokens", "8",
                                                        "--new-tokens", "4", "--rounds", "3", "--threads", "1",
                                                        "--remote-python", str(python))]
    # A terminal of its own, with Ctrl-C live whatever this test run inherited (`.ci/run &` ignores SIGINT).
    term = Terminal(argv)
    frozen = tmp_path / "frozen.pid"
    try:
        term.expect("benchmarking on", timeout=120)
        deadline = time.monotonic() + 120
        while not frozen.exists() or not frozen.read_text():
            assert time.monotonic() < deadline, f"the worker never reached its second round:\n{term.seen[-2000:]}"
            term._read(0.1)
        pid = int(frozen.read_text())
        term.send("\x03")  # Ctrl-C: SIGINT to the terminal's foreground group, nomoat and its ssh client
        status = term.wait(timeout=60)
    finally:
        term.close()
    assert_gone_from_the_board(pid, f"Ctrl-C:\n{term.seen[-2000:]}")
    assert status != 0 and str(remote / "tiny-bundle") in term.seen  # deployed before the benchmark
    assert "Traceback" not in term.seen, term.seen[-3000:]
    assert f"stopping the benchmark worker (pid {pid}) on {ALIAS}" in term.seen


@pytest.mark.ssh
def test_a_changed_host_key_says_how_to_remove_the_old_one(board, tmp_path):
    keygen(tmp_path / "old_host_key")
    old = (tmp_path / "old_host_key.pub").read_text().split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{board.port} {old[0]} {old[1]}\n")
    config = client_config(tmp_path, board.port, board.folder / "client_key", tmp_path / "known_hosts")
    with pytest.raises(SshError) as e:
        connect(ALIAS, str(config))
    said = str(e.value)
    assert said.startswith(f"ssh to {ALIAS} failed: Host key verification failed. the board's host key")
    assert f'-R "[127.0.0.1]:{board.port}"' in said and "reinstalled" in said and "intercepting" in said
    assert "and accept it" not in said  # the unknown-key advice, which ssh refuses here


# ssh's own words (OpenSSH 9.2) when the known key differs from the board's, e.g. after re-imaging a Pi.
CHANGED_KEY = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:zc+8pXAI15hYniDj7imGvGDxMGbmllapYKfZhXycZdI.
Please contact your system administrator.
Add correct host key in /home/me/.ssh/known_hosts to get rid of this message.
Offending ED25519 key in /home/me/.ssh/known_hosts:7
  remove with:
  ssh-keygen -f "/home/me/.ssh/known_hosts" -R "raspberrypi.local"
Host key for raspberrypi.local has changed and you have requested strict checking.
Host key verification failed.
"""


def test_a_changed_host_key_gets_its_own_fix_not_the_unknown_key_one():
    said = connection_failure("pi@raspberrypi.local", CHANGED_KEY)
    assert said.startswith("ssh to pi@raspberrypi.local failed: Host key verification failed. the board's")
    assert "failed.." not in said
    assert 'remove the old key with `ssh-keygen -f "/home/me/.ssh/known_hosts" -R "raspberrypi.local"`' in said
    assert "reinstalled" in said and "someone may be intercepting the connection" in said
    assert "and accept it" not in said
    # Without ssh's "remove with:" line, the generic command; an unknown key keeps its own advice.
    without = CHANGED_KEY.replace('  ssh-keygen -f "/home/me/.ssh/known_hosts" -R "raspberrypi.local"\n', "")
    assert "`ssh-keygen -R raspberrypi.local`" in connection_failure("pi@raspberrypi.local", without)
    assert "`ssh-keygen -R '[pi.lan]:2222'`" in connection_failure("ssh://me@pi.lan:2222", without)
    assert "`ssh-keygen -R pi`" in connection_failure("pi", without)
    unknown = connection_failure("pi", "No ED25519 host key is known for pi and you have requested strict "
                                       "checking.\nHost key verification failed.\n")
    assert unknown == ("ssh to pi failed: Host key verification failed. this computer does not know the board's "
                       "host key yet: connect once with `ssh pi` and accept it.")


@pytest.mark.parametrize("stderr, lost", [
    ("Timeout, server pi not responding.\n", "ssh gave up on the board (Timeout, server pi not responding)"),
    ("client_loop: send disconnect: Broken pipe\n",
     "the connection to the board broke (client_loop: send disconnect: Broken pipe)"),
    ("Read from remote host pi: Connection reset by peer\n",
     "the connection to the board broke (Read from remote host pi: Connection reset by peer)"),
])
def test_ssh_losing_the_board_is_a_timeout_of_the_step(stderr, lost):
    """ssh exits 255 for a connection it lost as for one it never made: a lost one is an SshTimeout (a
    TransportTimeout), so deploy names the step it cut off, with what ssh said and the fix."""
    error = ssh_failure("pi", stderr)
    assert isinstance(error, SshTimeout) and isinstance(error, TransportTimeout) and not error.never_ran
    assert error.seconds is None and error.symptom == lost
    assert error.advice == "check that the board is on and on this network"
    assert str(error).startswith(f"ssh to pi failed: {last_line(stderr).rstrip('.')}. the ")
    assert str(error).endswith("check that it is on and on this network.")


@pytest.mark.parametrize("stderr", [
    "ssh: connect to host pi port 22: Connection refused\n",
    "ssh: connect to host pi port 22: Connection timed out\n",
    "ssh: Could not resolve hostname pi: Name or service not known\n",
    "kex_exchange_identification: read: Connection reset by peer\n",
    "pi@pi: Permission denied (publickey).\n",
])
def test_ssh_not_getting_in_never_ran_the_command(stderr):
    error = ssh_failure("pi", stderr)
    assert type(error) is SshError and error.never_ran


def test_every_ssh_command_carries_keepalives(monkeypatch, tmp_path):
    """A board that drops off Wi-Fi mid-copy or mid-benchmark: ssh gives up after 4 unanswered probes 15 s apart."""
    from nomoat.converter import ssh as ssh_module
    from nomoat.converter.ssh_bench import worker_argv

    ran = []

    def fake_run(argv, **kwargs):
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0, b"/home/pi", b"")

    monkeypatch.setattr(ssh_module.subprocess, "run", fake_run)
    host = SshHost(host="pi", ssh="/usr/bin/ssh", config="/tmp/cfg")
    host.shell("true")
    host.home()
    (tmp_path / "f").write_bytes(b"x")
    host.push(tmp_path / "f", "/home/pi/nomoat/f")
    ran.append(worker_argv(host, "python3", {"bundle": "/home/pi/nomoat/b"}))
    assert len(ran) == 4
    for argv in ran:
        options = argv[:argv.index("--")]
        pairs = {options[i + 1] for i, o in enumerate(options) if o == "-o"}
        assert {"ServerAliveInterval=15", "ServerAliveCountMax=4", "BatchMode=yes", "LogLevel=INFO"} <= pairs, argv


@pytest.mark.ssh
def test_keepalives_give_way_to_the_users_own(board, tmp_path):
    """-o on the command line beats ~/.ssh/config: a user who set ServerAliveInterval for a host keeps it."""
    assert connect(ALIAS, str(board.config)).keepalive == KEEPALIVE  # the board's Host sets none
    config = tmp_path / "ssh_config"
    config.write_text(board.config.read_text() + f"\nHost {ALIAS}\n  ServerAliveInterval 5\n", encoding="utf-8")
    assert keepalive_options("ssh", "other", str(config)) == KEEPALIVE
    own = connect(ALIAS, str(config))
    assert own.keepalive == ()
    assert not any(a.startswith("ServerAlive") for a in own.command("true")), own.command("true")
    assert own.shell("echo up").out == "up\n"


# -- flag checks: refused before any connection, no sshd needed --


@pytest.mark.parametrize("transport", [["--ssh", "pi"], ["--adb"]])
@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan", "1e12", "soon"])
def test_a_bench_timeout_that_is_no_time_to_wait_is_refused(bundle, transport, value, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemExit) as exit_:
        main(["deploy", str(bundle), *transport, "--bench", "--bench-timeout", value])
    assert exit_.value.code == 2
    assert f"argument --bench-timeout: {value!r} is not a time to wait: give seconds above 0" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--ssh", "pi", "--serial", "X"], "--serial only applies with --adb"),
    (["--adb", "--ssh-config", "f"], "--ssh-config only applies with --ssh"),
    (["--adb", "--remote-python", "python3", "--bench"], "--remote-python only applies with --ssh"),
    (["--ssh", "pi", "--remote-python", "python3"], "--remote-python only applies with --bench"),
    (["--ssh=-oProxyCommand=x"], "is not a host"),
])
def test_flags_of_the_other_transport_are_refused(bundle, extra, message, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # neither adb nor ssh may be run for these
    assert main(["deploy", str(bundle), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("host, fixed", [("pi@raspberrypi.local:", "ssh://pi@raspberrypi.local:22"),
                                         ("pi@10.0.0.7:2222", "ssh://pi@10.0.0.7:2222"), ("board:22", "ssh://board:22")])
def test_a_host_with_scps_colon_or_a_port_is_refused_with_the_ssh_url(bundle, host, fixed, capsys, monkeypatch):
    """ssh looks the whole "host:2222" up as a name: the error was about names (raspberrypi.local, an IP)."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["deploy", str(bundle), "--ssh", host]) == 2
    err = capsys.readouterr().err
    assert f"--ssh {host!r}: ssh takes no ':' after the host" in err and f"Give {fixed}," in err, err


@pytest.mark.parametrize("host", ["pi@::1", "fe80::2", "ssh://pi@board:2222"])
def test_an_ipv6_address_or_an_ssh_url_gets_past_the_colon_check(bundle, host, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # then ssh itself is missing: the check after it
    assert main(["deploy", str(bundle), "--ssh", host]) != 0
    assert "ssh is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("remote_dir", ["~root/nomoat", "~pi", "~other/"])
def test_a_remote_dir_in_another_users_home_is_refused(bundle, remote_dir, capsys, monkeypatch):
    """~user is not expanded (no shell sees --remote-dir): it would become $HOME/~user/...; refused before ssh runs."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["deploy", str(bundle), "--ssh", "pi", "--remote-dir", remote_dir]) == 2
    err = capsys.readouterr().err
    assert err == (f"nomoat deploy: error: --remote-dir {remote_dir!r}: only ~ and ~/... (your home folder on the "
                   "board) are expanded, not ~user; give that folder's absolute path instead.\n")


def test_adb_and_ssh_are_exclusive(bundle, capsys):
    with pytest.raises(SystemExit):
        main(["deploy", str(bundle), "--adb", "--ssh", "pi"])
    assert "not allowed with argument" in capsys.readouterr().err
