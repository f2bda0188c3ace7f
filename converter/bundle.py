"""Package stage: write the bundle atomically.

Everything is written into a temporary folder beside the destination, checked, then moved
into place with one rename; a failed conversion leaves no half-written bundle and never
touches an existing one (which is only replaced with --force, after the new one is complete).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nomoat.runtime.manifest import MANIFEST_NAME, Manifest, sha256_file

from .errors import ConversionError

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
REPORT_FILE = "report.json"


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing output before any work starts (unless --force)."""
    if out.exists() and not force:
        raise ConversionError(f"output {out} already exists; choose another --out or pass --force to replace it.")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory; remove it or choose another --out.")
    if not out.parent.exists():
        raise ConversionError(f"the parent folder of {out} does not exist; create it first.")


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temp dir on the same filesystem as `out`, removed if the block fails."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}


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


def move_into_place(staging: Path, out: Path, force: bool) -> Path:
    """One rename; an existing `out` (allowed by --force) is moved aside first and removed after."""
    _sync_files(staging)
    if not out.exists():
        staging.rename(out)
        return out
    if not force:
        raise ConversionError(f"output {out} appeared while writing it; nothing was overwritten.")
    trash = out.with_name(f".{out.name}.old")
    if trash.exists():
        shutil.rmtree(trash)
    out.rename(trash)
    staging.rename(out)
    shutil.rmtree(trash, ignore_errors=True)
    return out


def finalize(staging: Path, manifest: Manifest, out: Path, force: bool) -> Path:
    """Write manifest.json into staging, then move staging to out (replacing it with force)."""
    write_json(staging / MANIFEST_NAME, manifest.to_dict())
    return move_into_place(staging, out, force)
