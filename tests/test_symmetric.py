"""Symmetric block quantization (`--symmetric`): no zero points, each block centred on the middle code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nbits import dequantize
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.errors import ConversionError
from nomoat.converter.quantize import LINEAR_ROLES, linear_role, parse_symmetric, quantize_blockwise
from nomoat.runtime import Model
from tiny_models import make_tiny_hf_dir


def _gram(k: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(512, k)).astype(np.float32)
    return x.T @ x / len(x)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("algorithm", ["imatrix", "mse", "rtn", "gptq"])
def test_symmetric_blocks_store_no_zero_points_and_round_trip(bits, algorithm):
    k, n = 96, 16
    w = np.random.default_rng(1).normal(size=(k, n)).astype(np.float32)
    gram = _gram(k)
    q = quantize_blockwise(w, bits, 32, algorithm, importance=np.diagonal(gram), gram=gram, symmetric=True)
    assert q.zero_points is None
    # Read back the way MatMulNBits does without zero points: (code - 2^(bits-1)) * scale.
    err = np.square(dequantize(q.packed, q.scales, None, bits, 32, k).T - w).mean()
    assert err == pytest.approx(q.mse, rel=1e-4) and err < (0.03 if bits == 4 else 1e-4)


def test_symmetric_scales_take_the_sign_that_reaches_the_longer_side():
    # Two blocks exactly on a symmetric 4-bit grid of step 0.1: one reaches +8 steps (only a negative
    # scale maps code 0 to +8 steps), the other -8 steps (a positive scale).
    rng = np.random.default_rng(2)
    up = np.concatenate([[8, -7], rng.integers(-7, 9, 30)])
    down = np.concatenate([[-8, 7], rng.integers(-8, 8, 30)])
    w = (np.stack([up, down], axis=1) * 0.1).astype(np.float32)  # [K=32, N=2]
    q = quantize_blockwise(w, 4, 32, "mse", symmetric=True)
    assert q.mse < 1e-12
    assert q.scales[0] < 0 < q.scales[1]


def test_symmetric_search_beats_symmetric_rounding():
    k, n = 256, 64
    rng = np.random.default_rng(3)
    w = rng.standard_t(4, size=(k, n)).astype(np.float32)  # heavy tails, as LLM weights have
    searched = quantize_blockwise(w, 4, 32, "mse", symmetric=True)
    rounded = quantize_blockwise(w, 4, 32, "rtn", symmetric=True)
    # Small on random weights (measured 3 %); the importance weighting is where the search pays.
    assert searched.mse < 0.99 * rounded.mse


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_without_zero_points_centres_on_the_middle_code(bits):
    """What --symmetric relies on: ONNX Runtime's kernel assumes zero point 2^(bits-1) when none is given."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n, block = 128, 48, 32
    rng = np.random.default_rng(4)
    w = rng.normal(size=(k, n)).astype(np.float32)
    q = quantize_blockwise(w, bits, block, "mse", symmetric=True)
    node = helper.make_node("MatMulNBits", ["a", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(q.packed, "w"), numpy_helper.from_array(q.scales, "s")])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.normal(size=(3, k)).astype(np.float32)
    expected = a @ dequantize(q.packed, q.scales, None, bits, block, k).T
    np.testing.assert_allclose(session.run(None, {"a": a})[0], expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return make_tiny_hf_dir(tmp_path_factory.mktemp("sym") / "hf", tie=True)


def _convert(model, out, **kw):
    return convert(ConvertOptions(model=str(model), out=out, target="host", max_context=128, progress=False,
                                  skip_verify=True, **kw))


def _zero_point_inputs(bundle) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    return {n.name: len(n.input) - 3 for n in graph.node if n.op_type == "MatMulNBits"}


def test_the_default_recipe_leaves_only_gate_up_without_zero_points(tied_dir, tmp_path):
    bundle = _convert(tied_dir, tmp_path / "default", quant="int4")
    zero_points = _zero_point_inputs(bundle)
    assert len(zero_points) == 4 * 2 + 1
    assert {name for name, n in zero_points.items() if n == 0} == {f"layers.{i}.mlp.gate_up_proj" for i in range(2)}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["symmetric"] == ["gate_up"]


def test_symmetric_layers_have_no_zero_points_and_track_fp32(tied_dir, tmp_path):
    fp32 = _convert(tied_dir, tmp_path / "fp32", quant="fp32")
    bundle = _convert(tied_dir, tmp_path / "sym", quant="int4", symmetric=LINEAR_ROLES)
    assert set(_zero_point_inputs(bundle).values()) == {0}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["symmetric"] == list(LINEAR_ROLES)
    assert "symmetric" in manifest["target"]["recipe"]["overrides"]
    ref, q = Model.load(fp32), Model.load(bundle)
    ids = np.random.default_rng(5).integers(3, ref.manifest.model.vocab_size, 24).tolist()
    a, b = ref.logits(ids), q.logits(ids)
    assert not np.array_equal(a, b) and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
    # With no symmetric layer every block keeps its zero point, and the rounding differs.
    asym = _convert(tied_dir, tmp_path / "asym", quant="int4", symmetric=())
    assert set(_zero_point_inputs(asym).values()) == {1}
    assert not np.array_equal(Model.load(asym).logits(ids), b)


def test_symmetric_names_layers_by_role():
    assert parse_symmetric("all") == LINEAR_ROLES
    assert parse_symmetric("none") == () and parse_symmetric("") == ()
    assert parse_symmetric("down, gate_up,down") == ("down", "gate_up")
    assert [linear_role(n) for n in ("layers.0.attn.qkv_proj", "layers.12.attn.o_proj", "layers.1.mlp.gate_up_proj",
                                     "layers.1.mlp.down_proj", "lm_head")] == list(LINEAR_ROLES)


def test_an_unknown_symmetric_layer_is_refused_by_name(tied_dir, tmp_path):
    with pytest.raises(ConversionError, match=r"--symmetric gate: no such layer; choose from qkv, o, gate_up"):
        _convert(tied_dir, tmp_path / "bad", quant="int4", symmetric=("gate",))
    assert not (tmp_path / "bad").exists()
