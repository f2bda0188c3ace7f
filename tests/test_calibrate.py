"""The calibrate stage (importance matrix) and the weighted scale search it feeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nbits import dequantize
from nomoat.converter.calibrate import PROMPTS, _prompt_ids, activation_importance, calibration_sequences
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.load import load_checkpoint
from nomoat.converter.quantize import quantize_blockwise
from nomoat.converter.reference import reference_model
from tiny_models import make_tiny_hf_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_hf_dir(tmp_path_factory.mktemp("cal") / "hf")
    ckpt = load_checkpoint(str(path))
    return path, ckpt, reference_model(ckpt)


def test_importance_lowers_the_output_error_where_activations_are_loud():
    rng = np.random.default_rng(0)
    k, n, block = 128, 64, 32
    w = rng.normal(size=(k, n)).astype(np.float32)
    # Activations with a few loud channels, as after an RMSNorm in a small LLM.
    scale = np.ones(k, np.float32)
    scale[rng.choice(k, 6, replace=False)] = 20.0
    x = rng.normal(size=(512, k)).astype(np.float32) * scale
    importance = (x**2).mean(0)
    errors = {}
    for name, imp in (("plain", None), ("weighted", importance)):
        q = quantize_blockwise(w, 4, block, "imatrix", importance=imp)
        errors[name] = float(np.square(x @ (w - dequantize(q.packed, q.scales, q.zero_points, 4, block, k).T)).mean())
    assert errors["weighted"] < 0.8 * errors["plain"]


def test_quantize_blockwise_round_trips_its_layout():
    w = np.random.default_rng(1).normal(size=(96, 8)).astype(np.float32)
    for bits in (4, 8):
        q = quantize_blockwise(w, bits, 32, "mse")
        err = np.square(dequantize(q.packed, q.scales, q.zero_points, bits, 32, 96).T - w).mean()
        assert err == pytest.approx(q.mse, rel=1e-4) and err < (0.02 if bits == 4 else 1e-4)


def test_calibration_text_is_the_models_own_and_seeded(tiny):
    _, ckpt, model = tiny
    a = calibration_sequences(ckpt, model, new_tokens=12, seed=0)
    b = calibration_sequences(ckpt, model, new_tokens=12, seed=0)
    c = calibration_sequences(ckpt, model, new_tokens=12, seed=1)
    assert a == b and a != c and len(a) == len(PROMPTS)
    assert ckpt.tokenizer.chat_template  # so the requests are rendered in it
    for prompt, seq in zip(_prompt_ids(ckpt), a, strict=True):
        assert seq[:len(prompt)] == prompt and len(prompt) < len(seq) <= len(prompt) + 12
        assert max(seq) < ckpt.spec.vocab_size


def test_importance_covers_every_quantized_matmul(tiny):
    _, ckpt, model = tiny
    seqs = [[5, 6, 7, 8], [9, 10]]
    imp = activation_importance(ckpt, model, seqs)
    spec = ckpt.spec
    names = {f"layers.{i}.{n}" for i in range(spec.num_layers)
             for n in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} | {"lm_head"}
    assert set(imp.channels) == names and imp.tokens == 6
    assert imp.for_node("layers.0.mlp.down_proj").shape == (spec.intermediate_size,)
    # lm_head reads the final norm's output: check one value against a direct computation.
    with torch.no_grad():
        hidden = torch.cat([model.model(torch.tensor([s])).last_hidden_state[0] for s in seqs])
    np.testing.assert_allclose(imp.for_node("lm_head"), hidden.pow(2).mean(0).numpy(), rtol=1e-4, atol=1e-7)


def test_grams_are_kept_only_when_asked_and_agree_with_the_importance(tiny):
    _, ckpt, model = tiny
    seqs = [[5, 6, 7, 8], [9, 10, 11]]
    assert activation_importance(ckpt, model, seqs).grams == {}
    imp = activation_importance(ckpt, model, seqs, grams=True)
    assert set(imp.grams) == set(imp.channels) - {"lm_head"}  # the tied head keeps its diagonal only
    for name, gram in imp.grams.items():
        np.testing.assert_allclose(np.diagonal(gram), imp.channels[name], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(gram, gram.T, atol=1e-7)
    # One off-diagonal value against a direct computation: the input of layer 0's q_proj.
    captured = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, i: captured.append(i[0][0]))
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    hook.remove()
    x = torch.cat(captured).double()
    np.testing.assert_allclose(imp.gram_for("layers.0.attn.qkv_proj"), (x.T @ x / 7).numpy(), rtol=1e-4, atol=1e-7)


def _correlated_activations(rng, tokens, k):
    mix = np.eye(k) + 0.3 * rng.normal(size=(k, k))
    loud = np.where(rng.random(k) < 0.05, 8.0, 1.0)
    return (rng.normal(size=(tokens, k)) @ mix) * loud


def test_gptq_lowers_the_output_error_on_held_out_activations():
    """GPTQ's point: error on *outputs* for inputs like the calibration's, not on the weights."""
    rng = np.random.default_rng(0)
    k, n, block = 256, 48, 32  # two runs of LAZY_COLUMNS: errors cross from one to the next
    w = rng.normal(size=(k, n)).astype(np.float32) * 0.05
    mix_seed = rng.integers(1 << 30)
    calib = _correlated_activations(np.random.default_rng(mix_seed), 2048, k)
    held_out = _correlated_activations(np.random.default_rng(mix_seed), 4096, k)[2048:]  # same mix, new tokens
    gram = calib.T @ calib / len(calib)
    errors, weight_mse = {}, {}
    for algorithm in ("imatrix", "gptq"):
        q = quantize_blockwise(w, 4, block, algorithm, importance=np.diagonal(gram), gram=gram)
        deq = dequantize(q.packed, q.scales, q.zero_points, 4, block, k).T
        errors[algorithm] = float(np.square(held_out @ (w - deq)).mean())
        weight_mse[algorithm] = float(np.square(w - deq).mean())
        assert q.mse == pytest.approx(weight_mse[algorithm], rel=1e-4)  # the layout reads back as reported
    assert errors["gptq"] < 0.7 * errors["imatrix"]
    assert weight_mse["gptq"] > weight_mse["imatrix"]  # it trades weight error for output error


def test_gptq_without_a_gram_matrix_is_the_imatrix_search():
    w = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
    imp = np.linspace(0.5, 2.0, 64).astype(np.float32)
    a = quantize_blockwise(w, 4, 32, "gptq", importance=imp)
    b = quantize_blockwise(w, 4, 32, "imatrix", importance=imp)
    assert np.array_equal(a.packed, b.packed) and np.array_equal(a.scales, b.scales)


def test_gptq_pads_a_partial_block_and_zeroes_silent_channels():
    rng = np.random.default_rng(3)
    k, n, block = 80, 8, 32  # 80 = 2.5 blocks
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = rng.normal(size=(512, k))
    x[:, 5] = 0.0  # a channel calibration never saw
    gram = x.T @ x / len(x)
    q = quantize_blockwise(w, 4, block, "gptq", importance=np.diagonal(gram), gram=gram)
    deq = dequantize(q.packed, q.scales, q.zero_points, 4, block, k).T
    assert q.packed.shape == (n, 3, block // 2) and np.isfinite(deq).all()
    assert np.abs(deq[5]).max() <= np.abs(q.scales).max()  # its weight went to (about) zero: it never mattered


@pytest.mark.parametrize("algorithm,calibrated", [("imatrix", True), ("gptq", True), ("mse", False)])
def test_convert_calibrates_only_for_imatrix(tiny, tmp_path, algorithm, calibrated):
    path, _, _ = tiny
    out = convert(ConvertOptions(model=str(path), out=tmp_path / algorithm, quant="int4", algorithm=algorithm,
                                 max_context=64, progress=False, skip_verify=True))
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert (report["calibration_tokens"] > 0) == calibrated
    assert manifest["quantization"]["algorithm"] == algorithm
