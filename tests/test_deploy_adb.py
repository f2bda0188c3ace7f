"""`nomoat deploy --adb [--bench]` against the real adb client and server, with the device simulated
on loopback by fake_adbd (its "device" file system is this host's, under a temp dir; its `am` and
`logcat` run a simulated nomoat app, see simulated_app below).

A private adb server (`adb -P <free port>`, HOME in a temp dir) keeps the user's adb server and
keys out of it. The fake advertises no features, so adb uses the legacy shell (no exit status)
and sync protocols, as with an old phone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_adbd import BENCH_TAG, AppDied, FakeAdbDevice, with_run_id
from nomoat.__main__ import main
from nomoat.converter import deploy as deploy_module
from nomoat.converter.adb import AdbError, Device, find_adb, parse_devices, pick_device
from nomoat.converter.deploy import DeployError, deploy_bundle, parse_df_available_kib
from nomoat.converter.deploy_bench import parse_bench_lines
from nomoat.converter.transport import Reply
from nomoat.runtime.bench_worker import round_order

pytestmark = pytest.mark.android

# Missing adb fails the tests that need it (in the adb_server fixture), as kotlin_host does for
# kotlinc: `nox -s android` is where they run, and a skip there would hide that nothing ran.
ADB = shutil.which("adb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adb(port: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if ADB is None:
        pytest.fail("adb is not installed; Debian: apt-get install adb")
    return subprocess.run([ADB, "-P", str(port), *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=check)


def wait_for_state(port: int, serial: str, state: str = "device", timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (serial, state) in parse_devices(adb(port, "devices").stdout):
            return
        time.sleep(0.1)
    raise AssertionError(f"{serial} never became {state!r}: {adb(port, 'devices').stdout}")


def start_adb_server(port: int) -> None:
    adb(port, "start-server")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from tiny_models import tiny_fp32_bundle

    return tiny_fp32_bundle(tmp_path_factory, max_context=96, name="tiny-bundle")


@pytest.fixture(scope="module")
def padded_bundle(bundle, tmp_path_factory) -> Path:
    """The tiny bundle plus a listed 6 MB file: many sync DATA chunks and WRTE packets."""
    from tiny_models import padded_copy

    return padded_copy(bundle, tmp_path_factory.mktemp("padded") / "tiny-bundle", "padding.bin", 6 * 1024 * 1024 + 123)


@pytest.fixture(scope="module")
def adb_server(tmp_path_factory):
    """A private adb server on a free port, with HOME (adb keys) and TMPDIR (its log) in a temp dir."""
    home = tmp_path_factory.mktemp("adb-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("TMPDIR", str(home))
        for var in ("ADB", "ANDROID_SERIAL", "ANDROID_ADB_SERVER_PORT", "ANDROID_SDK_HOME", "ADB_VENDOR_KEYS"):
            mp.delenv(var, raising=False)
        port = free_port()
        start_adb_server(port)
        try:
            yield port
        finally:
            adb(port, "kill-server", check=False)


@pytest.fixture(scope="module")
def connected(adb_server):
    device = FakeAdbDevice().start()
    serial = f"127.0.0.1:{device.port}"
    try:
        out = adb(adb_server, "connect", serial).stdout
        assert "connected to" in out, out
        wait_for_state(adb_server, serial)
        yield device, serial
    finally:
        adb(adb_server, "disconnect", serial, check=False)
        device.stop()


@pytest.fixture
def fake(connected, monkeypatch, adb_server):
    """The fake device with its knobs reset, and a `Device` for it."""
    device, serial = connected
    device.reset()
    return device, Device(serial=serial, adb=ADB, server_port=adb_server)


@pytest.fixture
def remote(tmp_path) -> Path:
    """The remote dir on the "device": a host folder (the fake's file system is the host's)."""
    return tmp_path / "device" / "nomoat"


def deploy_cli(bundle: Path, serial: str, port: int, remote: Path, *extra: str) -> list[str]:
    return ["deploy", str(bundle), "--adb", "--serial", serial, "--adb-port", str(port),
            "--remote-dir", str(remote), *extra]


def sync_events(device: FakeAdbDevice) -> list[str]:
    return [detail for what, detail in device.events if what == "SYNC" or detail == "sync:"]


def test_cli_deploy_lands_every_file_byte_identical_and_prints_the_path(bundle, fake, remote, adb_server, capsys):
    device, dev = fake
    assert main(deploy_cli(bundle, dev.serial, adb_server, remote)) == 0
    out, err = capsys.readouterr()
    deployed = remote / "tiny-bundle"
    assert out.strip().splitlines()[-1] == str(deployed)
    assert tree_hashes(deployed) == tree_hashes(bundle)
    assert set(tree_hashes(deployed)) == set(json.loads((bundle / "manifest.json").read_text())["files"]) | {
        "manifest.json"}
    assert "pushing" in err and "model.onnx.data" in err and "MB/s" in err
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]  # no staging left
    # Readable by the app's user, whatever the local modes were (the converter writes 0600 weights).
    assert all(p.stat().st_mode & 0o004 for p in deployed.iterdir())


def count_hashing(monkeypatch) -> Counter[str]:
    """How often each file is hashed on this computer, by name: nomoat.runtime.manifest.sha256_file is
    what the runtime's bundle check and deploy's own both call."""
    from nomoat.runtime import manifest

    counts: Counter[str] = Counter()
    real = manifest.sha256_file

    def counted(path, *args, **kwargs):
        counts[Path(path).name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifest, "sha256_file", counted)
    return counts


def bundle_file_names(bundle: Path) -> list[str]:
    return [*json.loads((bundle / "manifest.json").read_text())["files"], "manifest.json"]


def test_cli_deploy_hashes_each_file_once(padded_bundle, fake, remote, adb_server, monkeypatch, capsys):
    """The check before connecting is the one the deploy uses: a bundle of gigabytes is read once here, not twice."""
    _, dev = fake
    hashed = count_hashing(monkeypatch)
    assert main(deploy_cli(padded_bundle, dev.serial, adb_server, remote)) == 0, capsys.readouterr().err
    assert hashed == Counter(bundle_file_names(padded_bundle))


def _deploy_altered_after_the_check(bundle, dev, remote, adb_server, tmp_path, monkeypatch, alter) -> int:
    """Deploy a copy of bundle over the one already deployed, running alter(copy) between deploy's check of
    the copy and its first contact with the phone; deploy's exit status."""
    from nomoat.converter import cli_deploy

    copy = Path(shutil.copytree(bundle, tmp_path / "tiny-bundle"))
    real_connect = cli_deploy.connect

    def alter_then_connect(args):
        alter(copy)
        return real_connect(args)

    monkeypatch.setattr(cli_deploy, "connect", alter_then_connect)
    return main(deploy_cli(copy, dev.serial, adb_server, remote))


def test_a_file_changed_after_the_check_is_not_swapped_in(bundle, fake, remote, adb_server, tmp_path, monkeypatch,
                                                          capsys):
    """The copy on the phone is compared with the hashes of the check before connecting: a file changed since
    (something still writing the bundle) never becomes the bundle, and the line says what happened."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")

    def flip_a_byte(copy: Path) -> None:
        data = bytearray((copy / "model.onnx.data").read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / "model.onnx.data").write_bytes(bytes(data))

    assert _deploy_altered_after_the_check(bundle, dev, remote, adb_server, tmp_path, monkeypatch, flip_a_byte) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"nomoat deploy: error: model.onnx.data changed on this computer after the bundle was checked (is something "
        f"writing to it?), so its copy on {dev.serial} was not swapped in; the bundle deployed before is unchanged. "
        "Deploy again once the bundle is complete."), err
    assert [c for c in device.shell_log if "sha256sum" in c]  # caught by the check on the phone
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == before


def test_a_file_gone_after_the_check_is_one_line(bundle, fake, remote, adb_server, tmp_path, monkeypatch, capsys):
    """The bundle re-converted while it was being deployed: a file the check read is gone by its push."""
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    assert _deploy_altered_after_the_check(bundle, dev, remote, adb_server, tmp_path, monkeypatch,
                                           lambda copy: (copy / "model.onnx.data").unlink()) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "nomoat deploy: error: model.onnx.data disappeared from this computer after the check (re-converted while "
        "deploying?); the bundle deployed before is unchanged. Deploy again once the bundle is complete."), err
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == before


def test_deploy_checks_sha256_on_the_device(bundle, fake, remote):
    device, dev = fake
    result = deploy_bundle(bundle, dev, str(remote))
    checks = [c for c in device.shell_log if "sha256sum" in c]
    assert len(checks) == 1
    # Checked, then written to storage, then swapped in under the bundle's name.
    order = [next(i for i, c in enumerate(device.shell_log) if found(c)) for found in (
        lambda c: "sha256sum" in c, lambda c: re.search(r"\(\s*sync\s*\)", c), lambda c: "if mv " in c)]
    assert order == sorted(order), device.shell_log
    for name in result.files:
        assert name in checks[0]
    assert result.bytes == sum(p.stat().st_size for p in bundle.iterdir()) and result.seconds > 0


def test_copy_damaged_on_the_device_is_caught_and_not_swapped_in(bundle, padded_bundle, fake, remote):
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    device.corrupt_on_push("padding.bin")  # adb push says OKAY, only sha256sum on the device can tell
    with pytest.raises(DeployError, match=r"padding\.bin on .* does not match its sha256 after the push \(the copy "
                       r"was damaged on the way or the storage is failing\), so it was not swapped in; the bundle "
                       r"deployed before is unchanged\. Deploy again\.$"):
        deploy_bundle(padded_bundle, dev, str(remote))
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == before


def test_redeploy_replaces_the_old_bundle(bundle, padded_bundle, fake, remote):
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    (remote / "tiny-bundle" / "stale.txt").write_text("from an older deploy")
    result = deploy_bundle(padded_bundle, dev, str(remote))
    assert result.device_path == str(remote / "tiny-bundle")
    assert tree_hashes(remote / "tiny-bundle") == tree_hashes(padded_bundle)  # stale.txt is gone
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]  # no .partial-*, no .old-*
    sends = [e for e in device.events if e[0] == "SEND" and "padding.bin" in e[1]]
    assert sends and int(sends[-1][1].split()[1]) > 90  # 6 MiB in 64 KiB sync chunks


def test_push_failure_midway_keeps_the_deployed_bundle(bundle, padded_bundle, fake, remote, adb_server, capsys):
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    device.reset()
    device.fail_on_push("model.onnx.data")
    assert main(deploy_cli(padded_bundle, dev.serial, adb_server, remote)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "error" in err and "model.onnx.data" in err and "No space left" in err
    assert [e for e in device.events if e[0] == "SEND" and "OKAY" in e[1]]  # some files went over first
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]  # staging removed
    assert tree_hashes(remote / "tiny-bundle") == before


def test_leftovers_of_a_killed_deploy_are_recovered(bundle, padded_bundle, fake, remote, monkeypatch):
    """Killed between the two renames: the old bundle sits at .NAME.old-*, beside a stale staging dir."""
    monkeypatch.setattr(deploy_module, "STALE_STAGING_S", 0)  # the staging dir counts as left long ago
    device, dev = fake
    deploy_bundle(bundle, dev, str(remote))
    before = tree_hashes(remote / "tiny-bundle")
    (remote / "tiny-bundle").rename(remote / ".tiny-bundle.old-0badf00d")
    (remote / ".tiny-bundle.partial-12345678").mkdir()
    (remote / ".tiny-bundle.partial-12345678" / "model.onnx").write_text("half")
    device.fail_on_push("model.onnx.data")  # this deploy fails too: what stays is the recovered old bundle
    with pytest.raises(DeployError, match="model.onnx.data"):
        deploy_bundle(padded_bundle, dev, str(remote))
    assert sorted(p.name for p in remote.iterdir()) == ["tiny-bundle"]
    assert tree_hashes(remote / "tiny-bundle") == before


def test_a_folder_that_is_not_a_bundle_is_refused_before_anything_is_pushed(bundle, fake, remote, adb_server,
                                                                            capsys):
    """REMOTE_DIR/NAME without a manifest.json is someone's files, not a bundle deployed before: the swap would
    delete them. Refused before a push, unless --force."""
    device, dev = fake
    photos = remote / "Photos"
    photos.mkdir(parents=True)
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    assert main(deploy_cli(bundle, dev.serial, adb_server, remote, "--name", "Photos")) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert f"{photos} on {dev.serial} exists and is not a bundle (it has no manifest.json)" in err and "--force" in err
    assert not [e for e in device.events if e[0] == "SEND"]  # nothing was pushed
    assert (photos / "holiday.jpg").read_bytes() == b"\xff\xd8 a photo"
    assert sorted(p.name for p in remote.iterdir()) == ["Photos"]  # no staging folder
    # A bundle deployed before (it has its manifest.json) is replaced as ever, and --force replaces the folder.
    deploy_bundle(bundle, dev, str(remote), name="tiny")
    deploy_bundle(bundle, dev, str(remote), name="tiny")
    assert main(deploy_cli(bundle, dev.serial, adb_server, remote, "--name", "Photos", "--force")) == 0
    assert tree_hashes(photos) == tree_hashes(bundle)
    assert sorted(p.name for p in remote.iterdir()) == ["Photos", "tiny"]


def test_not_enough_space_is_a_clear_error_and_nothing_is_pushed(bundle, fake, remote):
    device, dev = fake
    device.df_output = ("Filesystem      1K-blocks    Used Available Use% Mounted on\n"
                        "/dev/block/dm-5  115030328 114999000   100 100% /data\n")
    with pytest.raises(DeployError, match=r"not enough space .* needs 0\.5 MiB, only 0\.1 MiB is free"):
        deploy_bundle(bundle, dev, str(remote))
    assert sync_events(device) == []
    assert not (remote / "tiny-bundle").exists() and list(remote.iterdir()) == []


def test_corrupt_bundle_is_refused_before_touching_the_device(bundle, fake, remote, adb_server, tmp_path, capsys):
    device, dev = fake
    damaged = Path(shutil.copytree(bundle, tmp_path / "damaged"))
    data = bytearray((damaged / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged / "model.onnx.data").write_bytes(bytes(data))
    assert main(deploy_cli(damaged, dev.serial, adb_server, remote)) == 2
    err = capsys.readouterr().err
    assert "refusing to deploy" in err and "model.onnx.data" in err and "sha256" in err
    assert device.events == [] and device.shell_log == []  # not even a shell command
    assert not remote.exists()


def test_a_float16_cache_bundle_is_refused_before_touching_the_device(bundle, fake, remote, tmp_path):
    """The app binds float32 cache buffers: a bundle it would refuse is not pushed (90 MB for nothing)."""
    device, dev = fake
    half = Path(shutil.copytree(bundle, tmp_path / "half"))
    manifest = json.loads((half / "manifest.json").read_text())
    manifest["onnx"]["kv_dtype"] = "float16"
    (half / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(DeployError,
                       match=r"its KV cache is float16, .* convert it again without --kv-dtype \(e.g. --target"):
        deploy_bundle(half, dev, str(remote))
    assert device.events == [] and device.shell_log == []
    assert not remote.exists() or list(remote.iterdir()) == []


def test_deployed_copy_loads_with_the_runtime(bundle, fake, remote):
    from nomoat.runtime import Model

    _, dev = fake
    result = deploy_bundle(bundle, dev, str(remote), name="renamed")
    assert result.device_path == str(remote / "renamed")
    here = Model.load(bundle).generate("hello there", 8, temperature=0)
    there = Model.load(result.device_path).generate("hello there", 8, temperature=0)
    assert there.token_ids == here.token_ids and len(there.token_ids) > 0


def test_shell_reports_the_exit_status_despite_the_legacy_protocol(fake):
    _, dev = fake
    # The legacy shell has one stream: stderr arrives in stdout, as on old phones.
    assert dev.shell("echo out; echo err >&2; exit 3") == Reply("out\nerr\n", "", 3)
    assert dev.shell("printf 'no newline'") == Reply("no newline", "", 0)


@pytest.mark.parametrize("ignored", [(signal.SIGHUP,), (signal.SIGHUP, signal.SIGINT)])
def test_the_fake_phones_shells_start_with_default_signals(fake, ignored):
    """As adbd's shells do, whatever this test run ignores (`nohup` ignores SIGHUP, a script's background job
    SIGINT): otherwise a command that only survives the hangup of a dropped connection thanks to its own
    `trap '' HUP` (deploy.swap_in's) would pass its test without the trap."""
    _, dev = fake
    saved = {signum: signal.signal(signum, signal.SIG_IGN) for signum in ignored}
    try:
        status = dev.shell("cat /proc/self/status").out
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    mask = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    assert [s.name for s in (signal.SIGHUP, signal.SIGPIPE, signal.SIGINT) if mask & (1 << (s - 1))] == []


@pytest.fixture
def second_device(adb_server, monkeypatch):
    """Another simulated phone connected to the same adb server: its serial. $ANDROID_SERIAL unset."""
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    second = FakeAdbDevice().start()
    serial = f"127.0.0.1:{second.port}"
    try:
        adb(adb_server, "connect", serial)
        wait_for_state(adb_server, serial)
        yield serial
    finally:
        adb(adb_server, "disconnect", serial, check=False)
        second.stop()


def test_several_devices_need_a_serial(fake, adb_server, second_device):
    _, dev = fake
    with pytest.raises(AdbError, match="several devices") as e:
        pick_device(None, adb_server)
    assert dev.serial in str(e.value) and second_device in str(e.value) and "--serial" in str(e.value)
    assert "$ANDROID_SERIAL" in str(e.value)
    assert pick_device(second_device, adb_server).serial == second_device


def test_android_serial_chooses_the_device_as_for_adb(fake, adb_server, second_device, monkeypatch):
    """adb itself takes $ANDROID_SERIAL when given no -s; so does deploy when given no --serial."""
    _, dev = fake
    monkeypatch.setenv("ANDROID_SERIAL", second_device)
    assert pick_device(None, adb_server).serial == second_device
    assert pick_device(dev.serial, adb_server).serial == dev.serial  # --serial first, as adb's -s
    monkeypatch.setenv("ANDROID_SERIAL", "R58M-unplugged")
    with pytest.raises(AdbError, match=r"^no device 'R58M-unplugged' \(\$ANDROID_SERIAL\) in `adb devices`"):
        pick_device(None, adb_server)


def test_no_device_connected_is_a_clear_error(adb_server, bundle, tmp_path, capsys):
    port = free_port()
    start_adb_server(port)  # a fresh server: nothing connected
    try:
        assert main(["deploy", str(bundle), "--adb", "--adb-port", str(port), "--remote-dir", str(tmp_path)]) == 2
    finally:
        adb(port, "kill-server", check=False)
    err = capsys.readouterr().err
    assert err.startswith("nomoat deploy: error: no Android device found") and "USB debugging" in err
    assert "adb connect" in err and len(err.strip().splitlines()) == 1


def test_adb_missing_is_a_clear_error(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADB", "/nonexistent")
    assert main(["deploy", str(bundle), "--adb", "--remote-dir", str(tmp_path)]) == 2
    assert "'/nonexistent', which is not an executable" in capsys.readouterr().err
    monkeypatch.delenv("ADB")
    monkeypatch.setenv("PATH", str(tmp_path))  # no adb on PATH
    with pytest.raises(AdbError, match=r"adb is not installed .*apt install adb.*platform-tools"):
        find_adb()


def test_device_states_other_than_device_say_what_to_do(monkeypatch):
    import nomoat.converter.adb as adb_module

    monkeypatch.setattr(adb_module, "find_adb", lambda: "adb")
    for state, fix in [("unauthorized", "Allow USB debugging"), ("offline", "replug"),
                       ("no permissions (user in plugdev group); see [http://developer.android.com/tools/device.html]",
                        "udev")]:
        monkeypatch.setattr(adb_module, "list_devices", lambda *_a, state=state: [("R58M123", state)])
        with pytest.raises(AdbError, match=fix):
            pick_device()


def test_df_parsing_toybox_coreutils_and_wrapped():
    toybox = ("Filesystem      1K-blocks    Used Available Use% Mounted on\n"
              "/dev/block/dm-5  115030328 8012344 106886128   7% /data\n")
    coreutils = ("Filesystem     1K-blocks     Used Available Use% Mounted on\n"
                 "/dev/nvme0n1p2 490617784 52134712 413487816  12% /\n")
    wrapped = ("Filesystem           1K-blocks      Used Available Use% Mounted on\n"
               "/dev/mapper/very-long-volume-group-name-root\n"
               "                      490617784  52134712 413487816  12% /\n")
    assert parse_df_available_kib(toybox) == 106886128
    assert parse_df_available_kib(coreutils) == 413487816
    assert parse_df_available_kib(wrapped) == 413487816
    assert parse_df_available_kib("df: /x: No such file or directory\n") is None



# --- --bench: the nomoat app's benchmark mode, simulated ---


def simulated_app(logged: list[dict] | None = None):
    """Stands in for the Kotlin app (MainActivity.bench), which cannot run here: the same rounds,
    measured with the Python runtime on the deployed bundle, logged with the keys the app writes
    (GenerationStats.toBenchJson, then round and peak_rss_bytes, then open()'s bundle, verify_s,
    load_s, threads) and Android org.json's escaping of '/'. Each round line also goes to logged.
    With a prompt_lookup extra each round runs plain and with lookup (prompt_lookup in its line), in
    the order of the host's rounds: plain first in even rounds, lookup first in odd ones."""

    def app(extras: dict) -> object:
        from nomoat.runtime.bandwidth import read_bandwidth
        from nomoat.runtime.bench import NomoatEngine, measure_once, synthetic_prompt_ids
        from nomoat.runtime.manifest import read_manifest

        bundle = Path(extras["bundle"])  # an absolute path on the phone is the same path here
        threads = extras.get("threads") or None  # getIntExtra("threads", 0).takeIf { it > 0 }
        t0 = time.perf_counter()
        manifest = read_manifest(bundle, verify_files=True)
        t1 = time.perf_counter()
        lookup = extras.get("prompt_lookup", 0)
        engines = {n: NomoatEngine(str(bundle), threads=threads, prompt_lookup=n) for n in ([0, lookup] if lookup
                                                                                            else [0])}
        for engine in engines.values():
            engine.prepare()
        t2 = time.perf_counter()
        info = {"bundle": str(bundle), "verify_s": t1 - t0, "load_s": t2 - t1,
                "threads": threads if threads is not None else manifest.target.get("threads")}
        # The app's bandwidth probe (Bandwidth.readBytesPerSecond at its threads, before the rounds).
        probe_threads = info["threads"] or os.cpu_count()
        info |= {"read_bandwidth_bytes_per_s": read_bandwidth(probe_threads, megabytes=16),
                 "bandwidth_threads": probe_threads}
        prompt = synthetic_prompt_ids(bundle / manifest.tokenizer.tokenizer_file, extras.get("prompt_tokens", 128))
        for i in range(extras.get("rounds", 1)):
            for n, engine in round_order(list(engines.items()), i):  # Bench.roundOrder
                line = app_round_line(measure_once(engine, prompt, extras.get("new_tokens", 64)), i, n, info)
                if logged is not None:
                    logged.append(line)
                yield org_json(line)
        yield org_json({"done": True})

    return app


def app_round_line(r, round_index: int, lookup: int, info: dict) -> dict:
    """The line the app logs for a round (a RoundResult r): GenerationStats.toBenchJson's keys, then
    round and peak_rss_bytes, prompt_lookup on a lookup round, then open()'s info."""
    return {"prompt_tokens": r.prompt_tokens, "cached_tokens": 0, "new_tokens": r.new_tokens,
            "ttft_s": r.ttft_s, "decode_s": r.decode_s, "ttft_ms": r.ttft_ms,
            "prefill_tps": r.prefill_tps, "decode_tps": r.decode_tps,
            "drafted_tokens": r.drafted_tokens or 0, "accepted_tokens": r.accepted_tokens or 0,
            "round": round_index, "peak_rss_bytes": r.peak_rss_bytes,
            **({"prompt_lookup": lookup} if lookup else {}), **info}


def org_json(value: dict) -> str:
    r"""JSONObject.toString() on Android: compact, and '/' written as '\/' (JSONStringer)."""
    return json.dumps(value, separators=(",", ":")).replace("/", "\\/")


def bench_cli(bundle: Path, serial: str, port: int, remote: Path, *extra: str) -> list[str]:
    return deploy_cli(bundle, serial, port, remote, "--bench", "--prompt-tokens", "16", "--new-tokens", "8",
                      "--rounds", "3", "--bench-timeout", "20", *extra)  # a broken wait fails, not hangs


def stat_text(values: list[float], decimals: int) -> str:
    """'median (min–max)' computed here, independently of runtime/bench.py."""
    return f"{statistics.median(values):.{decimals}f} ({min(values):.{decimals}f}–{max(values):.{decimals}f})"


def test_bench_prints_the_apps_rounds_as_a_table(bundle, fake, remote, adb_server, capsys):
    device, dev = fake
    logged: list[dict] = []
    device.install_app(simulated_app(logged))
    assert main(bench_cli(bundle, dev.serial, adb_server, remote, "--threads", "2")) == 0
    out, err = capsys.readouterr()
    deployed = str(remote / "tiny-bundle")
    [extras] = device.app_starts
    run_id = extras.pop("bench_run")  # the id the app repeats in each line, so that only this run's are read
    assert extras == {"bundle": deployed, "bench": True, "prompt_tokens": 16, "new_tokens": 8, "rounds": 3,
                      "threads": 2}
    assert re.fullmatch(r"[0-9a-f]{16}", run_id)
    assert not any("logcat -c" in c for c in device.shell_log)  # the user's log is left as it is
    lines = out.splitlines()
    assert lines[0] == deployed and lines[1] == ""
    assert re.fullmatch(rf"nomoat bench {re.escape(deployed)} on FakeSoC \(\d+ CPUs\); 3 rounds after 0 warm-up, "
                        r"median \(min–max\); peak RSS: the worker's peak since it started, the model's load included",
                        lines[2])
    # (ro.soc.model and nproc of the "phone"; its app is the worker)
    assert lines[4].split()[:6] == ["threads", "prompt", "new", "prefill", "tok/s", "decode"]
    assert len(logged) == 3
    expected = ["2", "16", "8", stat_text([r["prefill_tps"] for r in logged], 1),
                stat_text([r["decode_tps"] for r in logged], 1), stat_text([r["ttft_ms"] for r in logged], 0),
                f"{max(r['peak_rss_bytes'] for r in logged) / 1e6:.0f}"]  # the app process's peak, not a median
    # ... and decode against the phone's ceiling: its bandwidth over the bundle's bytes a token.
    per_token = json.loads((bundle / "manifest.json").read_text())["onnx"]["weight_bytes_per_token"]
    ceiling = logged[0]["read_bandwidth_bytes_per_s"] / per_token
    expected.append(f"{statistics.median(r['decode_tps'] for r in logged) / ceiling:.0%}")
    assert lines[4].endswith("of ceiling")
    assert re.split(r"\s{2,}", lines[5].strip()) == expected
    assert "read where the rounds ran: " in lines[7] and "GB/s at 2 threads" in lines[7] and len(lines) == 9
    assert "round 3/3 on the phone" in err


def test_bench_json_holds_the_rounds_and_defaults_to_the_bundles_threads(bundle, fake, remote, adb_server, capsys):
    device, dev = fake
    logged: list[dict] = []
    device.install_app(simulated_app(logged))
    assert main(bench_cli(bundle, dev.serial, adb_server, remote, "--json")) == 0
    report = json.loads(capsys.readouterr().out)  # stdout is the JSON object alone
    assert "threads" not in device.app_starts[0]  # the app then takes the bundle's
    assert report["device_path"] == str(remote / "tiny-bundle") and report["serial"] == dev.serial
    [result] = report["results"]
    assert (result["prompt_tokens"], result["new_tokens"], report["rounds"]) == (16, 8, 3)
    assert [r["ttft_s"] for r in result["rounds"]] == [r["ttft_s"] for r in logged]
    assert [r["decode_s"] for r in result["rounds"]] == [r["decode_s"] for r in logged]
    assert result["summary"]["decode_tps"]["median"] == statistics.median(r["decode_tps"] for r in logged)
    assert result["threads"] == logged[0]["threads"]
    assert result["load_s"] == logged[0]["load_s"]
    probe = logged[0]["bandwidth_threads"]
    assert report["read_bandwidth_bytes_per_s"] == {str(probe): logged[0]["read_bandwidth_bytes_per_s"]}
    assert result["threads_used"] == probe
    per_token = json.loads((bundle / "manifest.json").read_text())["onnx"]["weight_bytes_per_token"]
    assert result["weight_bytes_per_token"] == per_token


def test_bench_report_without_the_apps_probe_has_no_ceiling():
    from nomoat.converter.deploy_bench import AppBench, bench_report
    from nomoat.runtime.bench import RoundResult

    r = RoundResult(prompt_tokens=16, new_tokens=8, ttft_s=0.1, decode_s=0.7, peak_rss_bytes=10**8)
    line = {**r.to_dict(), "threads": 4}  # an app from before the probe
    report = bench_report("/x", {}, AppBench([r], [line]), 1, None, 16, 8, weight_bytes_per_token=10**8)
    assert "read_bandwidth_bytes_per_s" not in report and "threads_used" not in report["results"][0]
    probed = {**line, "read_bandwidth_bytes_per_s": 2e10, "bandwidth_threads": 4}
    report = bench_report("/x", {}, AppBench([r], [probed]), 1, None, 16, 8, weight_bytes_per_token=10**8)
    assert report["read_bandwidth_bytes_per_s"] == {"4": 2e10} and report["results"][0]["threads_used"] == 4
    # a bundle older than the count: the phone's bandwidth alone sets no ceiling
    assert "read_bandwidth_bytes_per_s" not in bench_report("/x", {}, AppBench([r], [probed]), 1, None, 16, 8)


def test_bench_with_prompt_lookup_reports_plain_and_lookup_rounds_apart(bundle, fake, remote, adb_server, capsys):
    device, dev = fake
    logged: list[dict] = []
    device.install_app(simulated_app(logged))
    # 32 + 32 tokens: enough for the tiny model's answer to repeat itself, so drafts are made and kept.
    assert main(bench_cli(bundle, dev.serial, adb_server, remote, "--json", "--prompt-lookup", "3",
                          "--prompt-tokens", "32", "--new-tokens", "32")) == 0
    report = json.loads(capsys.readouterr().out)
    assert device.app_starts[0]["prompt_lookup"] == 3
    # The app alternates plain and lookup rounds, forward then backward; each kind is its own row with
    # its own rounds.
    assert [line.get("prompt_lookup", 0) for line in logged] == [0, 3, 3, 0, 0, 3]
    logged_plain = [line for line in logged if not line.get("prompt_lookup")]
    logged_lookup = [line for line in logged if line.get("prompt_lookup")]
    plain, lookup = report["results"]
    assert (plain["prompt_lookup"], lookup["prompt_lookup"]) == (0, 3)
    assert [r["decode_s"] for r in plain["rounds"]] == [line["decode_s"] for line in logged_plain]
    assert [r["decode_s"] for r in lookup["rounds"]] == [line["decode_s"] for line in logged_lookup]
    assert lookup["label"].endswith("lookup 3") and "lookup" not in plain["label"]
    # The app's draft counts reach the rounds, and the table's "drafts kept" column.
    assert [r["drafted_tokens"] for r in lookup["rounds"]] == [line["drafted_tokens"] for line in logged_lookup]
    assert sum(line["accepted_tokens"] for line in logged_lookup) > 0
    assert all(line["drafted_tokens"] == 0 for line in logged_plain)
    from nomoat.runtime.cli_bench import format_drafts, format_table

    assert format_drafts(lookup) != "-" and format_drafts(lookup) in format_table(report)


def test_bench_with_prompt_lookup_refuses_an_app_that_measured_none(bundle, fake, remote, adb_server, capsys):
    device, dev = fake
    old_app = simulated_app()
    device.install_app(lambda extras: old_app({k: v for k, v in extras.items() if k != "prompt_lookup"}))
    assert main(bench_cli(bundle, dev.serial, adb_server, remote, "--prompt-lookup", "3")) == 2
    err = capsys.readouterr().err
    assert "no prompt-lookup rounds" in err and "install the app built from this version" in err


def test_bench_error_from_the_app_exits_2_with_its_message(bundle, fake, remote, adb_server, capsys):
    device, dev = fake

    def failing_app(extras):
        yield org_json({"error": "no bundle named x in /sdcard/Android/data/dev.nomoat.app/files"})

    device.install_app(failing_app)
    assert main(bench_cli(bundle, dev.serial, adb_server, remote)) == 2
    out, err = capsys.readouterr()
    assert out.strip() == str(remote / "tiny-bundle")  # the deploy itself went through
    assert "nomoat deploy: error: the app's benchmark failed" in err
    assert "no bundle named x in /sdcard/Android/data/dev.nomoat.app/files" in err


def test_bench_without_the_app_says_to_install_it(bundle, fake, remote, adb_server, capsys):
    device, dev = fake  # reset: no app installed
    assert main(bench_cli(bundle, dev.serial, adb_server, remote)) == 2
    err = capsys.readouterr().err
    assert "the nomoat app is not installed" in err and "does not exist" in err
    assert "adb install -r app/build/outputs/apk/release/app-release.apk" in err


def fixed_round(extras: dict, round_index: int, lookup: int = 0, ttft_s: float = 0.05) -> str:
    """A round's line with the keys the app writes and fixed numbers, for a test that needs its lines at once:
    measuring (the model's load, the bandwidth probe) takes seconds on a cold run."""
    from nomoat.runtime.bench import RoundResult

    fixed = RoundResult(extras["prompt_tokens"], extras["new_tokens"], ttft_s, 0.4, 200_000_000)
    return org_json(app_round_line(fixed, round_index, lookup, {"bundle": extras["bundle"], "verify_s": 0.01,
                                                                "load_s": 0.1, "threads": 2,
                                                                "read_bandwidth_bytes_per_s": 1e10,
                                                                "bandwidth_threads": 2}))


def test_bench_gives_up_when_the_app_never_finishes(bundle, fake, remote, adb_server, capsys):
    device, dev = fake
    hang = threading.Event()

    def stuck_app(extras):
        yield fixed_round(extras, 0)  # one round logged at once, then never a "done"
        hang.wait(30)

    device.install_app(stuck_app)
    start = time.monotonic()
    try:
        assert main(bench_cli(bundle, dev.serial, adb_server, remote, "--bench-timeout", "1.5")) == 2
    finally:
        hang.set()
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert "round 1/3 on the phone" in err and "logged 1 of 3 rounds and no end within 2 s" in err, err
    assert "--bench-timeout" in err
    assert any("am force-stop dev.nomoat.app" in c for c in device.shell_log)  # not left benchmarking


def test_bench_says_at_once_when_the_app_dies_without_a_word(bundle, fake, remote, adb_server, capsys):
    """A native crash or the low-memory killer logs no error line: the process gone is what says it, not the
    rest of --bench-timeout."""
    device, dev = fake

    def crashing_app(extras):
        yield fixed_round(extras, 0)
        raise AppDied

    device.install_app(crashing_app)
    start = time.monotonic()
    assert main(bench_cli(bundle, dev.serial, adb_server, remote, "--bench-timeout", "60")) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "the app died on" in err and "after 1 of 3 rounds" in err and "logcat -b crash" in err, err


def test_bench_refuses_a_phone_whose_screen_is_off(bundle, fake, remote, adb_server, capsys):
    """A sleeping phone runs its front app on the little cores ("top-sleeping"): numbers of the wrong cores."""
    device, dev = fake
    device.install_app(simulated_app())
    device.wakefulness = "Asleep"
    assert main(bench_cli(bundle, dev.serial, adb_server, remote)) == 2
    out, err = capsys.readouterr()
    assert out.strip() == str(remote / "tiny-bundle")  # deployed; only the bench was refused
    assert "screen of" in err and "is off (mWakefulness=Asleep)" in err and "KEYCODE_WAKEUP" in err, err
    assert device.app_starts == []  # never started on the slow cores
    device.wakefulness = "Awake"
    assert main(bench_cli(bundle, dev.serial, adb_server, remote)) == 0


@pytest.mark.parametrize("clear_status", [1, 0], ids=["clear-fails", "clear-does-nothing"])
def test_bench_reads_only_its_own_runs_lines(bundle, fake, remote, adb_server, capsys, clear_status):
    """The log may still hold earlier runs' lines: `logcat -c` fails on a phone whose log another reader streams
    (Android Studio's Logcat), or may clear nothing. An earlier run's rounds, done and error, tagged with its own
    id or with none (an app older than run ids), are neither this run's numbers nor its end."""
    device, dev = fake
    device.ignore_logcat_clear(clear_status)
    earlier = {"prompt_tokens": 16, "new_tokens": 8, "bundle": "/data/local/tmp/nomoat/earlier"}
    for run_id in ("0123456789abcdef", None):
        for i in range(3):
            device.log_line("I", BENCH_TAG, with_run_id(fixed_round(earlier, i, ttft_s=0.999), run_id))
        device.log_line("I", BENCH_TAG, with_run_id(org_json({"done": True}), run_id))
    device.log_line("I", BENCH_TAG, with_run_id(org_json({"error": "an earlier run's failure"}), "fedcba9876543210"))
    device.install_app(lambda extras: iter([*(fixed_round(extras, i) for i in range(3)), org_json({"done": True})]))
    assert main(bench_cli(bundle, dev.serial, adb_server, remote, "--json")) == 0, capsys.readouterr().err
    [result] = json.loads(capsys.readouterr().out)["results"]
    assert [r["ttft_s"] for r in result["rounds"]] == [0.05] * 3


def test_bench_refuses_an_app_that_does_not_tag_its_lines(bundle, fake, remote, adb_server, capsys):
    """An app older than run ids: its end is seen for what it is, not waited for until --bench-timeout."""
    device, dev = fake

    def untagged_app(extras):
        time.sleep(1.5)  # after the first read of the log, as the app's load takes seconds
        yield from (fixed_round(extras, i) for i in range(3))
        yield org_json({"done": True})

    device.install_app(untagged_app, tags_run=False)
    start = time.monotonic()
    assert main(bench_cli(bundle, dev.serial, adb_server, remote)) == 2
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"nomoat deploy: error: the app on {dev.serial} ended its benchmark without this run's id in its "
                   "lines (an app older than run ids); install the app built from this version of nomoat.")


@pytest.mark.parametrize("plain, lookup, missing", [
    (1, 0, "1 of 3 rounds"),
    (0, 0, "0 of 3 rounds"),
    (3, 1, "1 of 3 prompt-lookup rounds"),
    (2, 1, "2 of 3 plain rounds and 1 of 3 prompt-lookup rounds"),
])
def test_bench_with_rounds_missing_from_the_log_says_so(bundle, fake, remote, adb_server, capsys, plain, lookup,
                                                        missing):
    """logcat drops lines when its buffer turns over faster than it is read: fewer rounds than asked for before
    the app's done are an error that says so, not a summary of the rest (nor, of none, a traceback)."""
    device, dev = fake
    lookup_flags = ("--prompt-lookup", "3") if "lookup" in missing else ()

    def app(extras):
        yield from (fixed_round(extras, i) for i in range(plain))
        yield from (fixed_round(extras, i, lookup=3) for i in range(lookup))
        yield org_json({"done": True})

    device.install_app(app)
    assert main(bench_cli(bundle, dev.serial, adb_server, remote, *lookup_flags)) == 2
    out, err = capsys.readouterr()
    assert out.strip() == str(remote / "tiny-bundle")  # the deploy itself went through
    assert err.strip().splitlines()[-1] == (
        f"nomoat deploy: error: the app on {dev.serial} said done after only {missing} in its log; logcat may have "
        "dropped lines (its buffer is the whole phone's, and small): enlarge it with `adb logcat -G 16M` and deploy "
        "again with --bench."), err
    assert "Traceback" not in err


def test_bench_counts_each_round_once_as_the_log_turns_over(bundle, fake, remote, adb_server, capsys):
    """A round read at one poll may be gone from the log at the next (logcat's ring buffer), shifting the
    others: each round is still counted once, in the progress lines and in the table."""
    device, dev = fake

    def after_two_reads() -> None:  # the second read of the log after now began after the first one ended
        reads = sum("logcat -d" in c for c in device.shell_log)
        deadline = time.monotonic() + 10
        while sum("logcat -d" in c for c in device.shell_log) < reads + 2 and time.monotonic() < deadline:
            time.sleep(0.05)

    def app(extras):
        yield fixed_round(extras, 0, ttft_s=0.01)
        after_two_reads()
        device.drop_oldest_log_lines(1, BENCH_TAG)  # round 0 read, then gone
        yield fixed_round(extras, 1, ttft_s=0.02)
        after_two_reads()
        yield fixed_round(extras, 2, ttft_s=0.03)
        yield org_json({"done": True})

    device.install_app(app)
    assert main(bench_cli(bundle, dev.serial, adb_server, remote, "--json")) == 0
    out, err = capsys.readouterr()
    [result] = json.loads(out)["results"]
    assert [r["ttft_s"] for r in result["rounds"]] == [0.01, 0.02, 0.03]
    progress = [line.split(":")[0].strip() for line in err.splitlines() if "on the phone:" in line]
    assert progress == ["round 1/3 on the phone", "round 2/3 on the phone", "round 3/3 on the phone"]
    assert "TTFT 20 ms" in next(line for line in err.splitlines() if "round 2/3" in line)


def test_bench_request_is_checked_before_deploying(bundle, fake, remote, adb_server, capsys):
    device, dev = fake
    assert main(deploy_cli(bundle, dev.serial, adb_server, remote, "--bench", "--prompt-tokens", "90",
                           "--new-tokens", "10")) == 2
    assert "exceed the bundle's context of 96 tokens" in capsys.readouterr().err
    assert main(deploy_cli(bundle, dev.serial, adb_server, remote, "--rounds", "2", "--json")) == 2
    assert "--rounds, --json only apply with --bench" in capsys.readouterr().err
    assert main(deploy_cli(bundle, dev.serial, adb_server, remote, "--prompt-lookup", "4")) == 2
    assert "--prompt-lookup only applies with --bench" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(deploy_cli(bundle, dev.serial, adb_server, remote, "--bench", "--prompt-lookup", "-1"))
    assert e.value.code == 2 and "'-1' is not a number of drafted tokens" in capsys.readouterr().err
    assert device.shell_log == [] and not remote.exists()


def test_bench_lines_are_read_from_raw_or_prefixed_logcat_output():
    text = ("--------- beginning of main\n"
            '{"prompt_tokens":4,"ttft_s":0.5,"bundle":"\\/data\\/local\\/tmp\\/nomoat\\/b"}\n'
            '05-01 10:00:00.123  4242  4263 I nomoat-bench: {"done":true}\n'
            "I/nomoat-bench( 4242): {not json\n")
    assert parse_bench_lines(text) == [{"prompt_tokens": 4, "ttft_s": 0.5, "bundle": "/data/local/tmp/nomoat/b"},
                                       {"done": True}]
