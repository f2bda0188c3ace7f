"""The oldest ONNX Runtime a bundle runs on: written by the converter, enforced by the runtime,
and (slow) checked against the real releases on both sides of each floor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from nomoat.__main__ import main as nomoat_main
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.ort_floor import (
    BASE_FLOOR,
    GATHER_FLOOR,
    INT8_MATMUL_FLOOR,
    PACKED_GATHER_FLOOR,
    WINDOW_FLOOR,
)
from nomoat.converter.quantize import LINEAR_ROLES
from nomoat.runtime import Model
from nomoat.runtime.errors import BundleError
from nomoat.runtime.manifest import version_tuple
from tiny_models import make_tiny_hf_dir

# bundle kind -> (source: a LLaMA with tied embeddings (True) or not (False), or a Mistral with a
# sliding window ("window"); quant, the floor its graph needs, the linear layers without zero points,
# the KV cache's element type)
KINDS = {
    "int4_tied": (True, "int4", PACKED_GATHER_FLOOR, (), "float32"),  # the embedding reads the LM head's codes
    "int4_untied": (False, "int4", GATHER_FLOOR, (), "float32"),  # the embedding is its own UINT4 table
    "int4_tied_symmetric": (True, "int4", PACKED_GATHER_FLOOR, LINEAR_ROLES, "float32"),
    "int4_untied_symmetric": (False, "int4", GATHER_FLOOR, LINEAR_ROLES, "float32"),
    "int8": (False, "int8", INT8_MATMUL_FLOOR, (), "float32"),
    "int8_symmetric": (False, "int8", INT8_MATMUL_FLOOR, LINEAR_ROLES, "float32"),
    "fp32": (True, "fp32", BASE_FLOOR, (), "float32"),
    "fp32_kv16": (True, "fp32", BASE_FLOOR, (), "float16"),  # fp16 GroupQueryAttention: no floor of its own
    "fp32_window": ("window", "fp32", WINDOW_FLOOR, (), "float32"),  # GroupQueryAttention's local_window_size
}
SLIDING_WINDOW = 4  # shorter than the prompt (tests/ort_releases.py's LONG_PROMPT)
# Logits at or above a floor agree with this environment's to this relative error. Kernels of one op
# agree across releases to float rounding (~5e-7 measured); 8-bit MatMulNBits without zero points
# took another int8-activation path after 1.27 (1.6e-3 measured, same tokens). So did 4-bit with zero
# points on an AVX-512 VNNI host (Intel Xeon, 2026-11-28): 1.20-1.27 and 1.32 differ in the last two
# of the prompt's 7 rows by 6e-3, same tokens, and each is ~1e-2 from the same graph run with fp32
# activations (accuracy_level 0), agreeing there to 6e-7. With a prompt of several chunks
# (2026-12-07, Zen 5 host) 4-bit without zero points differs too: 2.6e-3 on 1.20, same tokens. So
# every kind with int8 activations is allowed 1e-2. A wrong zero point was off by ~0.8 of the
# logits' range, and a wrong chunk after the first (1.19) by about as much.
AGREEMENT = {kind: 1e-2 for kind, (_, quant, *_) in KINDS.items() if quant != "fp32"}
# The release before each floor: it must fail to run a graph that needs the floor.
# 1.19.2 loads every fp32 graph and computes a prompt's later chunks wrong. (BASE_FLOOR and GATHER_FLOOR
# are the same release.)
RELEASE_BEFORE = dict([(BASE_FLOOR, "1.19.2"), (GATHER_FLOOR, "1.19.2"), (INT8_MATMUL_FLOOR, "1.21.1"),
                       (PACKED_GATHER_FLOOR, "1.26.0"), (WINDOW_FLOOR, "1.23.2")])
# Rows of 192 = 6 blocks of 32: 1.23-1.26 read packed zero points right for rows of two blocks only.
SHAPE = {"hidden_size": 192, "intermediate_size": 384, "num_attention_heads": 6, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("floor")
    sources = {tie: make_tiny_hf_dir(root / f"hf-{tie}", tie=tie, **SHAPE) for tie in (True, False)}
    sources["window"] = make_tiny_hf_dir(root / "hf-window", arch="mistral", tie=True, sliding_window=SLIDING_WINDOW,
                                         **SHAPE)
    # rtn: the same ops as the default imatrix search, without its calibration run (~20 s).
    return {kind: convert(ConvertOptions(model=str(sources[source]), out=root / kind, quant=quant, max_context=128,
                                         algorithm=None if quant == "fp32" else "rtn", symmetric=symmetric,
                                         kv_dtype=kv_dtype, progress=False, skip_verify=True))
            for kind, (source, quant, _, symmetric, kv_dtype) in KINDS.items()}


def _floor(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["onnx"]["min_onnxruntime"]


def _copy_with_floor(bundle: Path, dest: Path, floor: str | None) -> Path:
    """A copy of `bundle` whose manifest names `floor` (None: no floor, as written before the
    converter recorded it). manifest.json carries no hash of its own, so the copy stays valid."""
    copy = Path(shutil.copytree(bundle, dest))
    manifest = json.loads((copy / "manifest.json").read_text())
    if floor is None:
        del manifest["onnx"]["min_onnxruntime"]
    else:
        manifest["onnx"]["min_onnxruntime"] = floor
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_version_tuple_reads_release_dev_and_local_versions():
    assert version_tuple("1.23.0") == (1, 23, 0)
    assert version_tuple("1.24.0.dev20250601") == (1, 24, 0)
    assert version_tuple("1.22.1+cpu") == (1, 22, 1)
    assert version_tuple("2.0") == (2, 0, 0)
    assert version_tuple("1.9.0") < version_tuple("1.10.0")  # numbers, not strings
    with pytest.raises(ValueError, match="not a version"):
        version_tuple("latest")


@pytest.mark.parametrize("kind", KINDS)
def test_the_manifest_names_the_floor_of_what_the_graph_holds(bundles, kind):
    assert _floor(bundles[kind]) == KINDS[kind][2]


def test_inspect_shows_the_floor(bundles, capsys):
    assert nomoat_main(["inspect", str(bundles["int4_tied"])]) == 0
    assert f"runs on    onnxruntime >= {PACKED_GATHER_FLOOR}" in capsys.readouterr().out


def test_the_runtime_refuses_a_bundle_that_needs_a_newer_onnxruntime(bundles, tmp_path):
    major, minor, _ = version_tuple(onnxruntime.__version__)
    newer = _copy_with_floor(bundles["int4_untied"], tmp_path / "newer", f"{major}.{minor + 1}.0")
    with pytest.raises(BundleError, match=rf"needs onnxruntime >= {major}\.{minor + 1}\.0, and "
                                          rf"{onnxruntime.__version__} is installed.*pip install"):
        Model.load(newer)
    # Exactly the installed release is enough.
    Model.load(_copy_with_floor(bundles["int4_untied"], tmp_path / "same", onnxruntime.__version__))


def test_the_runtime_refuses_releases_before_its_own_floor_whatever_the_manifest_says(bundles, tmp_path, capsys):
    """Bundles converted before 2026-12-07 name 1.18.0; the runtime's multi-token steps need 1.20."""
    from nomoat.runtime.manifest import RUNTIME_ONNXRUNTIME_FLOOR, OnnxBackend

    assert RUNTIME_ONNXRUNTIME_FLOOR == BASE_FLOOR == "1.20.0"
    old = OnnxBackend(model_file="model.onnx", data_file=None, io={}, min_onnxruntime="1.18.0")
    with pytest.raises(BundleError, match=r"needs onnxruntime >= 1\.20\.0, and 1\.19\.2 is installed"):
        old.check_onnxruntime("1.19.2")
    old.check_onnxruntime("1.20.0")
    OnnxBackend(model_file="model.onnx", data_file=None, io={}).check_onnxruntime("1.20.0")  # no floor written
    with pytest.raises(BundleError, match=r"needs onnxruntime >= 1\.20\.0"):
        OnnxBackend(model_file="model.onnx", data_file=None, io={}).check_onnxruntime("1.18.0")
    copy = _copy_with_floor(bundles["fp32"], tmp_path / "old", "1.18.0")
    assert nomoat_main(["inspect", str(copy)]) == 0
    assert "runs on    onnxruntime >= 1.20.0" in capsys.readouterr().out


def test_a_malformed_floor_is_a_malformed_manifest(bundles, tmp_path):
    with pytest.raises(BundleError, match="manifest.json is malformed.*min_onnxruntime 'soon'"):
        Model.load(_copy_with_floor(bundles["fp32"], tmp_path / "b", "soon"))


def test_a_bundle_without_a_floor_still_loads(bundles, tmp_path):
    Model.load(_copy_with_floor(bundles["fp32"], tmp_path / "b", None))


def _relative_error(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(logits - reference).max() / np.abs(reference).max())


@pytest.mark.slow
def test_each_floor_is_the_oldest_release_that_runs_the_graph(bundles, tmp_path_factory):
    """At its floor every bundle computes the logits and greedy tokens it computes here; on the
    release before a floor the runtime refuses the bundles that need it, and without that refusal
    the release fails or computes other logits (so no floor is higher than it must be)."""
    from checkout_wheel import build_wheel
    from ort_releases import DECODE_TAIL, LONG_PROMPT, PREFILL_CHUNK, release_python, run_bundles

    here = {}
    for kind, bundle in bundles.items():
        model = Model.load(bundle, prefill_chunk=PREFILL_CHUNK)
        ids = model.prompt_ids(LONG_PROMPT, raw=True)
        assert len(ids) > PREFILL_CHUNK + DECODE_TAIL  # several chunks, the later ones on a filled cache
        here[kind] = (model.logits(ids, decode_tail=DECODE_TAIL), list(model.generate_tokens(ids, 12, ignore_eos=True)))
    wheel = build_wheel(tmp_path_factory.mktemp("dist"))
    releases = sorted({*RELEASE_BEFORE, *RELEASE_BEFORE.values()}, key=version_tuple)
    for release in releases:
        out = tmp_path_factory.mktemp(f"ort-{release}")
        python = release_python(release, wheel)
        rows = {Path(r["bundle"]).name: r for r in run_bundles(python, list(bundles.values()), out)}
        assert set(rows) == set(bundles)
        for kind, row in rows.items():
            assert row["onnxruntime"] == release
            floor = KINDS[kind][2]
            logits, ids = here[kind]
            if version_tuple(release) >= version_tuple(floor):
                assert "error" not in row and "refused" not in row, (release, kind, row)
                assert _relative_error(row["logits"], logits) < AGREEMENT.get(kind, 1e-3), \
                    f"{kind} on onnxruntime {release}"
                assert row["ids"] == ids, f"{kind} on onnxruntime {release} generates other tokens"
            else:
                assert f"needs onnxruntime >= {floor}" in row.get("refused", ""), (release, kind, row)
                if release == RELEASE_BEFORE[floor]:
                    assert "unchecked_error" in row or _relative_error(row["unchecked_logits"], logits) > 0.05, \
                        f"onnxruntime {release} runs {kind} right: its floor {floor} is too high"
