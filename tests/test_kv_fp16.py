"""A float16 KV cache (`--kv-dtype float16`): half the cache's memory, attention in fp16."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.fit import kv_cache_bytes
from nomoat.converter.ort_floor import BASE_FLOOR
from nomoat.runtime import BundleError, Model
from tiny_models import make_tiny_hf_dir

CONTEXT = 96


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    hf = make_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")
    out = tmp_path_factory.mktemp("kv")
    return {dtype: convert(ConvertOptions(model=str(hf), out=out / dtype, quant="fp32", max_context=CONTEXT,
                                          kv_dtype=dtype, progress=False, skip_verify=True))
            for dtype in ("float32", "float16")}


def test_the_graph_keeps_its_cache_in_float16_and_its_layers_in_float32(bundles):
    model = onnx.load(str(bundles["float16"] / "model.onnx"), load_external_data=False)
    kv = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    assert kv and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in kv)
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    layers = sum(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    # One Cast into each attention and one out of it; nothing else changes type.
    assert sum(n.op_type == "Cast" for n in model.graph.node) == 2 * layers
    plain = onnx.load(str(bundles["float32"] / "model.onnx"), load_external_data=False)
    assert not any(n.op_type == "Cast" for n in plain.graph.node)


def test_the_manifest_records_the_cache(bundles):
    m = json.loads((bundles["float16"] / "manifest.json").read_text())
    assert m["onnx"]["kv_dtype"] == "float16" and m["target"]["recipe"]["kv_dtype"] == "float16"
    assert "kv_dtype" in m["target"]["recipe"]["overrides"]
    # fp16 attention runs right from the base floor on (tests/test_ort_floor.py checks it on the releases).
    assert m["onnx"]["min_onnxruntime"] == BASE_FLOOR
    assert json.loads((bundles["float32"] / "manifest.json").read_text())["onnx"]["kv_dtype"] == "float32"


def test_the_runtime_allocates_a_half_size_cache(bundles):
    half, full = Model.load(bundles["float16"]), Model.load(bundles["float32"])
    assert {v.data_type() for v in half.session._kv} == {"tensor(float16)"}
    assert {v.data_type() for v in full.session._kv} == {"tensor(float)"}
    size = sum(np.prod(v.shape()) for v in half.session._kv)
    assert size == sum(np.prod(v.shape()) for v in full.session._kv)
    # The memory estimate counts the same: 2 bytes an element.
    spec = half.manifest.model
    assert kv_cache_bytes(spec, CONTEXT, "float16") == size * 2
    assert kv_cache_bytes(spec, CONTEXT, "float32") == size * 4


def test_fp16_cache_tracks_the_fp32_cache(bundles):
    half, full = Model.load(bundles["float16"]), Model.load(bundles["float32"])
    ids = list(range(3, 43))
    a, b = half.logits(ids), full.logits(ids)
    diff = np.abs(a - b)
    # fp16 keys and values round at ~1e-3 relative: close to, but not the same as, the fp32 cache.
    assert 0 < diff.max() < 2e-2 * np.abs(b).max()
    # Decoding from the cache (chunked prefill, then one token at a time) agrees as well.
    assert list(half.generate_tokens(ids, 16, ignore_eos=True)) == list(full.generate_tokens(ids, 16, ignore_eos=True))


def test_inspect_says_the_app_cannot_use_a_float16_cache(bundles, capsys):
    from nomoat.__main__ import main

    assert main(["inspect", str(bundles["float16"])]) == 0
    assert "KV cache   float16 (the Android app refuses it" in capsys.readouterr().out
    assert main(["inspect", str(bundles["float32"])]) == 0
    assert "KV cache   " not in capsys.readouterr().out  # the line is for float16 caches only


def test_an_unknown_cache_type_is_refused(bundles, tmp_path):
    b = Path(shutil.copytree(bundles["float16"], tmp_path / "copy"))
    m = json.loads((b / "manifest.json").read_text())
    m["onnx"]["kv_dtype"] = "bfloat16"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="kv_dtype 'bfloat16'"):
        Model.load(b)
