"""The memory estimate and the fit check (fast: tiny models, and big models described by config only)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from nomoat.converter import convert as convert_module
from nomoat.converter import targets as targets_module
from nomoat.converter.convert import ConvertOptions, convert, fit_recipe
from nomoat.converter.errors import ConversionError
from nomoat.converter.fit import MiB, check_fit, estimate_memory, largest_fitting_context
from nomoat.converter.load import load_checkpoint
from nomoat.converter.peek import peek_spec
from nomoat.converter.quantize import LINEAR_ROLES
from nomoat.converter.targets import Recipe, load_target
from tiny_models import make_tiny_hf_dir, write_gguf_from_hf, write_meta_from_hf

# Llama-2-7B's config.json: 6.7B parameters, 13.5 GB in bf16, 27 GB once loaded in fp32.
LLAMA2_7B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def _config_only(path: Path, config: dict) -> Path:
    """A model folder holding only config.json: what the fit check must be able to refuse."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _initializer_bytes(onnx_file: Path) -> int:
    """Bytes the initializers are stored in: tensors pointing at the same bytes of the data file
    (a tied lookup's scales are the LM head's) count once."""
    model = onnx.load(str(onnx_file), load_external_data=False)
    inline, stored = 0, set()
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if ext:
            stored.add((int(ext["offset"]), int(ext["length"])))
        else:
            inline += len(t.raw_data)
    return inline + sum(length for _, length in stored)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("fit") / "tiny", max_position_embeddings=4096)


@pytest.mark.parametrize("arch,tie,quant,head,symmetric,kv", [
    ("llama", False, "fp32", None, None, None), ("llama", False, "int8", None, None, None),
    ("llama", False, "int4", None, None, None), ("llama", True, "int4", None, None, None),
    ("llama", True, "int4", 8, None, None), ("qwen2", False, "int8", None, None, None),
    ("llama", True, "int4", None, LINEAR_ROLES, None), ("llama", False, "int8", None, (), None),
    # the cache's type, whatever this machine's host recipe picks: the rotary tables take it
    ("llama", True, "int4", None, None, "float16"), ("llama", True, "int4", None, None, "float32"),
])
def test_weight_estimate_is_the_exported_size(tmp_path, arch, tie, quant, head, symmetric, kv, block=None):
    model = make_tiny_hf_dir(tmp_path / "m", arch=arch, tie=tie)
    out = convert(ConvertOptions(model=str(model), out=tmp_path / "b", quant=quant, max_context=64,
                                 lm_head_bits=head, symmetric=symmetric, kv_dtype=kv, progress=False,
                                 skip_verify=True, block_size=block))
    manifest = json.loads((out / "manifest.json").read_text())
    estimated = manifest["target"]["memory_estimate"]["weights_bytes"]
    assert estimated == _initializer_bytes(out / "model.onnx")  # every byte accounted for, the LM head included


@pytest.mark.parametrize("head", [None, 8])
def test_weight_estimate_is_the_exported_size_when_blocks_do_not_tile_the_hidden_size(tmp_path, head):
    """A tied table read through the LM head's padded codes (blocks of 128 over a hidden size of 64)."""
    test_weight_estimate_is_the_exported_size(tmp_path, "llama", True, "int4", head, None, None, block=128)


def test_estimate_grows_with_context_and_precision(tmp_path):
    spec = peek_spec(_config_only(tmp_path / "m", LLAMA2_7B))
    target = load_target("rpi5-16gb")
    by_quant = [estimate_memory(spec, target.recipe.with_overrides(weights=q), target).total
                for q in ("int4", "int8", "fp32")]
    assert by_quant == sorted(by_quant)
    by_ctx = [estimate_memory(spec, target.recipe.with_overrides(max_context=c), target).total for c in (256, 1024)]
    assert by_ctx[0] < by_ctx[1]
    est = estimate_memory(spec, target.recipe, target)
    assert est.kv_cache == 32 * 2 * 32 * 128 * 2048 * 4  # fp32 K and V for every layer at max context
    # 6.7B parameters at ~5.2 bits: 4-bit codes + an fp32 scale and a 4-bit zero point per 32
    assert 4.2e9 < est.weights < 4.6e9


def test_a_7b_model_described_by_config_only_is_refused_before_loading(tmp_path, monkeypatch):
    model = _config_only(tmp_path / "llama2-7b", LLAMA2_7B)

    def no_loading(path):
        raise AssertionError("the fit check must run before any weights are read")

    monkeypatch.setattr("nomoat.converter.load.load_checkpoint", no_loading)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        convert(ConvertOptions(model=str(model), out=out, target="rpi4-2gb", progress=False))
    msg = str(e.value)
    assert "does not fit rpi4-2gb" in msg and "over by" in msg and "What would fit" in msg
    assert "a smaller model" in msg and "--quant int4" not in msg  # already int4
    spec = peek_spec(model)
    est = estimate_memory(spec, load_target("rpi4-2gb").recipe, load_target("rpi4-2gb"))
    assert f"over by {(est.total - est.budget) / MiB:.0f} MiB" in msg
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_the_refusal_names_a_context_and_int4_when_they_would_fit(tmp_path):
    spec = peek_spec(_config_only(tmp_path / "m", LLAMA2_7B))
    target = load_target("rpi5-8gb")
    recipe = target.recipe.with_overrides(weights="int8", max_context=4096)
    with pytest.raises(ConversionError, match=r"--quant int4 --max-context \d+") as e:
        check_fit(spec, recipe, target)
    assert "does not fit rpi5-8gb" in str(e.value)
    with pytest.raises(ConversionError, match=r"--max-context \d+ \(or --fit shrink-context\)"):
        check_fit(spec, recipe.with_overrides(weights="int4"), target)


def test_shrink_context_picks_the_largest_context_the_estimate_says_fits(tmp_path):
    spec = peek_spec(_config_only(tmp_path / "m", LLAMA2_7B))
    target = load_target("rpi5-8gb")
    recipe, est = fit_recipe(spec, target.recipe, target, "shrink-context")
    ctx = recipe.max_context
    assert 0 < ctx < 2048 and ctx % 256 == 0 and est.fits and est.max_context == ctx
    assert not estimate_memory(spec, replace(recipe, max_context=ctx + 256), target).fits
    assert recipe.adjustments and "shrink-context" in recipe.adjustments[-1] and "max_context" not in recipe.overrides
    with pytest.raises(ConversionError, match=f"--max-context {ctx} "):
        fit_recipe(spec, target.recipe, target, "strict")


def test_shrink_context_leaves_a_recipe_that_fits_alone(tmp_path):
    spec = peek_spec(_config_only(tmp_path / "m", LLAMA2_7B))
    target = load_target("rpi5-16gb")
    recipe = target.recipe.with_overrides(max_context=1000)  # fits, and is no multiple of 256
    assert fit_recipe(spec, recipe, target, "shrink-context")[0] == recipe


def _tight_target(spec, ctx: int):
    """A made-up device whose budget holds the model at `ctx` tokens but not at ctx + 256."""
    base = load_target("rpi5-8gb")
    recipe = base.recipe.with_overrides(max_context=ctx)
    need = estimate_memory(spec, recipe, base).total + 1024
    return replace(base, name="tiny-ram", ram_gb=need / (base.app_memory_share * 2**30))


def test_shrink_context_end_to_end_on_a_tiny_ram_device(tiny_dir, tmp_path, monkeypatch):
    target = _tight_target(load_checkpoint(tiny_dir).spec, 1024)
    monkeypatch.setattr(targets_module, "load_target", lambda name: target)
    with pytest.raises(ConversionError, match=r"does not fit tiny-ram.*--max-context 1024"):
        convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / "strict", progress=False, skip_verify=True))
    out = convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", fit="shrink-context", progress=False,
                                 skip_verify=True))
    m = json.loads((out / "manifest.json").read_text())
    assert m["max_context"] == 1024
    est = m["target"]["memory_estimate"]
    assert est["max_context"] == 1024 and est["total_bytes"] <= est["budget_bytes"]
    assert any("shrink-context" in note for note in m["target"]["recipe"]["adjustments"])
    report = json.loads((out / "report.json").read_text())
    assert report["memory_estimate"] == est


def test_nothing_fits_gives_zero_and_no_context_hint(tmp_path):
    spec = peek_spec(_config_only(tmp_path / "m", LLAMA2_7B))
    target = load_target("rpi4-2gb")
    assert largest_fitting_context(spec, target.recipe, target) == 0
    with pytest.raises(ConversionError) as e:
        check_fit(spec, target.recipe, target)
    assert "--max-context" not in str(e.value)


def test_context_is_clamped_to_what_the_model_was_trained_for(tiny_dir):
    spec = load_checkpoint(tiny_dir).spec
    target = load_target("pixel8")  # recipe: 4096
    recipe, _ = fit_recipe(replace(spec, max_position_embeddings=512), target.recipe, target, "strict")
    assert recipe.max_context == 512 and "trained for 512 positions" in recipe.adjustments[0]


@pytest.mark.parametrize("layout", ["hf", "gguf", "meta", "meta-2-shards"])
def test_peek_reads_the_same_spec_as_the_loader(tiny_dir, tmp_path, layout):
    if layout == "hf":
        path = tiny_dir
    elif layout == "gguf":
        path = write_gguf_from_hf(tiny_dir, tmp_path / "tiny.gguf")
    else:
        path = write_meta_from_hf(tiny_dir, tmp_path / "meta", shards=2 if layout.endswith("shards") else 1)
    assert peek_spec(path) == load_checkpoint(path).spec


def test_peek_gives_up_quietly_on_what_it_cannot_read(tmp_path):
    assert peek_spec(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert peek_spec(tmp_path / "empty") is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert peek_spec(bad) is None


def test_unsupported_architecture_is_refused_by_the_early_check(tmp_path):
    model = _config_only(tmp_path / "gpt2", {**LLAMA2_7B, "model_type": "gpt2"})
    with pytest.raises(ConversionError, match="model_type 'gpt2' is not supported"):
        convert(ConvertOptions(model=str(model), out=tmp_path / "out", progress=False))


def test_recipe_rejects_what_the_runtime_cannot_run():
    with pytest.raises(ConversionError, match="KV cache dtype 'bfloat16'"):
        Recipe(kv_dtype="bfloat16")
    with pytest.raises(ConversionError, match="--threads 0"):
        Recipe().with_overrides(threads=0)
    with pytest.raises(ConversionError, match="block size 48"):
        convert_module.plan(ConvertOptions(model="x", out=Path("y"), block_size=48))


def test_resident_weights_count_only_the_embedding_rows_a_full_context_looks_up(tmp_path):
    spec = peek_spec(_config_only(tmp_path / "m", LLAMA2_7B))  # 32,000 x 4,096, untied
    target = load_target("rpi5-16gb")
    int8 = estimate_memory(spec, target.recipe.with_overrides(weights="int8", max_context=1024), target)
    # the fp32 table (512 MB) is handed back; 1,024 looked-up rows of 16 KiB bring back 4 pages each
    assert int8.weights - int8.resident_weights == 32000 * 4096 * 4 - 1024 * 4 * 4096
    assert int8.total == int8.runtime + int8.resident_weights + int8.kv_cache + int8.activations
    int4 = estimate_memory(spec, target.recipe.with_overrides(weights="int4", max_context=1024), target)
    # its own 4-bit table: codes and scales mostly handed back, the 2 MB of zero points all touched
    codes, scales, zero_points = 32000 * 4096 // 2, 32000 * 128 * 4, 32000 * 128 // 2
    assert zero_points < 1024 * 4096 < scales
    assert int4.weights - int4.resident_weights == codes + scales - 2 * 1024 * 4096
