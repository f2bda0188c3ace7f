"""Copy a bundle to an Android device with adb (or a Linux board with ssh), check it there, and swap
it in whole.

The order is what makes it safe: the bundle is checked on this computer first (a damaged
bundle is never pushed), the device's free space next, then every file goes into a hidden
staging folder beside the target, is checked with sha256sum on the device, and only then
replaces the deployed bundle. On any failure the staging folder is removed and whatever
was deployed before stays as it was: the device never holds a half-written bundle under
the bundle's name. Ctrl-C (and SIGTERM or SIGHUP, which the CLI turns into the same
exception with bundle.signals_interrupt) unwinds the same way; during the swap itself they
are held until it is done, so an interrupt lands either before it (the old bundle stays) or
after it (the new one is in place), never between its two renames. Every command on the device has a
deadline (STEP_S, check_deadline, sync_deadline; the push's is transport.push_deadline), so a device that goes
silent ends the deploy with one line naming the step instead of a wait of minutes.

A swap given up on that way may still run on the device later (SwapUnsettled), while the next deploy cleans up
what earlier ones left: so the swap and that cleanup each hold a lock folder on the device, REMOTE_DIR/.NAME.swapping
(lock_path), and never run at once; the cleanup refuses while a swap holds it (see recover_interrupted_deploy).
It removes only the folders a deploy makes (.NAME.KIND-TAG, see STAGING), and a staging folder only once nothing
has changed in it for a while (STALE_STAGING_S): another deploy of the same name may be copying into it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import secrets
import shlex
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .transport import ANY_DEVICE, Reply, TransportError, TransportTimeout, Wording

if TYPE_CHECKING:
    from .adb import Device
    from .ssh import SshHost

    Target = Device | SshHost  # both offer name, shell() (a transport.Reply) and push()

DEFAULT_REMOTE_DIR = "/data/local/tmp/nomoat"  # writable by adb's shell user on every phone, no root
MANIFEST_NAME = "manifest.json"
MB = 1e6
MiB = 2**20
# How long removing the staging folder may take. After an interrupt the user is waiting for their
# terminal, and a device that stopped answering would hold them for the whole timeout; a folder
# left behind costs little, as the next deploy removes it (recover_interrupted_deploy).
CLEANUP_AFTER_INTERRUPT_S = 5.0
CLEANUP_AFTER_ERROR_S = 15.0
# Deadlines of the shell steps on the device. adb has no keepalive: a phone that goes silent (off the
# wifi, a loose cable) leaves a command waiting on an open, quiet connection, so each step gets a
# deadline from what it has to do, and past it a one-line error that names it (silent_device_message).
# Module values, read at each step, so a test can shrink them.
# mkdir, df, chmod of a few files, the swap's two renames: a moment's work on any device.
STEP_S = 60.0
# sha256sum reads every byte of the copy. A phone reads its flash at hundreds of MB/s and hashes well over
# 100 MB/s; the slowest reader is a Raspberry Pi reading back from its SD card a copy that no longer fits its
# page cache: a Pi 4's card reads at about 40 MB/s, a Pi 3's at 25 at most. So a minute plus a second per
# 10 MB, under half even the Pi 3's rate: 1 GB gets 160 s.
CHECK_GRACE_S = 60.0
CHECK_MIN_BYTES_PER_S = 10e6
# sync writes what the copy left in the page cache: at most the copy itself, plus whatever else the device
# had waiting. A minute plus a second a MB, the push's own floor (transport.PUSH_MIN_BYTES_PER_S): slower than a
# worn SD card or a cheap phone's flash writes.
# What is left to write is read from the device just before (pending_writes): most of the copy was written back
# during the push and the check already, so a 2 GB bundle does not get 34 minutes; the copy's size when the
# device does not say.
SYNC_GRACE_S = 60.0
SYNC_MIN_BYTES_PER_S = 1e6
# A lock folder (lock_path) older than this counts as left behind by a swap or cleanup cut short (killed, or the
# device restarted: one made before the device's last boot counts at once), not one still running: those take
# seconds once they run.
STALE_LOCK_S = 600
# A staging folder in which nothing has changed for this long (by the ctime of it and of each file in it), or nothing
# since before the device's last boot, counts as left behind by a deploy that was killed or gave up: a later deploy's
# cleanup removes it. A younger one is left alone, as another deploy of the same name may be copying into it (a push
# changes its file all along; the check and sync after the last push take a few minutes at most, at their deadlines'
# rates for bundles up to 5 GB). ctime, not mtime: adb push dates each file with its date on this computer.
STALE_STAGING_S = STALE_LOCK_S
# What the swap's command exits with when the lock is taken (another deploy is swapping or cleaning up), and the
# cleanup's when the lock is not stale.
LOCKED = 4
# What the check's and the swap's commands exit with when the staging folder is not there (anymore).
GONE = 5
# Beside the bundle REMOTE_DIR/NAME a deploy makes folders of its own, each named .NAME.KIND-TAG, TAG being
# 8 lowercase hex digits (secrets.token_hex(4)): the staging copy, the bundle moved aside during the swap, what a
# cleanup deletes. The cleanup matches only that form (TAG_GLOB), so a user's .NAME.old-backup is not taken for a
# leftover, nor bundle m.old-1's staging folder (.m.old-1.partial-TAG) for bundle m's old bundle; and no bundle name
# holds .KIND- or the lock's .swapping (RESERVED), so neither can one bundle's folder take another's form.
STAGING, OLD, TRASH = "partial", "old", "trash"
TAG_GLOB = "[0-9a-f]" * 8
LOCK_SUFFIX = ".swapping"
RESERVED = (*(f".{kind}-" for kind in (STAGING, OLD, TRASH)), LOCK_SUFFIX)
# The longest bundle name: its staging folder's name is 18 characters longer, and file systems take 255.
NAME_MAX = 200
UNCHANGED = "the bundle deployed before is unchanged"  # what the device holds after a failure before the swap


class DeployError(Exception):
    """The bundle cannot be deployed; the message says why and what to do."""


class SwapUnsettled(DeployError):
    """The swap's command went to the device but no answer came back (it stopped answering, or the connection
    broke): the swap may have run, may still be running there, or not. The staging folder is then left for a
    later deploy's cleanup, which waits for the swap's lock: an `rm -rf` of it racing a rename still under way
    could empty the new bundle."""


@dataclass(frozen=True)
class BundleFile:
    name: str  # relative to the bundle folder, "/"-separated
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class DeployResult:
    device_path: str
    serial: str
    files: list[str]
    bytes: int
    seconds: float  # pushing only, not the checks

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds > 0 else 0.0


def default_name(bundle: Path) -> str:
    """The bundle's name on the device unless --name: its folder name as typed ("." and a trailing
    slash included: abspath, unlike resolve, leaves a link as it is). A link keeps its own name
    (`current -> v3` deploys as current), as `pi_demo serve` names its model."""
    return Path(os.path.abspath(bundle)).name


def deploy_bundle(bundle: Path, device: Target, remote_dir: str = DEFAULT_REMOTE_DIR, name: str | None = None,
                  progress: Callable[[str], None] | None = None, android_app: bool = True,
                  force: bool = False, checked: list[BundleFile] | None = None) -> DeployResult:
    """Push bundle to REMOTE_DIR/NAME on device (NAME: the bundle folder's name); see the module doc.

    android_app: the bundle is for the nomoat Android app, which runs as its own user and keeps
    the KV cache in float32 (so refuse what it cannot load, and make the files readable to it);
    False for a board whose Python runtime (`pip install nomoat`) loads the bundle as the user
    who deployed it.
    force: replace REMOTE_DIR/NAME even when it is not a bundle (no manifest.json in it); without
    it such a folder (or file) is refused before anything is copied, as the user's own files.
    checked: what bundle_files(bundle, android_app) returned, when the caller ran it already (the CLI does,
    before it connects): reused, so each file is read and hashed once a deploy. The copy on the device is
    checked against these hashes, so a file changed since is still never swapped in (verify_on_device).
    """
    bundle = Path(bundle)
    say = progress or (lambda _msg: None)
    name = name if name is not None else default_name(bundle)
    check_name(name)
    files = checked if checked is not None else bundle_files(bundle, android_app)  # before touching the device
    size = sum(f.size for f in files)
    remote_dir = normalize_remote_dir(remote_dir)
    target = posixpath.join(remote_dir, name)

    recover_interrupted_deploy(device, remote_dir, name)
    if not force:
        check_replaceable(device, target)
    check_free_space(device, remote_dir, size)
    staging = beside(target, STAGING)
    try:
        make_dir(device, staging)
        seconds = push_files(device, files, staging, say)
        say(f"checking sha256 of {len(files)} files on {device.name}")
        verify_on_device(device, staging, files, target)
        flush_to_storage(device, size)
        if android_app:
            make_readable(device, staging)
        held = swap_in_whole(device, staging, target, force)
    except SwapUnsettled:
        raise  # the staging folder stays, for the next deploy to remove (see SwapUnsettled)
    except BaseException as e:  # Ctrl-C too: never leave a staging folder behind
        clean_up_staging(device, staging, e, say)
        raise
    if held is not None:
        deliver_after_swap(held, target)
    return DeployResult(device_path=target, serial=device.name, files=[f.name for f in files], bytes=size,
                        seconds=seconds)


# --- on this computer ---


def check_name(name: str) -> None:
    """A name any device's file system takes, in a shell command too, that is none of a deploy's own folders'
    (RESERVED), with room for theirs (NAME_MAX)."""
    if not re.fullmatch(f"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}", name):
        raise DeployError(f"bundle name {name!r} cannot be a folder name on the device; pass --name with a plain "
                          f"name (ASCII letters, digits, '.', '-', '_', not starting with '.' or '-', at most "
                          f"{NAME_MAX} characters).")
    reserved = [infix for infix in RESERVED if infix in name]
    if reserved:
        raise DeployError(f"bundle name {name!r} holds {reserved[0]!r}, which deploy keeps for its own folders beside "
                          "a bundle (.NAME.partial-*, .NAME.old-*, .NAME.trash-*, .NAME.swapping); pass --name with "
                          "a name without it.")


def beside(target: str, kind: str) -> str:
    """A new REMOTE_DIR/.NAME.KIND-TAG for the bundle at target (see STAGING)."""
    folder, name = posixpath.split(target)
    return posixpath.join(folder, f".{name}.{kind}-{secrets.token_hex(4)}")


def tagged(name: str, kind: str) -> str:
    """The shell pattern of every .NAME.KIND-TAG (see STAGING), for a command run in REMOTE_DIR."""
    return f"{shlex.quote(f'.{name}.{kind}-')}{TAG_GLOB}"


def words(device: Target) -> Wording:
    """How messages speak of device: a phone, a board (a test's stand-in may not say)."""
    return getattr(device, "words", ANY_DEVICE)


def normalize_remote_dir(remote_dir: str) -> str:
    if not remote_dir.startswith("/"):
        raise DeployError(f"--remote-dir {remote_dir!r} must be an absolute path on the device, "
                          f"e.g. {DEFAULT_REMOTE_DIR}.")
    return posixpath.normpath(remote_dir)


def bundle_files(bundle: Path, android_app: bool = True) -> list[BundleFile]:
    """manifest.json and every file it lists, each checked against its sha256 (the runtime's check)."""
    from nomoat.runtime.errors import BundleError
    from nomoat.runtime.manifest import read_manifest, sha256_file

    try:
        manifest = read_manifest(bundle, verify_files=True)
    except BundleError as e:
        raise DeployError(f"refusing to deploy {bundle}: {e}") from e
    if android_app:
        check_app_can_load(bundle, manifest)
    listed = dict(manifest.files)
    for name in listed:
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise DeployError(f"refusing to deploy {bundle}: manifest.json lists {name!r}, which is not a path "
                              "inside the bundle; re-convert the model.")
    listed[MANIFEST_NAME] = sha256_file(bundle / MANIFEST_NAME)  # the manifest is the root of the checks
    return [BundleFile(name, bundle / name, sha, (bundle / name).stat().st_size) for name, sha in listed.items()]


def check_app_can_load(bundle: Path, manifest) -> None:
    """Refuse here what the app would refuse after the push (OrtForward.kt's checks)."""
    kv_dtype = manifest.onnx.kv_dtype if manifest.onnx else None
    if kv_dtype != "float32":
        # A bundle converted with --kv-dtype float16 for a Pi or a workstation: 90 MB pushed for nothing otherwise.
        raise DeployError(f"refusing to deploy {bundle}: its KV cache is {kv_dtype}, and the Android app keeps the "
                          "cache in float32; convert it again without --kv-dtype (e.g. --target pixel6).")


# --- on the device ---


def shell(device: Target, command: str, what: str, timeout: float | None = None, fix: str = "",
          outcome: str = UNCHANGED, retry: str = "deploy again") -> str:
    """Run command on the device (see run_step); its stdout, or a DeployError saying what failed, then fix."""
    reply = run_step(device, command, what, timeout, outcome, retry)
    if reply.status != 0:
        raise DeployError(f"{what} failed on {device.name} (exit {reply.status}): {reply.error()}{fix}")
    return reply.out


def run_step(device: Target, command: str, what: str, timeout: float | None = None, outcome: str = UNCHANGED,
             retry: str = "deploy again") -> Reply:
    """Run command on the device, given timeout seconds (None: STEP_S); its reply, whatever its exit
    status. A DeployError naming the step (what) when it could not run there, with what the device
    holds then (outcome: before the swap the old bundle is unchanged; a step after it, such as the
    bench's, says the new one is in place) and what to do once it answers again (retry)."""
    try:
        return device.shell(command, timeout=STEP_S if timeout is None else timeout)
    except TransportTimeout as e:
        raise DeployError(silent_device_message(device, what, e, outcome, retry)) from e
    except TransportError as e:  # the transport's own message ends with its fix (`adb devices`, ...)
        raise DeployError(f"{what} on {device.name} failed; {outcome}. {e}") from e


def silent_device_message(device: Target, what: str, e: TransportTimeout, outcome: str,
                          retry: str = "deploy again") -> str:
    """One line: the step that got no answer, on which device, what the transport saw, what the device
    holds, what to do."""
    took = f"did not finish in {e.seconds:.0f} s" if e.seconds is not None else "was cut off"
    return (f"{what} on {device.name} {took}: {e.symptom}; {outcome}. {e.advice[:1].upper()}{e.advice[1:]}, "
            f"then {retry}.")


def lock_path(remote_dir: str, name: str) -> str:
    """The folder that the swap into REMOTE_DIR/NAME and the cleanup before a deploy there hold while they
    run (mkdir is atomic: of two at once, one makes it). It holds nothing, so its mtime is when it was taken."""
    return posixpath.join(remote_dir, f".{name}{LOCK_SUFFIX}")


def _age_tests() -> str:
    """Shell functions for the cleanup: `stale LOCK` holds for a lock left behind (by its mtime, which its mkdir
    set; see STALE_LOCK_S), `idle FOLDER` for a staging folder left behind (by the newest ctime of the folder and
    what it holds; see STALE_STAGING_S). Both by the device's own clock and uptime: a time before the device's last
    boot, or after now, is too old whatever its age. With `date +%s`, `stat -c` and `find -exec {} +`, which
    toybox, busybox and coreutils have; when one of them fails, neither holds: a lock or a folder is kept rather
    than taken from a deploy that still runs."""
    too_old = ('now=$(date +%s) && read up rest < /proc/uptime && up=${up%.*} && '
               '{ [ "$1" -gt "$now" ] || [ "$1" -lt $((now - up - 5)) ] || [ $((now - $1)) -ge "$2" ]; }')
    newest = ('newest=; for t in $(find "$1" -exec stat -c %Z {} + 2>/dev/null); do '
              'if [ -z "$newest" ] || [ "$t" -gt "$newest" ]; then newest=$t; fi; done; [ -n "$newest" ]')
    return (f"too_old() {{ {too_old}; }}; "
            f'stale() {{ made=$(stat -c %Y "$1") && too_old "$made" {STALE_LOCK_S}; }}; '
            f'idle() {{ {newest} && too_old "$newest" {STALE_STAGING_S}; }}; ')


def _take_lock(lock: str, trash: str) -> str:
    """A shell snippet that takes lock (after cd to its folder and _age_tests), or exits LOCKED. A stale lock is
    renamed away first, to trash (a folder name that does not exist yet): of two cleanups breaking it at once, one
    rename wins, and the loser's mkdir then finds the winner's lock."""
    lk = shlex.quote(posixpath.basename(lock))
    return (f"if ! mkdir {lk} 2>/dev/null; then "
            f"if [ ! -d {lk} ] || [ -L {lk} ]; then mkdir {lk}; exit 1; fi; "  # not a lock: mkdir says why
            f"stale {lk} || exit {LOCKED}; "
            f"mv {lk} {trash} 2>/dev/null || exit {LOCKED}; "
            f"mkdir {lk} 2>/dev/null || exit {LOCKED}; fi; ")


def recover_interrupted_deploy(device: Target, remote_dir: str, name: str) -> None:
    """Undo what a killed earlier deploy left: restore a bundle moved aside, drop staging folders left behind
    (see STALE_STAGING_S; a younger one may be another deploy's, copying). Only the folders a deploy makes
    (.NAME.KIND-TAG, see STAGING) are touched.

    Under the lock (lock_path), so never while a swap runs: a swap given up on (SwapUnsettled) may still run on
    the device, and this cleanup racing it could put the old bundle back between its two renames (its second
    `mv` would then move the staging folder into it) or `rm -rf` the staging folder as it becomes the bundle
    (emptying it). While the lock is held, a one-line DeployError. Each leftover is moved into a new trash
    folder (.NAME.trash-TAG, which no swap touches) before it is deleted: a rename against a rename has one
    winner, an `rm -rf` against one does not. HUP and PIPE are ignored, as in swap_in, so a cleanup given up on
    still finishes and lets go of the lock."""
    lock = lock_path(remote_dir, name)
    lk = shlex.quote(posixpath.basename(lock))
    trash = shlex.quote(posixpath.basename(beside(posixpath.join(remote_dir, name), TRASH)))
    n, old, staging = shlex.quote(name), tagged(name, OLD), tagged(name, STAGING)
    there = '{ [ -e "$f" ] || [ -L "$f" ]; }'
    reply = run_step(device,
                     f"trap '' HUP PIPE; cd {shlex.quote(remote_dir)} 2>/dev/null || exit 0; {_age_tests()}"
                     f"{_take_lock(lock, trash)}"
                     # the trash folder only when there is something to move: on a full disk its mkdir fails
                     f"( bin() {{ {{ [ -d {trash} ] || mkdir {trash}; }} && mv \"$1\" {trash}/; }}; "
                     f"if [ ! -e {n} ] && [ ! -L {n} ]; then for o in {old}; do "
                     f'if [ -d "$o" ]; then mv "$o" {n}; break; fi; done; fi; '
                     f'for f in {old}; do if {there}; then bin "$f" || exit 1; fi; done; '
                     f'for f in {staging}; do if {there} && idle "$f"; then bin "$f" || exit 1; fi; done; '
                     f"rm -rf {tagged(name, TRASH)} ); "
                     f"rc=$?; rmdir {lk}; exit $rc",
                     "cleaning up after an earlier interrupted deploy")
    if reply.status != 0 and NO_SPACE in reply.error():
        raise DeployError(full_disk_message(device, remote_dir, "not even the deploy's lock folder could be made"))
    if reply.status == LOCKED:
        target = posixpath.join(remote_dir, name)
        raise DeployError(f"a swap from an earlier deploy may still be running on {device.name} ({lock} is there), "
                          f"so nothing was changed: {target} holds a whole bundle, the one deployed before or that "
                          "swap's. Wait a minute and deploy again (a lock left behind is cleared once the device "
                          f"has restarted, or after {STALE_LOCK_S // 60} minutes).")
    if reply.status != 0:
        raise DeployError(f"cleaning up after an earlier interrupted deploy failed on {device.name} "
                          f"(exit {reply.status}): {reply.error()}")


# What check_replaceable's and swap_in's commands exit with when the target is there but not a bundle.
NOT_A_BUNDLE = 3


def _not_a_bundle_test(target: str) -> str:
    """A shell test that holds when target exists (even as a dangling link) but holds no manifest.json:
    the user's own folder or file, not a bundle deployed before."""
    t = shlex.quote(target)
    return f"{{ [ -e {t} ] || [ -L {t} ]; }} && ! [ -f {shlex.quote(posixpath.join(target, MANIFEST_NAME))} ]"


def check_replaceable(device: Target, target: str) -> None:
    """Refuse, before anything is copied, to replace a REMOTE_DIR/NAME that is not a bundle: the swap
    removes what was there, and `--remote-dir /home/pi --name Documents` must not wipe a user's files."""
    reply = run_step(device, f"if {_not_a_bundle_test(target)}; then exit {NOT_A_BUNDLE}; fi", f"checking {target}")
    if reply.status == NOT_A_BUNDLE:
        raise DeployError(not_a_bundle_message(device, target))
    if reply.status != 0:
        raise DeployError(f"checking {target} failed on {device.name} (exit {reply.status}): {reply.error()}")


def not_a_bundle_message(device: Target, target: str) -> str:
    return (f"{target} on {device.name} exists and is not a bundle (it has no {MANIFEST_NAME}); deploying there "
            "would delete what it holds. Pick another --name or --remote-dir, or pass --force to replace it.")


def check_free_space(device: Target, remote_dir: str, needed: int) -> None:
    """The staging copy sits beside the old bundle until the swap, so the whole bundle must fit."""
    make_dir(device, remote_dir)
    out = shell(device, f"df -k {shlex.quote(remote_dir)}", f"`df -k {remote_dir}`")
    available_kib = parse_df_available_kib(out)
    if available_kib is None:
        raise DeployError(f"could not read the free space at {remote_dir} on {device.name} from `df -k`:\n"
                          f"{out.rstrip()}\n{words(device).requirement}")
    if available_kib * 1024 < needed:
        need, free = _sizes(needed, available_kib * 1024)
        raise DeployError(f"not enough space on {device.name} at {remote_dir}: the bundle needs {need}, only "
                          f"{free} is free. Free some space on the {words(device).noun} (or delete old bundles "
                          f"there){_leftovers_hint(device, remote_dir)}, then deploy again.")


NO_SPACE = "No space left on device"


def full_disk_message(device: Target, remote_dir: str, consequence: str) -> str:
    return (f"the disk holding {remote_dir} on {device.name} is full ({NO_SPACE}), so {consequence}; "
            f"{UNCHANGED}. Free some space on the {words(device).noun}{_leftovers_hint(device, remote_dir)}, "
            "then deploy again.")


def _leftovers_hint(device: Target, remote_dir: str) -> str:
    """The hidden folders interrupted deploys left in remote_dir (`ls` does not show them), with their sizes and
    the command that removes them, or "" when there are none or they cannot be listed."""
    globs = " ".join(f".*.{kind}-{TAG_GLOB}" for kind in (STAGING, OLD, TRASH))
    try:
        reply = device.shell(f"cd {shlex.quote(remote_dir)} 2>/dev/null && for f in {globs}; do "
                             f'[ -d "$f" ] && du -sk "$f"; done; true', timeout=STEP_S)
    except TransportError:
        return ""  # the hint is a courtesy: the error it would be added to says what matters
    found = [line.split("\t", 1) for line in reply.out.splitlines() if "\t" in line]
    found = [(name, int(kib)) for kib, name in found if kib.isdigit()]
    if not found:
        return ""
    listed = ", ".join(f"{name} ({_size(kib * 1024)})" for name, kib in found)
    paths = " ".join(shlex.quote(posixpath.join(remote_dir, name)) for name, _ in found)
    return (f"; interrupted deploys left hidden folders there, which `ls` does not show: {listed}; remove them "
            f"(while no deploy runs) with: rm -rf {paths}")


def _sizes(needed: int, free: int) -> tuple[str, str]:
    """Both sizes in MiB, or in KiB where MiB would round them to the same number."""
    if f"{needed / MiB:.1f}" != f"{free / MiB:.1f}":
        return f"{needed / MiB:.1f} MiB", f"{free / MiB:.1f} MiB"
    return f"{needed / 1024:,.0f} KiB", f"{free / 1024:,.0f} KiB"


def parse_df_available_kib(text: str) -> int | None:
    """Available KiB from `df -k PATH` (toybox and coreutils: Filesystem 1K-blocks Used Available Use% ...).

    Taken as the number just before the Use% column, so a long filesystem name that wraps onto a
    line of its own does not shift the columns.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or "Avail" not in lines[0]:
        return None
    tokens = " ".join(lines[1:]).split()
    for i, token in enumerate(tokens):
        if re.fullmatch(r"\d+%|-", token) and i >= 1 and tokens[i - 1].isdigit():
            return int(tokens[i - 1])
    return None


def make_dir(device: Target, path: str) -> None:
    shell(device, f"mkdir -p {shlex.quote(path)}", f"creating {path}",
          fix=f"; use a --remote-dir you may write there ({words(device).writable_dir})")


def push_files(device: Target, files: list[BundleFile], staging: str, say: Callable[[str], None]) -> float:
    """Push each file into staging; the seconds spent pushing."""
    total = 0.0
    for i, f in enumerate(files, 1):
        say(f"pushing {i}/{len(files)} {f.name} ({_size(f.size)})")
        start = time.perf_counter()
        push_file(device, f, posixpath.join(staging, f.name))
        total += time.perf_counter() - start
    return total


def push_file(device: Target, f: BundleFile, remote: str) -> None:
    """device.push(f), its failures told as DeployErrors that say what the device holds and what to do."""
    try:
        device.push(f.path, remote)
    except OSError as e:  # the file here: the transports raise TransportErrors for their own failures
        raise DeployError(local_file_message(f, e)) from e
    except TransportTimeout as e:  # ssh's (adb's push says its own words: AdbError)
        raise DeployError(silent_device_message(device, f"pushing {f.name}", e, UNCHANGED)) from e
    except TransportError as e:
        raise DeployError(f"pushing {f.name} failed: {e}. Nothing was changed at the bundle's place on the "
                          f"device; {words(device).push_advice}, then deploy again.") from e


def local_file_message(f: BundleFile, e: OSError) -> str:
    """Why f could not be pushed from this computer, since the check read it whole."""
    if isinstance(e, FileNotFoundError):
        return (f"{f.name} disappeared from this computer after the check (re-converted while deploying?); "
                f"{UNCHANGED}. Deploy again once the bundle is complete.")
    return f"{f.name} could not be read on this computer for the push ({e.strerror or e}); {UNCHANGED}."


def verify_on_device(device: Target, staging: str, files: list[BundleFile], target: str) -> None:
    """sha256sum on the device (toybox has it since Android 7) against what we pushed."""
    args = " ".join(shlex.quote(f"./{f.name}") for f in files)  # "./": a name cannot read as an option
    reply = _sha256sum(device, staging, args, sum(f.size for f in files))
    if reply.status == 127:
        raise DeployError(f"{device.name} has no sha256sum, so the copy cannot be checked there. "
                          f"{words(device).requirement}")
    found = parse_sha256sum(reply.out)
    if reply.status == GONE or copies_gone(reply, found, files):
        raise DeployError(removed_while_copying_message(device, staging, target))
    for f in files:
        if found.get(f.name) != f.sha256:
            raise DeployError(mismatch_message(device, f))


def _sha256sum(device: Target, staging: str, args: str, size: int) -> Reply:
    s = shlex.quote(staging)
    return run_step(device, f"[ -d {s} ] || exit {GONE}; cd {s} && sha256sum {args}",
                    "checking the copy with `sha256sum`", timeout=check_deadline(size))


def copies_gone(reply: Reply, found: dict[str, str], files: list[BundleFile]) -> bool:
    """Whether sha256sum found no copy of a file that was pushed: something removed it since (a push recreates
    the staging folder, adb's and ssh's alike, so the files pushed after it are there)."""
    return any(f.name not in found for f in files) and "No such file" in reply.out + reply.err


def removed_while_copying_message(device: Target, staging: str, target: str) -> str:
    """The staging folder went while this deploy used it: not the storage failing, most likely another deploy
    of the same name whose cleanup took it for a leftover (see STALE_STAGING_S)."""
    return (f"the staging folder {staging} on {device.name} was removed while copying: is another deploy to {target} "
            "running? This deploy swapped nothing in; deploy again once that one is done.")


def check_deadline(size: int) -> float:
    """Seconds sha256sum on the device may take for size bytes (see CHECK_GRACE_S)."""
    return CHECK_GRACE_S + size / CHECK_MIN_BYTES_PER_S


def mismatch_message(device: Target, f: BundleFile) -> str:
    """Why the copy of f on the device is not what was checked: f changed here since (its hashes come from
    the check before the push, so it is hashed again, but only on this rare path), or the copy was damaged."""
    from nomoat.runtime.manifest import sha256_file

    if not f.path.is_file() or sha256_file(f.path) != f.sha256:
        return (f"{f.name} changed on this computer after the bundle was checked (is something writing to it?), "
                f"so its copy on {device.name} was not swapped in; {UNCHANGED}. Deploy again once the bundle "
                "is complete.")
    return (f"{f.name} on {device.name} does not match its sha256 after the push (the copy was damaged on the way "
            f"or the storage is failing), so it was not swapped in; {UNCHANGED}. Deploy again.")


def parse_sha256sum(text: str) -> dict[str, str]:
    """{name: hash} from "HASH  ./NAME" lines (a '*' before the name marks binary mode in coreutils)."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *]?(.+)", line.strip())
        if match:
            found[match.group(2).removeprefix("./")] = match.group(1).lower()
    return found


def flush_to_storage(device: Target, size: int) -> None:
    """Write the copy to storage before it becomes the bundle: sha256sum read it from the page cache,
    so without this a power cut soon after a deploy (a Pi's SD card) could leave a damaged bundle under
    the bundle's name. It also lets the runtime hand back the file pages it read while loading: pages
    not yet written back cannot be dropped, and a bundle benchmarked right after its copy peaked at
    225 MB instead of 212 (measured on this machine, SmolLM2 int4, 1 thread)."""
    pending = pending_writes(device)
    shell(device, "sync", "flushing the copy to storage (`sync`)", timeout=sync_deadline(size, pending))


def pending_writes(device: Target) -> int | None:
    """Bytes the device still has to write to storage (Dirty and Writeback of /proc/meminfo, which Android's
    shell user and a board's may both read), or None when it does not say."""
    reply = run_step(device, "cat /proc/meminfo", "reading what is left to write to storage (`/proc/meminfo`)")
    return parse_pending_writes(reply.out) if reply.status == 0 else None


def parse_pending_writes(meminfo: str) -> int | None:
    """Dirty plus Writeback, in bytes, from /proc/meminfo ("Dirty:   1234 kB"); None without both."""
    found = dict(re.findall(r"^(Dirty|Writeback):\s+(\d+) kB\s*$", meminfo, re.M))
    if set(found) != {"Dirty", "Writeback"}:
        return None
    return (int(found["Dirty"]) + int(found["Writeback"])) * 1024


def sync_deadline(size: int, pending: int | None = None) -> float:
    """Seconds sync on the device may take (see SYNC_GRACE_S): for the pending bytes the device said it has
    to write, or (None) for the whole copy of size bytes."""
    return SYNC_GRACE_S + (size if pending is None else pending) / SYNC_MIN_BYTES_PER_S


def make_readable(device: Target, staging: str) -> None:
    """adb push keeps the local modes (a bundle copied or written with a strict umask may be 0600 or 0700),
    but the app reading the bundle runs as its own user, not as adb's shell user."""
    shell(device, f"chmod -R a+rX {shlex.quote(staging)}", "making the bundle readable for the app (`chmod`)")


def swap_in(device: Target, staging: str, target: str, force: bool = False) -> None:
    """Replace target by staging: the old bundle is moved aside, the new one renamed in, the old removed.

    A folder cannot be renamed over a non-empty one, so this is two renames with the old bundle
    kept until the second one succeeded (and put back if it failed). Unless force, a target that
    is not a bundle is left alone here too (check_replaceable refused it before the copy; this
    covers one made since). No answer within STEP_S: SwapUnsettled. It holds the lock (lock_path)
    from start to end, so the next deploy's cleanup waits for a swap that runs late; and it finds its
    staging folder still there before it moves the old bundle aside (a cleanup that ran first removed it).
    """
    old = beside(target, OLD)
    t, s, o = shlex.quote(target), shlex.quote(staging), shlex.quote(old)
    lock_dir = lock_path(posixpath.dirname(target), posixpath.basename(target))
    lock = shlex.quote(lock_dir)
    # When we stop waiting (a deadline, a broken connection), adbd hangs up on the command (SIGHUP, or an old
    # phone's pty closing) and sshd closes its pipes (SIGPIPE on a write): both ignored, here and so in mv,
    # which inherits that, a swap under way finishes its renames on the device instead of stopping between them.
    keep_going = "trap '' HUP PIPE; "
    # The lock: LOCKED when another deploy holds it; the swap itself runs in a subshell, so that every way out
    # of it (each `exit`) comes back here to let go of the lock.
    take = f"mkdir {lock} 2>/dev/null || {{ [ -d {lock} ] && exit {LOCKED}; mkdir {lock}; exit 1; }}; "
    present = f"[ -d {s} ] || exit {GONE}; "
    guard = "" if force else f"if {_not_a_bundle_test(target)}; then exit {NOT_A_BUNDLE}; fi; "
    # sync once the new bundle has its name, before the old one is deleted and the lock let go: the renames are
    # written to storage then, so a power cut after the deploy cannot find the name absent, nor the old bundle gone.
    try:
        reply = device.shell(f"{keep_going}{take}( {present}{guard}if [ -e {t} ] || [ -L {t} ]; then mv {t} {o} "
                             f"|| exit 1; fi; if mv {s} {t}; then sync; rm -rf {o}; else if [ -e {o} ]; then "
                             f"mv {o} {t}; fi; exit 1; fi ); rc=$?; rmdir {lock}; exit $rc",
                             timeout=STEP_S)
    except TransportError as e:
        if e.never_ran:  # ssh could not connect, adb has no such device: the swap did not start
            raise DeployError(f"moving the checked bundle into {target} could not start on {device.name}, so "
                              f"{UNCHANGED}: {e}") from e
        raise SwapUnsettled(unsettled_swap_message(device, target, e)) from e
    if reply.status == LOCKED:
        raise DeployError(f"moving the checked bundle into {target} did not start on {device.name}: another deploy "
                          f"is swapping or cleaning up there ({lock_dir} is there), so {UNCHANGED}. Wait a minute "
                          "and deploy again.")
    if reply.status == NOT_A_BUNDLE and not force:
        raise DeployError(not_a_bundle_message(device, target))
    if reply.status == GONE:
        raise DeployError(removed_while_copying_message(device, staging, target))
    if reply.status != 0:
        raise DeployError(f"moving the checked bundle into {target} failed on {device.name} "
                          f"(exit {reply.status}): {reply.error()}")


def unsettled_swap_message(device: Target, target: str, e: TransportError) -> str:
    """One line for a swap that got no answer: the device holds one whole bundle or the other."""
    what = f"moving the checked bundle into {target}"
    outcome = (f"{target} holds the bundle deployed before or the new one, whole (a swap under way finishes on "
               "the device; the next deploy there tidies up)")
    if isinstance(e, TransportTimeout):
        return silent_device_message(device, what, e, outcome)
    return f"{what} on {device.name} got no answer ({e}); {outcome}."


def swap_in_whole(device: Target, staging: str, target: str, force: bool = False) -> int | None:
    """swap_in with Ctrl-C, SIGTERM and SIGHUP held until it is done: cut between its two renames, the
    device would have no bundle under the name until the next deploy put the old one back. The signal
    that came meanwhile (the first), for deliver_after_swap; a swap that fails raises its error instead,
    which ends the deploy anyway. The transport program runs in a session of its own (adb.run_adb), so
    the terminal's Ctrl-C does not stop it either."""
    with signals_held() as held:
        swap_in(device, staging, target, force)
    return held[0] if held else None


@contextlib.contextmanager
def signals_held() -> Iterator[list[int]]:
    """Within the block, Ctrl-C, SIGTERM and SIGHUP are noted in the list instead of acted on; the old
    handlers come back after. A signal set to be ignored stays ignored (bundle.handlers_replaced)."""
    from .bundle import handlers_replaced

    held: list[int] = []
    # getsignal is None for a handler not set from Python: left alone, as before
    with handlers_replaced(("SIGINT", "SIGTERM", "SIGHUP"), lambda signum, _frame: held.append(signum),
                           take=lambda old: old is not None and old is not signal.SIG_IGN):
        yield held


def deliver_after_swap(signum: int, target: str) -> None:
    """Act on a signal held during the swap, now that the new bundle is in place: as its handler would
    have (Ctrl-C's KeyboardInterrupt, the CLI's bundle.Interrupted), with deployed_to set so that the
    message can say the new bundle is there."""
    try:
        signal.raise_signal(signum)
    except KeyboardInterrupt as e:
        e.deployed_to = target
        raise


def clean_up_staging(device: Target, staging: str, cause: BaseException, say: Callable[[str], None]) -> None:
    """Remove the staging folder after a failure or an interrupt (briefly after an interrupt, see
    CLEANUP_AFTER_INTERRUPT_S), and say so when it stays."""
    timeout = CLEANUP_AFTER_INTERRUPT_S if isinstance(cause, KeyboardInterrupt) else CLEANUP_AFTER_ERROR_S
    if not remove_quietly(device, staging, timeout):
        say(f"could not remove the staging folder {staging} on {device.name}; a later deploy there removes it once "
            f"it has been left for {STALE_STAGING_S // 60} minutes")


def remove_quietly(device: Target, path: str, timeout: float = CLEANUP_AFTER_ERROR_S) -> bool:
    """Best effort: the error that got us here matters more than one from cleaning up. Whether it went."""
    try:
        return device.shell(f"rm -rf {shlex.quote(path)}", timeout=timeout).status == 0
    except TransportError:
        return False


def _size(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n / 1e3:.1f} kB"
