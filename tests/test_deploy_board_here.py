"""`nomoat deploy --ssh` to a board that is this computer: SshHost runs a stand-in for the `ssh` program
that skips its options and runs the command here, with the board's tools taken from a folder of its own
(Debian's sh and coreutils; busybox's; or toybox's with mksh, as on an Android phone, when installed).
No sshd, so these run with the unit tests: what they check is deploy's own work on the device, the shell
commands of its cleanup, check and swap, and the words of its messages; test_deploy_ssh.py has the real
OpenSSH, test_deploy_adb.py the real adb.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from nomoat.__main__ import main
from nomoat.converter import deploy as deploy_module
from nomoat.converter import transport
from nomoat.converter.deploy import BundleFile, DeployError, check_name, deploy_bundle
from nomoat.converter.ssh import SshHost

HOST = "fake-board"
# ssh as SshHost runs it (options, "--", the host, the command for the login shell). FAKE_BOARD_PATH: the
# board's tools. FAKE_BOARD_STALL_ON: a command holding that text is stuck there (as on a failing SD card);
# FAKE_BOARD_FAIL_ON: one holding that text fails, saying FAKE_BOARD_FAIL_WITH.
FAKE_SSH = """#!/bin/sh
while [ "$1" != "--" ]; do shift; done
shift 2
case "$1" in
  *"${FAKE_BOARD_STALL_ON:-<none>}"*) exec sleep 30;;
  *"${FAKE_BOARD_FAIL_ON:-<none>}"*) echo "$FAKE_BOARD_FAIL_WITH" >&2; exit 1;;
esac
PATH=${FAKE_BOARD_PATH:-$PATH} exec /bin/sh -c "$1"
"""


def toolbox(folder: Path, program: str, applets: list[str], sh: str) -> Path:
    """folder with a link to program for each of its applets, and sh as `sh`: a board with only those tools."""
    folder.mkdir()
    for applet in applets:
        (folder / applet).symlink_to(program)
    (folder / "sh").unlink(missing_ok=True)
    (folder / "sh").symlink_to(sh)
    return folder


def tools_folder(kind: str, folder: Path) -> Path | None:
    """The board's tools: None for this computer's own (dash or bash, coreutils)."""
    if kind == "coreutils":
        return None
    if kind == "busybox":
        busybox = shutil.which("busybox")
        if busybox is None:
            pytest.skip("busybox is not installed (Debian: apt-get install busybox)")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
        return toolbox(folder, busybox, applets, busybox)
    toybox, mksh = shutil.which("toybox"), shutil.which("mksh")
    if toybox is None or mksh is None:
        pytest.skip("toybox or mksh is not installed: Android's shell and tools (Debian: apt-get install toybox mksh)")
    applets = subprocess.run([toybox], capture_output=True, text=True, check=True).stdout.split()
    return toolbox(folder, toybox, applets, mksh)


@pytest.fixture
def ssh_here(tmp_path) -> Path:
    script = tmp_path / "ssh"
    script.write_text(FAKE_SSH)
    script.chmod(0o755)
    return script


@pytest.fixture
def board(ssh_here) -> SshHost:
    """A board with this computer's own tools."""
    return SshHost(host=HOST, ssh=str(ssh_here))


# toybox's case runs with the Android tests (`nox -s android`), whose CI step installs toybox beside adb.
@pytest.fixture(params=["coreutils", "busybox", pytest.param("toybox", marks=pytest.mark.android)])
def any_board(request, ssh_here, tmp_path, monkeypatch) -> SshHost:
    """A board with coreutils, one with busybox alone, and an Android phone's toybox and mksh."""
    folder = tools_folder(request.param, tmp_path / "tools")
    if folder is not None:
        monkeypatch.setenv("FAKE_BOARD_PATH", str(folder))
    return SshHost(host=HOST, ssh=str(ssh_here))


@pytest.fixture
def remote(tmp_path) -> Path:
    return tmp_path / "board" / "nomoat"


Bundle = tuple[Path, list[BundleFile]]


def small_bundle(folder: Path, tag: str, weights: str = "w.bin") -> Bundle:
    """A folder with a weights file and manifest.json, and the files as deploy's check would list them."""
    folder.mkdir(parents=True)
    files = []
    for name, body in ((weights, f"weights {tag}\n".encode()), ("manifest.json", f'{{"tag": "{tag}"}}\n'.encode())):
        (folder / name).write_bytes(body)
        files.append(BundleFile(name, folder / name, hashlib.sha256(body).hexdigest(), len(body)))
    return folder, files


@pytest.fixture
def bundles(tmp_path) -> tuple[Bundle, Bundle]:
    return small_bundle(tmp_path / "a" / "m", "A"), small_bundle(tmp_path / "b" / "m", "B", weights="b.bin")


def deploy(device, bundle: Bundle, remote: Path, name: str = "m"):
    folder, files = bundle
    return deploy_bundle(folder, device, str(remote), name=name, android_app=False, checked=files)


def tree(folder: Path) -> dict[str, str]:
    """Every path under folder, with a file's text."""
    return {str(p.relative_to(folder)): "" if p.is_dir() else p.read_text() for p in sorted(folder.rglob("*"))}


def holds(folder: Path, bundle: Bundle) -> bool:
    return tree(folder) == {f.name: f.path.read_text() for f in bundle[1]}


class Hooked:
    """The board, with after_push(n, remote) run after its n-th push and before_shell(command) before each command."""

    def __init__(self, board: SshHost, after_push=None, before_shell=None):
        self.board, self.pushes = board, 0
        self.after_push = after_push or (lambda _n, _remote: None)
        self.before_shell = before_shell or (lambda _command: None)

    @property
    def name(self) -> str:
        return self.board.name

    @property
    def words(self):
        return self.board.words

    def shell(self, command: str, timeout: float | None = 600):
        self.before_shell(command)
        return self.board.shell(command, timeout)

    def push(self, local, remote, timeout=None):
        self.board.push(local, remote, timeout)
        self.pushes += 1
        self.after_push(self.pushes, remote)


# --- what the cleanup before a deploy takes for a leftover ---


def test_folders_that_only_look_like_a_deploys_own_are_left_alone(any_board, bundles, remote, monkeypatch):
    """The cleanup before deploying m touches only .m.KIND-TAG (8 lowercase hex digits): not a user's
    .m.old-backup, nor the folders of a bundle named m.old-1 (deployed before such names were refused) with a copy
    and a swap of its own under way, even when any staging folder counts as left behind."""
    _, new = bundles
    others = {"m.old-1/manifest.json": "the bundle m.old-1", ".m.old-1.partial-deadbeef/w.bin": "its copy, half",
              ".m.old-1.old-abcd1234/manifest.json": "its old bundle, moved aside", ".m.old-1.swapping/": "",
              ".m.old-backup/notes.txt": "mine", ".m.partial-notes/notes.txt": "mine too",
              ".m.trash-can/notes.txt": "and mine", ".m.old-0BADF00D/notes.txt": "not nomoat's: upper case"}
    for path, text in others.items():
        if path.endswith("/"):
            (remote / path).mkdir(parents=True)
        else:
            (remote / path).parent.mkdir(parents=True, exist_ok=True)
            (remote / path).write_text(text)
    before = tree(remote)
    monkeypatch.setattr(deploy_module, "STALE_STAGING_S", 0)
    deploy(any_board, new, remote)
    assert holds(remote / "m", new)
    assert {p: text for p, text in tree(remote).items() if p != "m" and not p.startswith("m/")} == before


def test_a_killed_deploys_leftovers_are_recovered(any_board, bundles, remote, monkeypatch):
    """Killed between the two renames: the old bundle sits at .m.old-TAG, beside its staging folder, long left
    (STALE_STAGING_S shrunk), and a killed cleanup's trash. The next deploy puts the old bundle back and removes
    the rest, even when its own copy then fails."""
    old, new = bundles
    deploy(any_board, old, remote)
    (remote / "m").rename(remote / ".m.old-0badf00d")
    (remote / ".m.partial-12345678").mkdir()
    (remote / ".m.partial-12345678" / "w.bin").write_text("half")
    (remote / ".m.trash-89abcdef" / ".m.partial-00000000").mkdir(parents=True)
    monkeypatch.setattr(deploy_module, "STALE_STAGING_S", 0)
    monkeypatch.setenv("FAKE_BOARD_FAIL_ON", "cat > ")
    monkeypatch.setenv("FAKE_BOARD_FAIL_WITH", "cat: write error: No space left on device")
    with pytest.raises(DeployError, match="No space left"):
        deploy(any_board, new, remote)
    assert sorted(os.listdir(remote)) == ["m"]
    assert holds(remote / "m", old)


def test_a_full_disk_names_the_hidden_folders_interrupted_deploys_left_and_how_to_remove_them(
        any_board, bundles, remote, monkeypatch):
    """A deploy killed mid-copy leaves .NAME.partial-TAG, which `ls` does not show. Once it fills the disk, even
    the cleanup's lock folder cannot be made: the error says the disk is full and names what to remove, where it
    said "cleaning up after an earlier interrupted deploy failed" (and the space check said "delete old bundles")."""
    old, new = bundles
    deploy(any_board, old, remote)
    (remote / ".other.partial-12345678").mkdir()
    (remote / ".other.partial-12345678" / "w.bin").write_bytes(b"x" * 300_000)
    monkeypatch.setenv("FAKE_BOARD_FAIL_ON", ".m.swapping")
    monkeypatch.setenv("FAKE_BOARD_FAIL_WITH", "mkdir: cannot create directory '.m.swapping': No space left on device")
    with pytest.raises(DeployError, match=r"the disk holding .* is full .*not even the deploy.s lock folder could be "
                                          r"made; the bundle "
                                          r"deployed before is unchanged.*\.other\.partial-12345678 \(.*B\).*"
                                          r"rm -rf .*/\.other\.partial-12345678"):
        deploy(any_board, new, remote)
    monkeypatch.delenv("FAKE_BOARD_FAIL_ON")
    monkeypatch.setattr(deploy_module, "parse_df_available_kib", lambda out: 0)  # the space check's turn
    with pytest.raises(DeployError, match=r"not enough space .* needs \d+ KiB, only 0 KiB is free.*"
                                          r"rm -rf .*/\.other\.partial-12345678, then deploy again"):
        deploy(any_board, new, remote)
    assert holds(remote / "m", old)


def test_a_second_deploy_of_the_same_name_leaves_a_copy_under_way_alone(any_board, bundles, remote, tmp_path):
    """Two deploys of m at once: the second's cleanup leaves the first's staging folder alone (it changed moments
    ago), so both go through; the one that swaps last holds the name. Before, the cleanup removed the first's copy
    and the first blamed the board's storage."""
    old, new = bundles
    third = small_bundle(tmp_path / "c" / "m", "C")
    deploy(any_board, old, remote)
    second = []

    def deploy_again(n: int, _remote: str) -> None:
        if n == 1:
            second.append(deploy(any_board, third, remote))

    deploy(Hooked(any_board, after_push=deploy_again), new, remote)
    assert second  # it went through, mid-way through the first
    assert holds(remote / "m", new)
    assert sorted(os.listdir(remote)) == ["m"]


def test_a_staging_folder_left_behind_stays_until_it_is_stale(any_board, bundles, remote, monkeypatch):
    """A deploy that could not remove its staging folder (the board had gone silent) leaves it: the next deploy
    does not know it from a copy under way until nothing has changed in it for STALE_STAGING_S."""
    old, new = bundles
    left = remote / ".m.partial-0123abcd"
    left.mkdir(parents=True)
    (left / "w.bin").write_text("half")
    deploy(any_board, old, remote)
    assert sorted(os.listdir(remote)) == [left.name, "m"]
    monkeypatch.setattr(deploy_module, "STALE_STAGING_S", 0)
    deploy(any_board, new, remote)
    assert sorted(os.listdir(remote)) == ["m"]


@pytest.mark.parametrize("made", ["eleven minutes ago", "half a minute ago"])
def test_a_lock_left_behind_is_cleared_and_a_young_one_kept(any_board, bundles, remote, made):
    old, new = bundles
    deploy(any_board, old, remote)
    lock = remote / ".m.swapping"
    lock.mkdir()
    ago = 11 * 60 if made == "eleven minutes ago" else 30
    os.utime(lock, (time.time() - ago,) * 2)
    if made == "eleven minutes ago":
        deploy(any_board, new, remote)
        assert sorted(os.listdir(remote)) == ["m"] and holds(remote / "m", new)
    else:
        with pytest.raises(DeployError, match=r"a swap from an earlier deploy may still be running"):
            deploy(any_board, new, remote)
        assert sorted(os.listdir(remote)) == [".m.swapping", "m"] and holds(remote / "m", old)


# --- bundle names ---


@pytest.mark.parametrize("name, infix", [("m.old-1", ".old-"), ("m.partial-00ff00ff", ".partial-"),
                                         ("x.trash-1", ".trash-"), ("m.swapping", ".swapping"),
                                         ("a.old-b.c", ".old-")])
def test_a_name_holding_a_deploys_own_infix_is_refused(name, infix):
    """A bundle named m.old-1 has its staging folder at .m.old-1.partial-TAG: a folder of the form bundle m's
    cleanup is after, were it not for the TAG. Such names are refused outright."""
    with pytest.raises(DeployError) as caught:
        check_name(name)
    assert str(caught.value) == (
        f"bundle name {name!r} holds {infix!r}, which deploy keeps for its own folders beside a bundle "
        "(.NAME.partial-*, .NAME.old-*, .NAME.trash-*, .NAME.swapping); pass --name with a name without it.")


@pytest.mark.parametrize("name", ["a\nb", "a\tb", "a\\b", "a*b", "a?b", "a b", "a'b", "a$b", "../up", "a/b", ".",
                                  "..", ".hidden", "-x", "", "x" * 201, "x" * 245, "modèle", "m\n"])
def test_a_name_that_is_not_plain_is_refused(name):
    with pytest.raises(DeployError) as caught:
        check_name(name)
    assert str(caught.value) == (
        f"bundle name {name!r} cannot be a folder name on the device; pass --name with a plain name (ASCII letters, "
        "digits, '.', '-', '_', not starting with '.' or '-', at most 200 characters).")


@pytest.mark.parametrize("name", ["tiny-bundle", "SmolLM2-135M-Instruct.int4", "_x", "v1.2", "a..b", "m.old",
                                  "m.partial", "x" * 200])
def test_plain_names_pass(name):
    check_name(name)


def test_the_longest_name_fits_beside_its_staging_folder(board, bundles, remote):
    _, new = bundles
    name = "x" * 200
    deploy(board, new, remote, name=name)
    assert holds(remote / name, new)


def test_a_bundle_folder_named_like_a_leftover_is_refused_before_connecting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # neither adb nor ssh may be run
    assert main(["deploy", str(tmp_path / "m.old-1"), "--ssh", "pi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nomoat deploy: error: bundle name 'm.old-1' holds '.old-'") and "--name" in err


# --- a staging folder removed under the deploy ---


@pytest.mark.parametrize("when", ["after the push", "mid-push", "before the swap"])
def test_a_staging_folder_removed_while_copying_is_said_so(board, bundles, remote, when):
    """Something removed the staging folder (another deploy's cleanup, a user): the line says so, rather than
    blame the board's storage. Mid-push, the next push makes the folder again, with the earlier files missing."""
    old, new = bundles
    deploy(board, old, remote)
    staging: list[Path] = []

    def remove_after_push(n: int, pushed: str) -> None:
        staging.append(Path(pushed).parent)
        if n == (1 if when == "mid-push" else 2):
            shutil.rmtree(staging[0])

    def remove_before_swap(command: str) -> None:
        if "if mv " in command:
            shutil.rmtree(staging[0])

    hooked = (Hooked(board, after_push=lambda _n, pushed: staging.append(Path(pushed).parent),
                     before_shell=remove_before_swap) if when == "before the swap"
              else Hooked(board, after_push=remove_after_push))
    with pytest.raises(DeployError) as caught:
        deploy(hooked, new, remote)
    assert str(caught.value) == (
        f"the staging folder {staging[0]} on {HOST} was removed while copying: is another deploy to {remote}/m "
        "running? This deploy swapped nothing in; deploy again once that one is done.")
    assert holds(remote / "m", old)


# --- the push ---


def test_a_push_has_a_deadline_from_the_files_size():
    assert transport.push_deadline(0) == 60
    assert transport.push_deadline(90_000_000) == 150  # SmolLM2-135M's weights: 2.5 minutes at worst


def test_a_copy_stuck_on_the_board_is_given_up_at_the_pushs_deadline(board, bundles, remote, monkeypatch):
    """ssh's keepalives give up on a board gone silent, not on a `cat` stuck writing to a failing SD card: the
    push's deadline does, and the line says the board still answers, so to check its storage."""
    old, new = bundles
    deploy(board, old, remote)
    monkeypatch.setattr(transport, "PUSH_GRACE_S", 2.0)
    monkeypatch.setattr(transport, "PUSH_MIN_BYTES_PER_S", 1e15)
    monkeypatch.setenv("FAKE_BOARD_STALL_ON", "cat > ")
    start = time.monotonic()
    with pytest.raises(DeployError) as caught:
        deploy(board, new, remote)
    assert time.monotonic() - start < 20
    assert str(caught.value) == (
        f"pushing b.bin on {HOST} did not finish in 2 s: the board still answers ssh, so the step is stuck there; the "
        "bundle deployed before is unchanged. Check the board's storage (`dmesg` on it shows a failing SD card or "
        "disk), then deploy again.")
    assert sorted(os.listdir(remote)) == ["m"] and holds(remote / "m", old)


def test_a_file_gone_from_this_computer_after_the_check_is_one_line(board, bundles, remote):
    """The bundle re-converted while it was being deployed: a file the check read is gone by its push."""
    old, new = bundles
    deploy(board, old, remote)
    (new[0] / "b.bin").unlink()
    with pytest.raises(DeployError) as caught:
        deploy(board, new, remote)
    assert str(caught.value) == (
        "b.bin disappeared from this computer after the check (re-converted while deploying?); the bundle deployed "
        "before is unchanged. Deploy again once the bundle is complete.")
    assert sorted(os.listdir(remote)) == ["m"] and holds(remote / "m", old)


# --- a board is not a phone ---


def board_tool(folder: Path, name: str, script: str, monkeypatch) -> None:
    """The board runs script for its tool `name`, its other tools as before."""
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{script}\n")
    (folder / name).chmod(0o755)
    monkeypatch.setenv("FAKE_BOARD_PATH", f"{folder}:{os.environ['PATH']}")


@pytest.mark.parametrize("df, said", [
    ("printf 'Filesystem 1K-blocks Used Available Use%% Mounted on\\n/dev/root 100 99 0 100%% /\\n'",
     "Free some space on the board (or delete old bundles there), then deploy again."),
    ("echo 'df: invalid option -- k' >&2; echo usage", "from `df -k`:\nusage\nThe board needs the usual Linux tools "
                                                       "(coreutils or busybox)."),
])
def test_the_boards_free_space_is_told_in_a_boards_words(board, bundles, remote, tmp_path, monkeypatch, df, said):
    board_tool(tmp_path / "tools", "df", df, monkeypatch)
    with pytest.raises(DeployError) as caught:
        deploy(board, bundles[1], remote)
    assert str(caught.value).endswith(said) and "phone" not in str(caught.value) and "Android" not in str(caught.value)


def test_a_failed_push_and_an_unwritable_folder_are_told_in_a_boards_words(board, bundles, remote, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("FAKE_BOARD_FAIL_ON", "cat > ")
    monkeypatch.setenv("FAKE_BOARD_FAIL_WITH", "cat: write error: No space left on device")
    with pytest.raises(DeployError) as caught:
        deploy(board, bundles[1], remote)
    assert str(caught.value).endswith(
        "Nothing was changed at the bundle's place on the device; check the network and the free space on the board, "
        "then deploy again.")
    monkeypatch.delenv("FAKE_BOARD_FAIL_ON")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DeployError) as caught:
        deploy(board, bundles[1], tmp_path / "a-file" / "nomoat")
    assert str(caught.value).endswith("; use a --remote-dir you may write there (one in your home folder there, e.g. "
                                      "~/nomoat)")


# --- the swap ---


def test_the_swap_writes_its_renames_to_storage_before_it_lets_go(board, bundles, remote, tmp_path, monkeypatch):
    """A power cut right after a deploy must find the new bundle under its name: the swap runs `sync` once the
    new bundle has it, while the old one is still there and the lock still held."""
    old, new = bundles
    log = tmp_path / "syncs.log"
    board_tool(tmp_path / "tools", "sync", f'{{ ls -A {remote} | tr "\\n" " "; echo; ls -A {remote}/m 2>/dev/null '
                                           f'| tr "\\n" " "; echo; }} >> {log}', monkeypatch)
    deploy(board, old, remote)
    deploy(board, new, remote)
    lines = log.read_text().splitlines()
    seen = [(set(lines[i].split()), set(lines[i + 1].split())) for i in range(0, len(lines), 2)]
    assert any(".m.swapping" in beside and any(f.startswith(".m.old-") for f in beside) and in_m == {"b.bin",
                                                                                                      "manifest.json"}
               for beside, in_m in seen), seen


def test_the_benchmark_takes_the_readmes_venv_on_the_board_unless_told(board, tmp_path, monkeypatch):
    """Raspberry Pi OS refuses `pip install` into its python3 (PEP 668): the README installs nomoat in
    ~/nomoat-venv, which --bench without --remote-python missed, advising the install the OS refuses."""
    from nomoat.converter.ssh_bench import remote_python

    monkeypatch.setenv("HOME", str(tmp_path))
    assert remote_python(board, None) == "python3"
    venv_python = tmp_path / "nomoat-venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\n")
    assert remote_python(board, None) == "python3"  # not executable: not a Python
    venv_python.chmod(0o755)
    assert remote_python(board, None) == "~/nomoat-venv/bin/python"
    assert remote_python(board, "nice python3") == "nice python3"
