"""This checkout as a wheel, built as `pip install .` would build it, for the tests that install the runtime
elsewhere (other Pythons, older onnxruntime releases, the arm64 guest). The noxfile cleans with it too."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def clean_setuptools_build(repo: Path = REPO) -> None:
    """setuptools builds through build/lib and build/bdist.* and never empties them, so a module deleted
    from the checkout would go on being packed. Only those: build/ also holds the bundles."""
    for stale in [repo / "build" / "lib", *(repo / "build").glob("bdist.*")]:
        shutil.rmtree(stale, ignore_errors=True)


def build_wheel(dist: Path) -> Path:
    """dist/nomoat-*.whl from this checkout (dist emptied first, so the one wheel there is this build's)."""
    shutil.rmtree(dist, ignore_errors=True)
    clean_setuptools_build()
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO), "-w", str(dist)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return next(dist.glob("nomoat-*.whl"))
