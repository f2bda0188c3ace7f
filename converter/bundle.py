"""Package stage: write the bundle atomically.

Everything is written into a temporary folder beside the destination, checked, then moved
into place with one rename; a failed conversion leaves no half-written bundle and never
touches an existing one (which is only replaced with --force, after the new one is complete).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from nomoat.runtime.manifest import MANIFEST_NAME, Manifest, check_path_encoding, sha256_file

from .errors import ConversionError

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
REPORT_FILE = "report.json"


def check_destination(out: Path, force: bool, sources: Iterable[tuple[str, str | Path]] = (),
                      replaces: tuple[str, str] | None = None) -> Path:
    """Refuse an existing output before any work starts (unless --force); return it as an absolute path.

    `sources` are (flag, path) pairs of what the conversion reads (--model, --lora): an output that is,
    holds or lies inside one of them is refused, since replacing it would delete the source. With
    `replaces` (a file and what a folder holding it is, e.g. BUNDLE_OUTPUT), --force replaces only an empty
    folder or such a folder. An --out that is a symbolic link stands for the folder it points to (see _through_link).
    """
    # '.' and '..' get a name and a parent; `--out=~/b` reaches us with its ~ (the shell expands only a word's start)
    out = _through_link(Path(os.path.abspath(Path(out).expanduser())))
    check_path_encoding(out, "--out", ConversionError)
    if out.resolve() == Path.cwd().resolve() or not out.name:
        what = "the working directory" if out.name else "the root folder"
        raise ConversionError(f"--out {out} is {what}, and a bundle replaces its folder whole; name a new "
                              "folder, e.g. --out ./bundle.")
    for flag, source in sources:
        src = Path(source).expanduser()
        if not src.exists():
            continue  # a hub id: the load stage resolves it into the Hugging Face cache
        real, src_real = out.resolve(), src.resolve()
        where = ("is" if real == src_real else "is inside" if real.is_relative_to(src_real)
                 else "contains" if src_real.is_relative_to(real) else None)
        if where:
            raise ConversionError(f"--out {out} {where} {flag} {source}; writing there would replace "
                                  f"the {'model' if flag == '--model' else 'adapter'}'s files. Choose an --out "
                                  "outside it.")
    # What --force cannot replace is refused first, and without suggesting --force, which would refuse it next.
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory; remove it or choose another --out.")
    if out.is_dir() and replaces and any(out.iterdir()) and not (out / replaces[0]).is_file():
        marker, kind = replaces
        said = f"--force replaces only {kind} or an empty folder, and {out}" if force else f"output {out} exists and"
        raise ConversionError(f"{said} holds other files (no {marker}); choose another --out, or empty that folder "
                              "yourself.")
    if out.exists() and not force:
        raise ConversionError(f"output {out} already exists; choose another --out or pass --force to replace it.")
    _check_parents_can_be_made(out)
    return out


# check_destination's `replaces` for `nomoat convert`: a folder holding manifest.json is a bundle
BUNDLE_OUTPUT = (MANIFEST_NAME, "a bundle")


def _through_link(out: Path) -> Path:
    """The folder a symbolic link named as --out points to; any other --out as it is.

    Such a link is a pointer the user keeps on purpose (`current -> v3`, which scripts, a deploy or
    `nomoat chat current` read). Replacing the link by a folder would break that pointer and leave the
    bundle it pointed to in place under its real name, so --out writes where the link points, as `cp`
    and a shell redirection write through a link: the link stays and now leads to the new bundle. The
    target gets the same checks as any --out (with --force, only a bundle or an empty folder is replaced),
    and the bundle is staged beside the target, where the final rename can be atomic.
    """
    if not out.is_symlink():
        return out
    try:
        return out.resolve(strict=False)
    except (OSError, RuntimeError) as e:  # a loop of links (RuntimeError before Python 3.13)
        raise ConversionError(f"--out {out} is a symbolic link that cannot be followed ({e}); fix or remove the "
                              "link, or choose another --out.") from e


def _check_parents_can_be_made(out: Path) -> None:
    """The folders above --out that staging_dir will make: refused now, not after minutes of work."""
    folder = Path(os.path.abspath(out.parent))
    while not folder.exists():
        if os.path.islink(folder):  # a link to nowhere: mkdir would fail on it
            raise ConversionError(f"--out {out} lies under {folder}, a symbolic link to a path that does not "
                                  "exist; choose another --out or fix the link.")
        folder = folder.parent
    if not folder.is_dir():
        raise ConversionError(f"--out {out} lies under {folder}, which is a file, not a folder; "
                              "choose another --out.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConversionError(f"--out {out}: no permission to write in {folder}; choose another --out.")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a conversion, raised like Ctrl-C's KeyboardInterrupt so that the same
    cleanup runs (the staging folder is removed) and no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def report_interrupt(command: str, e: KeyboardInterrupt, outcome: str = "nothing was written") -> int:
    """One line on stderr for Ctrl-C, SIGTERM or SIGHUP (Interrupted), ending with what the interrupted
    command left (a conversion: nothing); the exit status, 128 + the signal."""
    signum = getattr(e, "signum", signal.SIGINT)
    # Ctrl-C: a new line first, after the terminal's echoed ^C
    how = f"\nnomoat {command}: interrupted" if signum == signal.SIGINT else \
        f"nomoat {command}: stopped by {signal.Signals(signum).name}"
    print(f"{how}; {outcome}", file=sys.stderr)
    return 128 + signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP (a timeout, a CI cancel, a closed terminal) raise Interrupted
    instead of killing the process, which would leave the staging folder behind. Only signals left at
    their default action are taken (a SIGHUP that nohup ignores stays ignored); the old handlers come
    back after. Outside the main thread Python cannot set handlers, and nothing changes."""
    def _raise(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    with handlers_replaced(("SIGTERM", "SIGHUP"), _raise, take=lambda old: old is signal.SIG_DFL):
        yield


@contextlib.contextmanager
def handlers_replaced(names: Iterable[str], handler: Callable[[int, object], None],
                      take: Callable[[object], bool]) -> Iterator[None]:
    """Within the block, `handler` handles each named signal this platform has whose current handler
    `take` accepts; the old handlers come back after. Outside the main thread Python cannot set
    handlers, and nothing changes."""
    import threading

    saved = {}
    if threading.current_thread() is threading.main_thread():
        for name in names:
            signum = getattr(signal, name, None)
            if signum is not None and take(signal.getsignal(signum)):
                saved[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in saved.items():
            signal.signal(signum, old)


_STAGING_INFIX = ".tmp-"
# Inside a staging folder, locked (flock) by the conversion writing it for as long as it runs: the kernel
# drops the lock when that process ends, however it ends (SIGKILL, the OOM killer), so a later conversion
# can take it exactly when the folder is abandoned. Removed before the folder becomes the bundle.
STAGING_LOCK = ".nomoat-staging.lock"


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temp dir on the same filesystem as `out`, removed if the block fails.

    Its STAGING_LOCK is locked while the block runs, and its name holds this process's id
    (`.OUT.tmp-PID-xxxx`), so a later conversion can tell a folder left by a killed one
    (remove_stale_staging) from one still being written.
    """
    out = Path(os.path.abspath(out))
    # `--out build/rpi5` in a fresh checkout: the missing parents are made here, as `mkdir -p` would,
    # and removed again (while empty) if the conversion fails, so a failure leaves nothing behind.
    made = _missing_ancestors(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGING_INFIX}{os.getpid()}-", dir=out.parent))
    except OSError as e:  # the folder changed since check_destination, or a file system that refuses
        _remove_empty(made)
        raise ConversionError(f"cannot write beside --out {out}: {e.strerror or e}; choose another --out.") from e
    done, lock = False, None
    try:
        lock = _hold_lock(tmp)
        yield tmp
        done = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)  # releases the flock
        if not done:
            _remove_empty(made)


def _hold_lock(folder: Path) -> int | None:
    """Lock folder's STAGING_LOCK for this process's lifetime; the open descriptor (None where flock is missing).

    The lock is taken on a file of another name that is then renamed: a lock file that exists is always
    held, so remove_stale_staging never catches one in the instant between its creation and its flock.
    """
    try:
        import fcntl
    except ImportError:  # Windows: the process id in the folder's name is all there is
        return None
    pending = folder / f"{STAGING_LOCK}.new"
    fd = os.open(pending, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pending.rename(folder / STAGING_LOCK)
    except OSError:  # a file system without flock: the process id rule still applies
        os.close(fd)
        pending.unlink(missing_ok=True)
        return None
    return fd


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only while empty


def _missing_ancestors(folder: Path) -> list[Path]:
    """The folders from `folder` up that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders of `out` whose conversion is gone (killed before it could clean up)."""
    out = Path(os.path.abspath(out))
    removed = []
    prefix = f".{out.name}{_STAGING_INFIX}"
    for path in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and _abandoned(path, int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _abandoned(folder: Path, pid: int) -> bool:
    """Whether no conversion writes the staging folder any more: its STAGING_LOCK can be locked.

    The lock, not the process id: in a container nomoat is PID 1 on every run, so the id of an OOM-killed
    run is this run's, and its gigabytes would be kept forever. A folder without the lock file (left by an
    older nomoat) is judged by its process id.
    """
    try:
        import fcntl

        fd = os.open(folder / STAGING_LOCK, os.O_RDWR)
    except (ImportError, OSError):  # no lock file, or no flock on this platform
        return not _process_alive(pid)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its conversion is running
    finally:
        os.close(fd)
    return True


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in (MANIFEST_NAME, STAGING_LOCK)}


def _sync_files(folder: Path) -> None:
    """Flush every file to disk before the rename makes the bundle visible: after a crash the
    bundle is either absent or whole, and its pages are clean, so a runtime can hand them back
    (MADV_PAGEOUT skips pages still waiting to be written)."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _open_permissions(folder: Path) -> None:
    """What a plain mkdir and open would have given (0777 / 0666 less the umask): mkdtemp makes the
    folder 0700, and some writers make files 0600, which a service running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def move_into_place(staging: Path, out: Path, force: bool) -> Path:
    """One rename; an existing `out` (allowed by --force) is moved aside first and removed after."""
    out = Path(os.path.abspath(out))
    (staging / STAGING_LOCK).unlink(missing_ok=True)  # no file of the bundle; the lock stays held till the end
    _sync_files(staging)
    _open_permissions(staging)
    if not out.exists():
        staging.rename(out)
        return out
    if not force:
        raise ConversionError(f"output {out} appeared while writing it; nothing was overwritten.")
    trash = out.with_name(f".{out.name}.old")
    try:
        _remove(trash)  # left by a replacement that was killed between its renames
    except OSError as e:
        raise ConversionError(f"cannot remove {trash}, left by an earlier replacement of {out} ({e.strerror or e}); "
                              "remove it yourself and run again.") from e
    out.rename(trash)
    staging.rename(out)
    with contextlib.suppress(OSError):  # the new bundle is in place: the old one's leftovers go next time
        _remove(trash)
    return out


def _remove(path: Path) -> None:
    """Remove a folder with its files, or a file or symbolic link (only the link, never what it points to:
    shutil.rmtree refuses a link, and with ignore_errors silently leaves it behind)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def finalize(staging: Path, manifest: Manifest, out: Path, force: bool) -> Path:
    """Write manifest.json into staging, then move staging to out (replacing it with force)."""
    write_json(staging / MANIFEST_NAME, manifest.to_dict())
    return move_into_place(staging, out, force)
