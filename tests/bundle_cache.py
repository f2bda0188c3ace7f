"""When a cached bundle under build/ must be converted again (nox -s bench, nox -s pi).

Standard library only: the noxfile imports it in nox's own interpreter.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def converter_fingerprint(*inputs: str) -> str:
    """The inputs (model path, recipe or flags) and every source file of the converter, hashed.

    A bundle stamped with another fingerprint was made by other code or from other inputs, and
    measuring or testing it would report on a recipe that no longer exists.
    """
    digest = hashlib.sha256("\n".join(inputs).encode())
    for f in sorted((REPO / "converter").rglob("*")):
        if f.is_file() and f.suffix in (".py", ".toml", ".txt"):
            digest.update(f.relative_to(REPO).as_posix().encode() + f.read_bytes())
    return digest.hexdigest()


def is_current(bundle: Path, fingerprint: str) -> bool:
    """Whether bundle exists whole and its stamp (BUNDLE.source) says it was made by fingerprint."""
    stamp = stamp_of(bundle)
    return (bundle / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint


def stamp_of(bundle: Path) -> Path:
    return bundle.parent / f"{bundle.name}.source"
