"""Whether a CPU wheel of torch in pip's find-links fits a nox session's interpreter.

The noxfile imports this in nox's own interpreter (packaging is one of nox's dependencies), but the
wheel must fit the session's virtualenv, whose Python may be another version or architecture: hence
the tags are the session interpreter's, printed by TAGS_SCRIPT run there.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

# Run with the session's python (`python -c`, one line for nox's log): its supported tags, most specific
# first. pip's own copy of packaging when packaging itself is not installed (a fresh venv); no tags at all
# if neither is there, which sends the session to PyTorch's CPU index, the safe way round.
TAGS_SCRIPT = ('import importlib, importlib.util as u; m = next((n for n in ("packaging", "pip._vendor.packaging") '
               'if u.find_spec(n)), None); print(" ".join(map(str, importlib.import_module(m + ".tags").sys_tags())) '
               'if m else "")')


def cpu_torch_wheel(find_links: str, supported_tags: Iterable[str], series: str = "2.13") -> Path | None:
    """A torch `series`.* CPU wheel in the local folders of find_links (PIP_FIND_LINKS's syntax) that an
    interpreter with supported_tags can install, or None."""
    supported = set(supported_tags)
    for folder in _local_folders(find_links):
        for wheel in sorted(folder.glob(f"torch-{series}.*+cpu-*.whl")):
            if _installable(wheel.name, supported):
                return wheel
    return None


def _local_folders(find_links: str) -> list[Path]:
    folders = [Path(p) for p in find_links.split() if p and "://" not in p]
    return [folder for folder in folders if folder.is_dir()]


def _installable(filename: str, supported: set[str]) -> bool:
    try:
        _name, _version, _build, wheel_tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:  # a stray file named like a wheel: pip would not take it either
        return False
    return any(str(tag) in supported for tag in wheel_tags)
