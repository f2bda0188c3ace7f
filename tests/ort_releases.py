"""Run this checkout's runtime under an older ONNX Runtime release, in a venv of its own.

A bundle's manifest names the oldest ONNX Runtime its graph runs on (converter/ort_floor.py).
These helpers check that claim against the real releases: a venv per release (cached in
build/ort-releases/, the checkout's wheel reinstalled each session), and a child script that
loads each bundle with nomoat.runtime and generates greedily; when the runtime refuses a bundle,
it tries again with the check switched off, to show what that release would have done.
Needs the package index (pip), like `nox -s pi`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nomoat.runtime.manifest import version_tuple

REPO = Path(__file__).resolve().parents[1]
# The prompt runs in chunks of this many tokens and its last DECODE_TAIL tokens one at a time, as
# generation runs them: several new tokens on top of a filled cache is what 1.18 and 1.19 compute
# wrong, and a prompt in one pass never shows it. The logits compared against here are computed
# with the same two numbers.
PREFILL_CHUNK, DECODE_TAIL = 4, 2
VENVS = REPO / "build" / "ort-releases"
# Long enough for several chunks on the tiny test tokenizers.
LONG_PROMPT = "Hello there, how are you today? Tell me about the weather in Paris this week."

CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
import onnxruntime as ort
from nomoat.runtime import Model
from nomoat.runtime.errors import BundleError
from nomoat.runtime.manifest import OnnxBackend

prompt, new_tokens, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
PREFILL_CHUNK, DECODE_TAIL = int(sys.argv[4]), int(sys.argv[5])

# Greedy ids; the prompt's logits go to an .npy file too: tokens alone hide a wrong kernel on a
# random model, whose greedy text is one token repeated.
def greedy(bundle, name):
    model = Model.load(bundle, prefill_chunk=PREFILL_CHUNK)
    ids = model.prompt_ids(prompt, raw=True)
    np.save(out / f"{Path(bundle).name}-{ort.__version__}-{name}.npy", model.logits(ids, decode_tail=DECODE_TAIL))
    return list(model.generate_tokens(ids, new_tokens, ignore_eos=True))

for bundle in sys.argv[6:]:
    row = {"bundle": bundle, "onnxruntime": ort.__version__}
    try:
        row["ids"] = greedy(bundle, "ids")
    except BundleError as e:
        row["refused"] = str(e)
        # What would this release do without the floor? (Fail or compute wrong, or the floor is too high.)
        check = OnnxBackend.check_onnxruntime
        OnnxBackend.check_onnxruntime = lambda self, installed: None
        try:
            row["unchecked_ids"] = greedy(bundle, "unchecked_ids")
        except Exception as e:
            row["unchecked_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        finally:
            OnnxBackend.check_onnxruntime = check
    except Exception as e:  # accepted, then failed: the floor is too low
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(json.dumps(row), flush=True)
"""


def _run(cmd: list[str], timeout: float = 900) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-3000:]}")
    return result.stdout


def release_python(version: str, wheel: Path) -> Path:
    """A venv's python with onnxruntime==version, the runtime's other dependencies and `wheel`."""
    venv = VENVS / version
    python = venv / "bin" / "python"
    if not python.is_file():
        _run([sys.executable, "-m", "venv", str(venv)])
        # The runtime's other base dependencies, as a fresh `pip install nomoat` gets them; releases
        # before 1.19 were built against numpy 1.x and do not import with numpy 2.
        numpy = "numpy<2" if version_tuple(version) < (1, 19, 0) else "numpy"
        _run([str(python), "-m", "pip", "install", "-q", f"onnxruntime=={version}", numpy, "tokenizers", "jinja2"])
    # The wheel's dependency on onnxruntime would upgrade it: install the checkout without deps.
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)])
    return python


def run_bundles(python: Path, bundles: list[Path], out: Path, prompt: str = LONG_PROMPT,
                new_tokens: int = 12) -> list[dict]:
    """One row per bundle: greedy token ids ("ids"), or why the runtime refused ("refused") and what
    the release did without the check ("unchecked_ids" or "unchecked_error"). Each row's prompt
    logits are under "logits" / "unchecked_logits" (arrays), read from files the child wrote in `out`."""
    import numpy as np

    stdout = _run([str(python), "-c", CHILD, prompt, str(new_tokens), str(out), str(PREFILL_CHUNK), str(DECODE_TAIL),
                   *map(str, bundles)], timeout=600)
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    for row in rows:
        for key, logits_key in (("ids", "logits"), ("unchecked_ids", "unchecked_logits")):
            if key in row:
                row[logits_key] = np.load(out / f"{Path(row['bundle']).name}-{row['onnxruntime']}-{key}.npy")
    return rows
