"""Mistral's sliding attention window (Mistral 7B v0.1: 4,096 tokens), exported as GroupQueryAttention's
local_window_size and checked against transformers, which applies the window as the model was trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from nomoat.__main__ import main as nomoat_main
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.errors import ConversionError
from nomoat.converter.load import load_checkpoint
from nomoat.converter.ort_floor import BASE_FLOOR, WINDOW_FLOOR
from nomoat.converter.reference import greedy_tokens
from nomoat.runtime import Model
from tiny_models import make_tiny_hf_dir

WINDOW = 6
CONTEXT = 64


def _convert(model: Path, out: Path, quant: str = "fp32", max_context: int = CONTEXT,
             kv_dtype: str = "float32") -> Path:
    return convert(ConvertOptions(model=str(model), out=out, target="host", quant=quant, max_context=max_context,
                                  algorithm=None if quant == "fp32" else "rtn", kv_dtype=kv_dtype, progress=False,
                                  skip_verify=True))


def _ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return _hf(model_dir)(torch.tensor([ids])).logits[0].numpy()


def _with_config(model_dir: Path, dest: Path, **changes) -> Path:
    copy = Path(shutil.copytree(model_dir, dest))
    cfg = json.loads((copy / "config.json").read_text())
    for key, value in changes.items():
        if value is _ABSENT:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


_ABSENT = object()


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("mistral") / "hf", arch="mistral", sliding_window=WINDOW)


@pytest.fixture(scope="module")
def windowed_bundle(mistral_dir, tmp_path_factory) -> Path:
    return _convert(mistral_dir, tmp_path_factory.mktemp("b") / "fp32")


def _gqa_windows(bundle: Path) -> set[int | None]:
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    return {next((a.i for a in node.attribute if a.name == "local_window_size"), None)
            for node in graph.node if node.op_type == "GroupQueryAttention"}


def _floor(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["onnx"]["min_onnxruntime"]


@pytest.mark.parametrize("prefill_chunk", [5, 10, None])
def test_logits_past_the_window_match_transformers(mistral_dir, windowed_bundle, tmp_path, prefill_chunk):
    # Chunks shorter and longer than the window, and a decode tail: the window is applied across
    # chunks and in decode steps, as generation runs the graph; None: the whole prompt in one pass.
    ids = _ids(24, Model.load(windowed_bundle).manifest.model.vocab_size)
    if prefill_chunk is None:
        ours = Model.load(windowed_bundle).logits(ids)
    else:
        ours = Model.load(windowed_bundle, prefill_chunk=prefill_chunk).logits(ids, decode_tail=6)
    np.testing.assert_allclose(ours, _hf_logits(mistral_dir, ids), atol=1e-4, rtol=1e-4)
    # The window matters from position WINDOW on: the same weights attending to every position
    # agree before it and not after, so a graph without the window fails the comparison above.
    everything = _hf_logits(_with_config(mistral_dir, tmp_path / "full", sliding_window=None), ids)
    np.testing.assert_allclose(ours[:WINDOW], everything[:WINDOW], atol=1e-4, rtol=1e-4)
    assert np.abs(ours[WINDOW:] - everything[WINDOW:]).max(axis=-1).min() > 1e-3


def test_a_float16_cache_keeps_the_window(mistral_dir, tmp_path):
    """--kv-dtype float16 runs attention in fp16: the window holds there too (within fp16 rounding)."""
    model = Model.load(_convert(mistral_dir, tmp_path / "kv16", kv_dtype="float16"), prefill_chunk=5)
    ids = _ids(24, model.manifest.model.vocab_size, seed=5)
    ours = model.logits(ids, decode_tail=6)
    np.testing.assert_allclose(ours, _hf_logits(mistral_dir, ids), atol=2e-3, rtol=2e-3)
    everything = _hf_logits(_with_config(mistral_dir, tmp_path / "full", sliding_window=None), ids)
    assert np.abs(ours[WINDOW:] - everything[WINDOW:]).max(axis=-1).min() > 1e-2


def test_greedy_generation_past_the_window_matches_transformers(mistral_dir, windowed_bundle):
    model = Model.load(windowed_bundle)
    prompt = _ids(4, model.manifest.model.vocab_size, seed=2)
    assert list(model.generate_tokens(prompt, 24, ignore_eos=True)) == greedy_tokens(_hf(mistral_dir), prompt, 24)


def test_the_graph_holds_the_window_and_the_manifest_its_floor(mistral_dir, windowed_bundle, tmp_path, capsys):
    assert _gqa_windows(windowed_bundle) == {WINDOW}
    assert _floor(windowed_bundle) == WINDOW_FLOOR
    manifest = json.loads((windowed_bundle / "manifest.json").read_text())
    assert manifest["model"]["sliding_window"] == WINDOW
    assert Model.load(windowed_bundle).manifest.model.sliding_window == WINDOW
    assert nomoat_main(["inspect", str(windowed_bundle)]) == 0
    assert f"sliding window {WINDOW}" in capsys.readouterr().out
    # Quantizing keeps the attention nodes as they are.
    int4 = _convert(mistral_dir, tmp_path / "int4", quant="int4")
    assert _gqa_windows(int4) == {WINDOW}
    assert _floor(int4) == WINDOW_FLOOR


def test_a_window_as_long_as_the_cache_is_plain_attention(mistral_dir, tmp_path, capsys):
    """Within a window every position sees all before it: no attribute, no higher floor, and the
    same logits as transformers with its window. One position shorter, the window is applied."""
    wide = _with_config(mistral_dir, tmp_path / "wide", sliding_window=CONTEXT)
    bundle = _convert(wide, tmp_path / "b")
    assert _gqa_windows(bundle) == {None}
    assert _floor(bundle) == BASE_FLOOR
    model = Model.load(bundle)
    ids = _ids(CONTEXT, model.manifest.model.vocab_size, seed=4)
    np.testing.assert_allclose(model.logits(ids), _hf_logits(wide, ids), atol=1e-4, rtol=1e-4)
    assert nomoat_main(["inspect", str(bundle)]) == 0
    assert f"sliding window {CONTEXT} (not reached within the {CONTEXT}-token context)" in capsys.readouterr().out
    shorter = _with_config(mistral_dir, tmp_path / "shorter", sliding_window=CONTEXT - 1)
    assert _gqa_windows(_convert(shorter, tmp_path / "c")) == {CONTEXT - 1}


def test_a_config_without_the_key_has_transformers_default_window(mistral_dir, tmp_path):
    """transformers' MistralConfig gives a config.json without sliding_window Mistral 7B v0.1's 4,096."""
    from transformers import MistralConfig

    assert MistralConfig().sliding_window == 4096
    assert load_checkpoint(_with_config(mistral_dir, tmp_path / "absent", sliding_window=_ABSENT)) \
        .spec.sliding_window == 4096
    assert load_checkpoint(_with_config(mistral_dir, tmp_path / "null", sliding_window=None)).spec.sliding_window \
        is None


@pytest.mark.parametrize("value", ["wide", -3, 4.5, True, False, 0.0])
def test_a_sliding_window_that_is_not_a_count_is_refused(mistral_dir, tmp_path, value):
    bad = _with_config(mistral_dir, tmp_path / "bad", sliding_window=value)
    refusal = r"config.json lacks or has an invalid sliding_window .*correct that value"
    with pytest.raises(ConversionError, match=refusal):
        load_checkpoint(bad)


@pytest.mark.parametrize("layer_types", [["full_attention", "sliding_attention"], "sliding_attention"])
def test_attention_that_differs_from_layer_to_layer_is_refused(mistral_dir, tmp_path, layer_types):
    """Ministral's alternating layers under model_type mistral: transformers' Mistral would put the
    window on every layer, the checkpoint was trained otherwise."""
    mixed = _with_config(mistral_dir, tmp_path / "mixed", layer_types=layer_types)
    with pytest.raises(ConversionError, match=r"sets layer_types, attention that differs from layer to layer"):
        load_checkpoint(mixed)
    alike = _with_config(mistral_dir, tmp_path / "alike", layer_types=["sliding_attention"] * 2)
    assert load_checkpoint(alike).spec.sliding_window == WINDOW


def test_the_config_written_for_transformers_keeps_the_window(mistral_dir):
    """The reference verify checks against and `nomoat merge`'s config.json are built from it."""
    assert load_checkpoint(mistral_dir).spec.to_hf_config()["sliding_window"] == WINDOW


def test_a_mistral_v0_1_gguf_says_its_window_is_lost_past_it(tmp_path, capsys):
    """llama.cpp writes Mistral 7B v0.1 as 'llama' with no window key: the bundle attends to every position,
    where transformers attends within 4,096. Only general.name can hint at it; a notice says so."""
    from tiny_models import write_gguf_from_hf

    hf = make_tiny_hf_dir(tmp_path / "hf", arch="mistral", sliding_window=None, max_position_embeddings=8192)
    gguf = write_gguf_from_hf(hf, tmp_path / "mistral.gguf", name="Mistral 7B v0.1")
    assert load_checkpoint(gguf).unrecorded_window == 4096
    _convert(gguf, tmp_path / "long", max_context=8192)
    notice = capsys.readouterr().err
    assert "[nomoat] notice: " in notice and "looks like Mistral 7B v0.1" in notice
    assert "attends to all 8,192 positions" in notice and "pass --max-context 4096" in notice
    _convert(gguf, tmp_path / "within", max_context=4096)
    assert "notice" not in capsys.readouterr().err


def test_only_a_gguf_named_mistral_with_v0_1_rope_gets_the_window_notice(tmp_path):
    """Mistral 7B v0.2 and v0.3 and Nemo have no window (and a rope_theta of 1e6 or more); another name says
    nothing of Mistral."""
    from tiny_models import write_gguf_from_hf

    hf = make_tiny_hf_dir(tmp_path / "hf", arch="mistral", sliding_window=None)
    assert load_checkpoint(write_gguf_from_hf(hf, tmp_path / "other.gguf")).unrecorded_window is None
    later = make_tiny_hf_dir(tmp_path / "v0.2", arch="mistral", sliding_window=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    named = write_gguf_from_hf(later, tmp_path / "v0.2.gguf", name="Mistral 7B Instruct v0.2")
    assert load_checkpoint(named).unrecorded_window is None
