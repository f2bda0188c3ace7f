"""The smooth stage: input-channel scaling before rounding, folded so the fp32 model is unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nbits import dequantize as reference_dequantize
from nomoat.converter.calibrate import Importance
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.load import load_checkpoint
from nomoat.converter.quantize import QuantRecipe, dequantize, quantize_blockwise
from nomoat.converter.reference import reference_model
from nomoat.converter.smooth import best_scale, smooth
from tiny_models import logits, make_tiny_hf_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_hf_dir(tmp_path_factory.mktemp("smooth") / "hf")
    return path, load_checkpoint(str(path))


def _loud_channels(k: int, seed: int, n_loud: int = 4, gain: float = 30.0) -> np.ndarray:
    """Per-channel activation scale with a few loud channels, as after an RMSNorm in a small LLM."""
    rng = np.random.default_rng(seed)
    scale = np.ones(k, np.float32)
    scale[rng.choice(k, n_loud, replace=False)] = gain
    return scale


@pytest.mark.parametrize("bits,k", [(4, 96), (4, 80), (8, 80)])  # 80: a partial last block
def test_dequantize_reads_back_what_matmulnbits_computes(bits, k):
    w = np.random.default_rng(0).normal(size=(k, 24)).astype(np.float32)
    q = quantize_blockwise(w, bits, 32, "mse")
    ours = dequantize(q, w.shape, bits, 32)
    assert ours.shape == w.shape
    np.testing.assert_array_equal(ours, reference_dequantize(q.packed, q.scales, q.zero_points, bits, 32, k).T)
    assert np.square(ours - w).mean() == pytest.approx(q.mse, rel=1e-4)  # w, rounded as the quantizer measured


def test_scaling_lowers_the_output_error_where_activations_are_loud():
    rng = np.random.default_rng(1)
    k, n = 128, 64
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = rng.normal(size=(1024, k)).astype(np.float32) * _loud_channels(k, seed=1)
    importance = (x**2).mean(0)
    alpha, s = best_scale(w, importance, 4, 32)

    def output_error(scale: np.ndarray) -> float:
        q = quantize_blockwise((w * scale[:, None]).astype(np.float32), 4, 32, "imatrix",
                               importance=(importance / scale**2).astype(np.float32))
        return float(np.square(x @ (dequantize(q, w.shape, 4, 32) / scale[:, None] - w)).mean())

    assert alpha > 0
    assert output_error(s) < 0.9 * output_error(np.ones(k))


def test_uniform_activations_leave_the_weights_alone():
    w = np.random.default_rng(2).normal(size=(64, 32)).astype(np.float32)
    alpha, s = best_scale(w, np.full(64, 3.0, np.float32), 4, 32)
    assert alpha == 0.0 and np.array_equal(s, np.ones(64))


def test_smoothing_keeps_the_fp32_model_and_the_callers_checkpoint(tiny):
    _, ckpt = tiny
    before = {name: t.clone() for name, t in ckpt.tensors.items()}
    spec = ckpt.spec
    # Loud channels on every smoothed input, so the search does pick scales.
    channels = {}
    for layer in range(spec.num_layers):
        for node, width in (("attn.qkv_proj", spec.hidden_size), ("mlp.gate_up_proj", spec.hidden_size),
                            ("mlp.down_proj", spec.intermediate_size)):
            channels[f"layers.{layer}.{node}"] = _loud_channels(width, seed=layer) ** 2
    smoothed, importance, alphas = smooth(ckpt, Importance(channels, tokens=100), QuantRecipe())

    assert set(alphas) == set(channels) and any(a > 0 for a in alphas.values())
    changed = [n for n in ckpt.tensors if not torch.equal(smoothed.tensors[n], ckpt.tensors[n])]
    assert any("input_layernorm" in n for n in changed) and any("up_proj" in n for n in changed)
    # The importance follows the weights: x / s carries importance / s^2.
    node = next(n for n, a in alphas.items() if a > 0)
    assert not np.allclose(importance.channels[node], channels[node])
    # Same function in fp32 ...
    ids = [3, 17, 5, 60, 2, 9, 41]
    torch.testing.assert_close(logits(reference_model(smoothed), ids), logits(reference_model(ckpt), ids),
                               rtol=1e-4, atol=1e-4)
    # ... and the caller's checkpoint (which the fp32 reference is built from) untouched.
    assert all(torch.equal(ckpt.tensors[n], before[n]) for n in before)


@pytest.mark.parametrize("flag,algorithm,smoothed", [
    (True, "imatrix", True), (False, "imatrix", False),
    (None, "imatrix", False),  # opt-in: the recipe's default is off
    # (--smoothing with mse or rtn, which calibrate nothing to smooth by, is refused: test_targets)
])
def test_convert_records_smoothing(tiny, tmp_path, flag, algorithm, smoothed):
    path, _ = tiny
    out = convert(ConvertOptions(model=str(path), out=tmp_path / f"{flag}-{algorithm}", quant="int4",
                                 smoothing=flag, algorithm=algorithm, max_context=64, progress=False,
                                 skip_verify=True))
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["smoothing"] is bool(flag)
    assert (report["smoothing_alpha"] is not None) == smoothed
