"""When a cached bundle under build/ must be converted again (nox -s bench, nox -s pi).

Standard library only: the noxfile imports it in nox's own interpreter. The fingerprint itself is
taken in the interpreter that converts (the tests', or the session's: `python tests/bundle_cache.py
INPUT...` prints it), since the packages whose versions it holds are installed there, not in nox's.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The converter imports the runtime (manifest.py, model.py's PREFILL_CHUNK, chat_template.py), and what
# it writes depends on these packages too: torch and transformers trace the model, gguf reads it, onnx
# and onnx_ir write the graph, onnxruntime quantizes it and checks it against the reference.
SOURCES = ("converter/**/*", "runtime/*.py")
PACKAGES = ("torch", "transformers", "gguf", "onnx", "onnx_ir", "onnxruntime")


def converter_fingerprint(*inputs: str) -> str:
    """The inputs (model path, recipe or flags), the converter's and the runtime's source files and the
    versions of the packages it converts with, hashed.

    A bundle stamped with another fingerprint was made by other code or from other inputs, and
    measuring or testing it would report on a recipe that no longer exists.
    """
    digest = hashlib.sha256("\n".join(inputs).encode())
    for f in _source_files():
        digest.update(f.relative_to(REPO).as_posix().encode() + f.read_bytes())
    digest.update(package_versions().encode())
    return digest.hexdigest()


def _source_files() -> list[Path]:
    files = {f for pattern in SOURCES for f in REPO.glob(pattern)}
    return sorted(f for f in files if f.is_file() and f.suffix in (".py", ".toml", ".txt"))


def package_versions() -> str:
    """`name==version` of each of PACKAGES as installed in this interpreter (`name==absent` if not)."""
    return "\n".join(f"{name}=={_version(name)}" for name in PACKAGES)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def is_current(bundle: Path, fingerprint: str) -> bool:
    """Whether bundle exists whole and its stamp (BUNDLE.source) says it was made by fingerprint."""
    stamp = stamp_of(bundle)
    return (bundle / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint


def stamp_of(bundle: Path) -> Path:
    return bundle.parent / f"{bundle.name}.source"


if __name__ == "__main__":  # the noxfile's way to take the fingerprint in a session's interpreter
    print(converter_fingerprint(*sys.argv[1:]))
