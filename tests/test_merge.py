"""LoRA merging on tiny random LLaMA models: every adapter kind PEFT writes equals PEFT (fast).

The reference is PEFT itself: merge_and_unload() where PEFT merges faithfully, PEFT's unmerged
forward where the adapter was trained that way but PEFT's merge differs (a tied LM head) or
where PEFT has no merge for it (weighted combinations).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.errors import ConversionError
from nomoat.converter.load import load_checkpoint
from nomoat.converter.merge import AdapterRef, merge_adapters
from nomoat.converter.reference import reference_model
from nomoat.runtime import Model
from nomoat.runtime.manifest import sha256_file
from tiny_models import (
    CHATML_TEMPLATE,
    gguf_name,
    half_to_interleaved_rotary,
    make_tiny_hf_dir,
    read_config,
    write_gguf_from_hf,
)

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Merged and reference logits are both fp32 products of the same weights, summed in another order.
TOL = {"atol": 2e-5, "rtol": 1e-4}


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about tied embeddings, fan_in_fan_out, ... on purpose here
        yield


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("untied") / "hf")


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("tied") / "hf", tie=True, seed=1)


def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _adapter(base_dir: Path, out: Path, seed: int = 0, r: int = 4, targets=tuple(LINEAR), safe: bool = True,
             save_embedding_layers: bool | str = "auto", resize: int = 0, **config) -> Path:
    """A PEFT adapter with every trainable part random, as if trained (init_lora_weights=False
    randomises A and B; DoRA magnitudes and modules_to_save copies are perturbed here)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **config)
    base = _base(base_dir)
    if resize:  # tokens added before training (resize_token_embeddings), as for new chat/special tokens
        base.resize_token_embeddings(base.config.vocab_size + resize, mean_resizing=False)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in name:
                p.mul_(0.5)  # a trained-size update: visible in the logits, not swamping the base
    model.save_pretrained(out, safe_serialization=safe, save_embedding_layers=save_embedding_layers)
    return out


def _ids(vocab: int, n: int = 16, seed: int = 5) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _peft(base_dir: Path, adapter: Path, merge: bool):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(base_dir), adapter)
    return (model.merge_and_unload() if merge else model).eval()


def _ours(base_dir: Path, *refs: AdapterRef, notes: list[str] | None = None):
    ckpt = load_checkpoint(base_dir)
    reports = merge_adapters(ckpt, list(refs), notify=(notes.append if notes is not None else lambda m: None))
    return ckpt, reports


def _assert_merge_equals(base_dir: Path, adapter: Path, merge: bool = True) -> tuple:
    ckpt, reports = _ours(base_dir, AdapterRef(adapter))
    ids = _ids(ckpt.spec.vocab_size)
    expected = _logits(_peft(base_dir, adapter, merge), ids)
    ours = _logits(reference_model(ckpt), ids)
    np.testing.assert_allclose(ours, expected, **TOL)
    assert np.abs(ours - _logits(_base(base_dir).eval(), ids)).max() > 1e-2, "the adapter must change the model"
    return ckpt, reports[0]


# -- every adapter kind equals PEFT ---------------------------------------------------------

KINDS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "rank_alpha_patterns": {"rank_pattern": {"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                            "alpha_pattern": {"v_proj": 3.0, "layers.0.self_attn.o_proj": 20.0}},
    "embed_and_lm_head": {"targets": ["embed_tokens", "lm_head", "q_proj", "down_proj"]},
    "dora_embed_and_lm_head": {"targets": ["embed_tokens", "lm_head", "v_proj"], "use_dora": True},
    "modules_to_save": {"targets": ["q_proj"], "modules_to_save": ["lm_head", "embed_tokens"]},
    "adapter_model_bin": {"safe": False},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_equals_peft_merge_and_unload(untied, tmp_path, kind):
    adapter = _adapter(untied, tmp_path / kind, **KINDS[kind])
    if kind == "adapter_model_bin":
        assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    ckpt, report = _assert_merge_equals(untied, adapter)
    assert report.use_dora == ("dora" in kind) and report.use_rslora == (kind == "rslora")
    if kind == "modules_to_save":
        assert sorted(report.replaced) == ["lm_head", "model.embed_tokens"]
    if kind == "embed_and_lm_head":
        # PEFT saves the unchanged base embedding and LM head next to an embedding LoRA: not a replacement
        assert report.replaced == [] and {"model.embed_tokens", "lm_head"} <= set(report.modules)


def test_modules_to_save_saved_whole_replace_the_weights_like_peft(untied, tmp_path):
    """With the embedding layers saved whole (PEFT does it by itself after resize_token_embeddings), the
    trained copies come as `modules_to_save.weight` (no adapter name) next to `original_module.weight`."""
    from safetensors.torch import load_file

    adapter = _adapter(untied, tmp_path / "a", targets=["q_proj"], modules_to_save=["lm_head", "embed_tokens"],
                       save_embedding_layers=True)
    keys = load_file(adapter / "adapter_model.safetensors")
    assert {"base_model.model.lm_head.modules_to_save.weight", "base_model.model.lm_head.original_module.weight",
            "base_model.model.model.embed_tokens.modules_to_save.weight"} <= set(keys)
    _, report = _assert_merge_equals(untied, adapter)
    assert sorted(report.replaced) == ["lm_head", "model.embed_tokens"] and report.modules == [
        f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


@pytest.mark.parametrize("kind", [{"targets": ["q_proj"], "modules_to_save": ["lm_head", "embed_tokens"]},
                                  {"targets": ["q_proj", "lm_head"]}])
def test_adapter_trained_on_a_resized_vocabulary_is_refused_with_the_way_out(untied, tmp_path, kind):
    adapter = _adapter(untied, tmp_path / "a", resize=8, **kind)
    _assert_refused(untied, tmp_path, adapter, r"the adapter changed the vocabulary \(400 -> 408 rows of "
                    r"(lm_head|model.embed_tokens)\): merge it with PEFT together with its tokenizer "
                    r"\(merge_and_unload, save_pretrained\) and convert that folder")


def test_adapters_own_chat_template_and_base_model_are_noticed(untied, tmp_path):
    """TRL's SFTTrainer saves the tokenizer (and its chat template) next to the adapter: the bundle keeps the
    base model's template, and says so; an adapter naming another base model gets a word too."""
    adapter = _adapter(untied, tmp_path / "a", targets=["q_proj"])
    notes: list[str] = []
    _, (report,) = _ours(untied, AdapterRef(adapter), notes=notes)
    assert notes == [] and report.ignored_chat_template is None  # trained on this very folder, no tokenizer

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    _edit_config(adapter, base_model_name_or_path="SomeOrg/Another-Model-7B")
    out = _convert(untied, tmp_path / "b", [AdapterRef(adapter)])
    assert (out / "chat_template.jinja").read_text() == CHATML_TEMPLATE  # the base model's
    recorded = json.loads((out / "report.json").read_text())["adapters"][0]
    assert recorded["ignored_chat_template"] == str(adapter / "tokenizer_config.json")
    notices = recorded["notices"]
    assert any(f"{adapter / 'tokenizer_config.json'} holds a chat template of its own" in n
               and "the bundle keeps the base model's chat template" in n for n in notices)
    assert any("trained on 'SomeOrg/Another-Model-7B'" in n for n in notices)

    # The same repo under another local path, a hub cache snapshot, a GGUF named after it: no word.
    (adapter / "tokenizer_config.json").unlink()
    for named in ("/elsewhere/hf", "nomoat-test/hf", "org/HF"):
        _edit_config(adapter, base_model_name_or_path=named)
        _, (report,) = _ours(untied, AdapterRef(adapter))
        assert report.notices == [], named


@pytest.mark.parametrize("named,model,same", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", True),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct-q4_k_m.gguf", True),
    ("meta-llama/Llama-3.2-1B-Instruct", "Llama-3.2-1B-Instruct-GGUF", True),
    ("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M-Instruct", False),  # a base model's adapter on the Instruct one
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B", False),
    ("meta-llama/Llama-3.2-1B", "Llama-3.2-3B", False),
    ("meta-llama/Llama-3.2-1B-Instruct", "Llama-3.2-1B-Instruct/original", True),  # the repo's Meta weights
    ("meta-llama/Llama-3.2-1B-Instruct", "Llama-3.2-3B-Instruct/original", False),
])
def test_the_base_model_named_is_told_from_its_instruct_model(named, model, same):
    from pathlib import PurePath

    from nomoat.converter.merge import _loose_name, _model_names, _names_match

    theirs = _loose_name(PurePath(named).name)
    assert any(_names_match(theirs, ours) for ours in _model_names(Path("/models") / model)) is same


def test_tokens_the_adapters_tokenizer_adds_are_noticed(untied, tmp_path):
    """Special tokens added without resizing (spare embedding rows) and saved with the adapter's tokenizer:
    the bundle keeps the base tokenizer, which cannot encode them, and says so; the same tokenizer, no word."""
    from tokenizers import AddedToken, Tokenizer

    adapter = _adapter(untied, tmp_path / "a", targets=["q_proj"])
    tokenizer = Tokenizer.from_file(str(untied / "tokenizer.json"))
    tokenizer.save(str(adapter / "tokenizer.json"))
    notes: list[str] = []
    _ours(untied, AdapterRef(adapter), notes=notes)
    assert notes == []
    tokenizer.add_special_tokens([AddedToken("<tool_call>", special=True), AddedToken("</tool_call>", special=True)])
    tokenizer.save(str(adapter / "tokenizer.json"))
    _ours(untied, AdapterRef(adapter), notes=notes)
    assert any("has 2 token(s) the base model's tokenizer lacks ('<tool_call>', '</tool_call>')" in n
               and "nomoat merge" in n for n in notes), notes


def test_fan_in_fan_out_is_ignored_for_linear_layers_like_peft(untied, tmp_path):
    """PEFT cannot write fan_in_fan_out for LLaMA (it resets the flag for nn.Linear), so set it by hand.

    The flag transposes the *update* for GPT-2's Conv1D weights stored [in, out]; lora_A/lora_B
    keep their [r, in]/[out, r] shapes either way, so on nn.Linear nothing changes. The tiny
    model's q_proj and o_proj are square: transposing there would go unnoticed by shape checks.
    """
    adapter = _adapter(untied, tmp_path / "fifo")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    _, report = _assert_merge_equals(untied, adapter)
    assert any("fan_in_fan_out" in n for n in report.notices)


def test_adapter_saved_from_the_inner_model_without_model_prefix(untied, tmp_path):
    """PEFT applied to LlamaModel (not *ForCausalLM) names modules without the leading 'model.'."""
    import shutil

    adapter = _adapter(untied, tmp_path / "a")
    inner = Path(shutil.copytree(adapter, tmp_path / "inner"))
    _edit_tensors(inner, lambda t: {k.replace("base_model.model.model.", "base_model.model."): v for k, v in t.items()})
    ckpt, _ = _ours(untied, AdapterRef(inner))
    ids = _ids(ckpt.spec.vocab_size)
    np.testing.assert_allclose(_logits(reference_model(ckpt), ids), _logits(_peft(untied, adapter, True), ids), **TOL)


def test_an_inner_model_adapters_patterns_match_the_names_peft_matched(untied, tmp_path):
    """PEFT matched the config's regex target_modules and anchored rank/alpha patterns against the inner
    model's names ("layers.0.self_attn.q_proj"): so does the merge (it refused the regex, and merged
    layer 0 with the default alpha: 0.12 off PEFT)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"layers\.\d+\.self_attn\.(q_proj|v_proj)",
                        alpha_pattern={r"^layers\.0\.self_attn\.q_proj": 32}, init_lora_weights=False)
    model = get_peft_model(AutoModel.from_pretrained(untied, dtype=torch.float32), config)
    model.save_pretrained(tmp_path / "inner")
    ckpt, _ = _ours(untied, AdapterRef(tmp_path / "inner"))
    merged = model.merge_and_unload().state_dict()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(ckpt.tensors[f"model.{name}"], merged[name], atol=1e-6, rtol=1e-6)


# -- tied embeddings: untie on purpose, never change the embedding silently -------------------


@pytest.mark.parametrize("kind,config", [
    ("lm_head_lora", {"targets": ["lm_head", "q_proj"]}),
    ("embed_lora", {"targets": ["embed_tokens"]}),
    ("lm_head_modules_to_save", {"targets": ["q_proj"], "modules_to_save": ["lm_head"]}),
])
def test_tied_lm_head_is_untied_on_purpose(tied, tmp_path, kind, config):
    """The adapter was trained with embedding and LM head as separate modules, which PEFT's unmerged
    forward reproduces (its merge_and_unload would write the update into the shared tensor and so
    change both)."""
    adapter = _adapter(tied, tmp_path / kind, **config)
    notes: list[str] = []
    ckpt, (report,) = _ours(tied, AdapterRef(adapter), notes=notes)
    base = load_checkpoint(tied)
    assert base.spec.tie_word_embeddings and not ckpt.spec.tie_word_embeddings
    assert report.notices == notes and "untied on purpose" in notes[0]
    if kind == "embed_lora":
        assert torch.equal(ckpt.tensors["lm_head.weight"], base.tensors["model.embed_tokens.weight"])
    else:
        assert torch.equal(ckpt.tensors["model.embed_tokens.weight"], base.tensors["model.embed_tokens.weight"])
    ids = _ids(ckpt.spec.vocab_size)
    np.testing.assert_allclose(_logits(reference_model(ckpt), ids), _logits(_peft(tied, adapter, False), ids), **TOL)


def test_tied_pair_stays_tied_when_the_adapter_ties_its_updates(tied, tmp_path):
    """PEFT's ensure_weight_tying gives the LM head the embedding LoRA's transposed twin."""
    adapter = _adapter(tied, tmp_path / "ewt", targets=["embed_tokens", "lm_head"], ensure_weight_tying=True)
    ckpt, (report,) = _ours(tied, AdapterRef(adapter))
    assert ckpt.spec.tie_word_embeddings and "lm_head.weight" not in ckpt.tensors and not report.notices
    ids = _ids(ckpt.spec.vocab_size)
    np.testing.assert_allclose(_logits(reference_model(ckpt), ids), _logits(_peft(tied, adapter, False), ids), **TOL)


def test_untied_bundle_records_the_untie(tied, tmp_path):
    adapter = _adapter(tied, tmp_path / "a", targets=["lm_head"])
    bundle = _convert(tied, tmp_path / "bundle", [AdapterRef(adapter)])
    plain = _convert(tied, tmp_path / "plain")
    params = [json.loads((b / "manifest.json").read_text())["model"]["parameters"] for b in (bundle, plain)]
    report = json.loads((bundle / "report.json").read_text())
    assert params[0] - params[1] == 400 * 64  # the LM head is its own matrix now
    assert "untied on purpose" in report["adapters"][0]["notices"][0]
    model = Model.load(bundle)
    ids = _ids(model.manifest.model.vocab_size)
    np.testing.assert_allclose(model.logits(ids), _logits(_peft(tied, adapter, False), ids), atol=1e-4, rtol=1e-4)


# -- several adapters, each with its weight ------------------------------------------------


def test_two_adapters_with_weights_equal_peft_unmerged_forward(untied, tmp_path):
    from peft import PeftModel

    first = _adapter(untied, tmp_path / "a1", seed=1)
    second = _adapter(untied, tmp_path / "a2", seed=2, r=8, targets=["q_proj", "v_proj", "down_proj"])
    ckpt, reports = _ours(untied, AdapterRef(first, 1.0), AdapterRef(second, 0.5))
    assert [r.weight for r in reports] == [1.0, 0.5]

    peft_model = PeftModel.from_pretrained(_base(untied), first, adapter_name="first")
    peft_model.load_adapter(second, adapter_name="second")
    peft_model.base_model.set_adapter(["first", "second"])
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "second" in module.scaling:
            module.scaling["second"] *= 0.5  # the weight scales the second adapter's update
    ids = _ids(ckpt.spec.vocab_size)
    np.testing.assert_allclose(_logits(reference_model(ckpt), ids), _logits(peft_model.eval(), ids), **TOL)


def test_weight_scales_the_change_of_every_kind(untied, tmp_path):
    """W + w (W' - W): half a DoRA adapter lands halfway between the base and the full merge."""
    adapter = _adapter(untied, tmp_path / "dora", use_dora=True, modules_to_save=["lm_head"])
    base = load_checkpoint(untied)
    full, _ = _ours(untied, AdapterRef(adapter, 1.0))
    half, _ = _ours(untied, AdapterRef(adapter, 0.5))
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(half.tensors[name], (base.tensors[name] + full.tensors[name]) / 2)


# -- llama.cpp LoRA GGUF files -------------------------------------------------------------


def write_lora_gguf(adapter_dir: Path, base_dir: Path, out: Path, qtype: str = "F32") -> Path:
    """The PEFT adapter as llama.cpp's convert_lora_to_gguf.py writes it: lora_a/lora_b in torch
    order, q/k lora_b rows in the interleaved rotary layout, token_embd's lora_a transposed."""
    import gguf
    from safetensors.torch import load_file

    cfg, config = read_config(base_dir), json.loads((adapter_dir / "adapter_config.json").read_text())
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(adapter_dir / "adapter_model.safetensors").items():
        if ".lora_" in key:
            module, _, kind = key.removeprefix("base_model.model.").partition(".lora_")
            pairs.setdefault(module, {})[kind.removesuffix(".weight")[-1]] = t.float()
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(config["lora_alpha"]))
    for module, ab in pairs.items():
        a, b = ab["A"], ab["B"]
        proj = module.rsplit(".", 1)[-1]
        if proj in heads:
            b = half_to_interleaved_rotary(b, heads[proj])
        if proj == "embed_tokens":
            a = a.T
        name = gguf_name(f"{module}.weight")
        for suffix, t in (("lora_a", a), ("lora_b", b)):
            data = t.contiguous().numpy()
            w.add_tensor(f"{name}.{suffix}", data.astype(np.float16) if qtype == "F16" else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("base_format", ["hf", "gguf"])
def test_llamacpp_lora_gguf_equals_peft_merge(untied, tmp_path, base_format):
    adapter = _adapter(untied, tmp_path / "peft", targets=[*LINEAR, "embed_tokens", "lm_head"])
    lora = write_lora_gguf(adapter, untied, tmp_path / "lora.gguf")
    base = untied if base_format == "hf" else write_gguf_from_hf(untied, tmp_path / "base.gguf")
    ckpt, (report,) = _ours(base, AdapterRef(lora))
    assert report.format == "llama.cpp-gguf" and report.rank == 4 and report.alpha == 8
    assert report.sha256 == sha256_file(lora) and len(report.modules) == 2 * 7 + 2
    ids = _ids(ckpt.spec.vocab_size)
    np.testing.assert_allclose(_logits(reference_model(ckpt), ids), _logits(_peft(untied, adapter, True), ids),
                               **TOL)


def test_f16_lora_gguf_merges_its_f16_values(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "peft")
    f32, _ = _ours(untied, AdapterRef(write_lora_gguf(adapter, untied, tmp_path / "f32.gguf")))
    f16, _ = _ours(untied, AdapterRef(write_lora_gguf(adapter, untied, tmp_path / "f16.gguf", qtype="F16")))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(f16.tensors[name], f32.tensors[name], atol=1e-3, rtol=1e-3)


def test_a_lora_gguf_whose_alpha_is_nan_is_refused(untied, tmp_path):
    """The scale alpha / r went NaN past the check of the tensors' values."""
    adapter = _adapter(untied, tmp_path / "peft")
    _edit_config(adapter, lora_alpha=float("nan"))
    lora = write_lora_gguf(adapter, untied, tmp_path / "lora.gguf")
    _assert_refused(untied, tmp_path, lora, "adapter.lora.alpha is nan, not a finite number; the adapter file is "
                                            "damaged")


# -- reports --------------------------------------------------------------------------------


def _convert(model, out: Path, loras=(), **kw) -> Path:
    return convert(ConvertOptions(model=str(model), out=out, target="host", quant="fp32", loras=tuple(loras),
                                  max_context=64, progress=False, skip_verify=True, **kw))


def test_report_lists_every_adapter(untied, tmp_path):
    first = _adapter(untied, tmp_path / "a1", seed=1)
    second = _adapter(untied, tmp_path / "a2", seed=2, r=2, targets=["v_proj"], use_rslora=True)
    bundle = _convert(untied, tmp_path / "b", [AdapterRef(first), AdapterRef(second, 0.5)])
    report = json.loads((bundle / "report.json").read_text())["adapters"]
    assert [a["path"] for a in report] == [str(first), str(second)]
    assert [a["sha256"] for a in report] == [sha256_file(first / "adapter_model.safetensors"),
                                             sha256_file(second / "adapter_model.safetensors")]
    assert [(a["rank"], a["alpha"], a["weight"], a["use_rslora"]) for a in report] == [(4, 8, 1.0, False),
                                                                                       (2, 4, 0.5, True)]
    assert report[1]["modules"] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert report[0]["base_model"] == str(untied)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["loras"] == report


# -- bad adapters: a clear error, no bundle, no weight changed -------------------------------


def _assert_refused(model: Path, tmp_path: Path, adapter: Path, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=match):
        _convert(model, out, [AdapterRef(adapter)])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _edit_config(adapter: Path, **changes) -> None:
    f = adapter / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _edit_tensors(adapter: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    save_file(edit(load_file(f)), f)


def test_adapter_for_another_model_names_the_module_and_both_shapes(untied, tmp_path):
    other = make_tiny_hf_dir(tmp_path / "other", hidden_size=32)
    adapter = _adapter(other, tmp_path / "a")
    _assert_refused(untied, tmp_path, adapter,
                    r"model\.layers\.0\.self_attn\.q_proj has shape \(64, 64\) in the model but the adapter's update "
                    r"has shape \(32, 32\).*another model \(it names its base model '.*other'\)")


def test_adapter_for_a_deeper_model_is_refused(untied, tmp_path):
    deeper = make_tiny_hf_dir(tmp_path / "deeper", num_hidden_layers=3)
    _assert_refused(untied, tmp_path, _adapter(deeper, tmp_path / "a"), r"model\.layers\.2\..* matches no weight")


def test_wrong_rank_in_weights_vs_config(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "a")
    _edit_config(adapter, r=8)
    _assert_refused(untied, tmp_path, adapter, "rank 4 in its weights but 8 in adapter_config.json")


@pytest.mark.parametrize("changes,said", [
    ({"lora_alpha": float("nan")}, "lora_alpha is NaN, not a finite number"),
    ({"lora_alpha": "eight"}, 'lora_alpha is "eight", not a finite number'),
    ({"lora_alpha": True}, "lora_alpha is true, not a finite number"),
    ({"r": "four"}, 'r is "four", not a whole number >= 1'),
    ({"r": [4]}, r"r is \[4\], not a whole number >= 1"),
    ({"r": 0}, "r is 0, not a whole number >= 1"),
    ({"rank_pattern": [1, 2]}, r"rank_pattern is \[1, 2\], not an object"),
    ({"rank_pattern": {"q_proj": "4"}}, r'rank_pattern\["q_proj"\] is "4", not a whole number'),
    ({"alpha_pattern": {"q_proj": float("inf")}}, r'alpha_pattern\["q_proj"\] is Infinity, not a finite number'),
])
def test_a_rank_or_alpha_that_is_not_a_number_is_refused_by_key(untied, tmp_path, changes, said):
    """A hand-edited adapter_config.json: a string or list crashed int()/float(), a NaN alpha merged."""
    adapter = _adapter(untied, tmp_path / "a")
    _edit_config(adapter, **changes)
    _assert_refused(untied, tmp_path, adapter, rf"adapter_config\.json: {said}.*set it to the value the adapter was "
                                               "trained with")


def test_missing_config(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "a")
    (adapter / "adapter_config.json").unlink()
    _assert_refused(untied, tmp_path, adapter, "no adapter_config.json")


def test_an_adapter_config_nested_too_deep_is_one_line(untied, tmp_path):
    """json.loads recurses per bracket: 200,000 were a RecursionError traceback."""
    adapter = _adapter(untied, tmp_path / "a")
    (adapter / "adapter_config.json").write_text('{"r": 4, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _assert_refused(untied, tmp_path, adapter, r"adapter_config\.json is not valid JSON: maximum recursion depth")


def test_a_folder_of_named_adapters_names_them(untied, tmp_path):
    """PEFT saves an adapter not called "default" in a subfolder of its name."""
    _adapter(untied, tmp_path / "run" / "style")
    _assert_refused(untied, tmp_path, tmp_path / "run", r"holds adapters in subfolders \(style\).*--lora .*run/style")


def test_an_adapter_for_another_task_is_refused_by_name(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "a")
    _edit_config(adapter, task_type="SEQ_CLS")
    _assert_refused(untied, tmp_path, adapter, "task_type 'SEQ_CLS', with a head of its own")


def test_unknown_target_module_in_weights(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "a")
    _edit_tensors(adapter, lambda t: {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qkv_proj"): v
                                      for k, v in t.items()})
    _assert_refused(untied, tmp_path, adapter, r"'model\.layers\.1\.self_attn\.qkv_proj' matches no weight.*unknown "
                                               "target module")


def test_target_modules_of_another_architecture_are_refused(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "a")
    _edit_config(adapter, target_modules=["query_key_value", "c_attn"])
    _assert_refused(untied, tmp_path, adapter, "unknown target modules 'query_key_value', 'c_attn'.*has none of them")


def test_target_modules_listed_for_several_architectures_merge_with_a_notice(untied, tmp_path):
    """One list for many architectures, as training scripts pass it: PEFT trains the modules that exist."""
    adapter = _adapter(untied, tmp_path / "a", targets=("q_proj", "v_proj"))
    _edit_config(adapter, target_modules=["q_proj", "v_proj", "query_key_value", "c_attn"])
    notes: list[str] = []
    _ours(untied, AdapterRef(adapter), notes=notes)
    assert any("'query_key_value', 'c_attn'" in n and "does not have" in n for n in notes), notes
    _assert_merge_equals(untied, adapter)  # PEFT loads and merges it the same


def test_key_matching_nothing_is_an_error_not_a_skip(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "a")
    _edit_tensors(adapter, lambda t: {**t, "base_model.model.model.rotary_emb.scale": torch.ones(4)})
    _assert_refused(untied, tmp_path, adapter, "'base_model.model.model.rotary_emb.scale' matches no weight")


def test_nan_in_weights(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "a")

    def poison(t):
        key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
        t[key][3, 1] = float("nan")
        return t

    _edit_tensors(adapter, poison)
    _assert_refused(untied, tmp_path, adapter, r"model\.layers\.1\.mlp\.up_proj holds NaN")


def test_dora_without_magnitude_is_refused(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "a")
    _edit_config(adapter, use_dora=True)
    _assert_refused(untied, tmp_path, adapter, "lacks a DoRA magnitude vector but adapter_config.json says "
                                               "use_dora=true")


@pytest.mark.parametrize("option,value", [("alora_invocation_tokens", [1, 2]), ("init_lora_weights", "pissa"),
                                          ("init_lora_weights", "OLoRA"),  # PEFT reads it in any case
                                          ("layer_replication", [[0, 2]])])
def test_unmergeable_adapters_are_refused(untied, tmp_path, option, value):
    adapter = _adapter(untied, tmp_path / "a")
    _edit_config(adapter, **{option: value})
    _assert_refused(untied, tmp_path, adapter, "cannot merge|rewrites the base weights")


def test_a_loftq_adapter_is_sent_to_the_base_it_was_trained_on(untied, tmp_path):
    adapter = _adapter(untied, tmp_path / "a")
    _edit_config(adapter, init_lora_weights="loftq")
    _assert_refused(untied, tmp_path, adapter, "LoftQ-quantized base.*init_lora_weights to true")


def test_lora_gguf_for_another_architecture_or_a_model_gguf(untied, tmp_path):
    import gguf

    lora = write_lora_gguf(_adapter(untied, tmp_path / "peft"), untied, tmp_path / "lora.gguf")
    reader = gguf.GGUFReader(lora)
    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_refused(untied, tmp_path, tmp_path / "qwen.gguf", "LoRA for a 'qwen2' model, but this model is 'llama'")
    _assert_refused(untied, tmp_path, write_gguf_from_hf(untied, tmp_path / "model.gguf"), "not a LoRA adapter")


def test_a_bad_second_adapter_changes_no_weight(untied, tmp_path):
    good, bad = _adapter(untied, tmp_path / "good"), _adapter(untied, tmp_path / "bad")
    _edit_config(bad, r=2)
    ckpt = load_checkpoint(untied)
    before = {k: v.clone() for k, v in ckpt.tensors.items()}
    with pytest.raises(ConversionError, match="rank"):
        merge_adapters(ckpt, [AdapterRef(good), AdapterRef(bad)])
    assert all(torch.equal(before[k], ckpt.tensors[k]) for k in before)


# -- --lora PATH[:WEIGHT] --------------------------------------------------------------------


def test_adapter_ref_parse(tmp_path):
    assert AdapterRef.parse("a/b") == AdapterRef(Path("a/b"), 1.0)
    assert AdapterRef.parse("a/b:0.5") == AdapterRef(Path("a/b"), 0.5)
    assert AdapterRef.parse("a/b:-1") == AdapterRef(Path("a/b"), -1.0)
    odd = tmp_path / "run:2"
    odd.mkdir()
    assert AdapterRef.parse(str(odd)) == AdapterRef(odd, 1.0)  # an existing path wins over a weight
    with pytest.raises(ConversionError, match="not a finite number"):
        AdapterRef.parse("a/b:nan")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(ConversionError, match=r"the weight 'abc' is not a number \(PATH:WEIGHT"):
        AdapterRef.parse(f"{adapter}:abc")  # an adapter that exists, then no weight: not "does not exist"
    assert AdapterRef.parse("missing:abc") == AdapterRef(Path("missing:abc"), 1.0)  # named as missing later


# -- nomoat merge: the merged model as a Hugging Face folder ----------------------------------


def _nomoat(*args: str) -> int:
    from nomoat.__main__ import main

    return main(list(args))


def test_merge_verb_writes_a_folder_transformers_loads(untied, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _adapter(untied, tmp_path / "a", use_dora=True, targets=[*LINEAR, "lm_head"])
    out = tmp_path / "merged"
    assert _nomoat("merge", "--model", str(untied), "--lora", f"{adapter}:1", "--out", str(out), "--quiet") == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                "tokenizer_config.json", "generation_config.json", "nomoat_merge.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    ids = _ids(400)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_logits(merged, ids), _logits(_peft(untied, adapter, True), ids), **TOL)
    tokenizer = AutoTokenizer.from_pretrained(out)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    record = json.loads((out / "nomoat_merge.json").read_text())
    assert record["adapters"][0]["sha256"] == sha256_file(adapter / "adapter_model.safetensors")


def test_converting_the_merged_folder_equals_converting_with_lora(tied, tmp_path):
    """Same weights, tokenizer, stop tokens and sampling defaults either way; tied model, untied by the adapter."""
    from nomoat.converter.cli_merge import merge_to_hf_dir

    adapter = _adapter(tied, tmp_path / "a", targets=["lm_head", "q_proj"])
    merged = merge_to_hf_dir(tied, [AdapterRef(adapter, 0.5)], tmp_path / "merged", progress=False)
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    via_folder = _convert(merged, tmp_path / "b1")
    via_lora = _convert(tied, tmp_path / "b2", [AdapterRef(adapter, 0.5)])
    a, b = Model.load(via_folder), Model.load(via_lora)
    ids = _ids(a.manifest.model.vocab_size)
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (via_folder, via_lora))
    for key in ("model", "tokenizer", "stop_token_ids", "generation_defaults"):
        assert ma[key] == mb[key], key
    assert (via_folder / "tokenizer.json").read_text() == (via_lora / "tokenizer.json").read_text()
    assert (via_folder / "chat_template.jinja").read_text() == (via_lora / "chat_template.jinja").read_text()


def test_merge_writes_shards_and_replaces_only_with_force(untied, tmp_path):
    from nomoat.converter.cli_merge import merge_to_hf_dir
    from transformers import AutoModelForCausalLM

    adapter = _adapter(untied, tmp_path / "a")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert _nomoat("merge", "--model", str(untied), "--lora", str(adapter), "--out", str(out), "--quiet") == 1
    assert (out / "keep.txt").read_text() == "user data"
    # --force replaces an earlier merge, not a folder of other files, nor the model or an adapter.
    with pytest.raises(ConversionError, match="replaces only an earlier merge's folder"):
        merge_to_hf_dir(untied, [AdapterRef(adapter)], out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    for target, flag in ((untied, "--model"), (adapter, "--lora"), (untied / "sub", "--model")):
        with pytest.raises(ConversionError, match=f"is(?: inside)? {flag}"):
            merge_to_hf_dir(untied, [AdapterRef(adapter)], target, force=True, progress=False)
    assert (untied / "config.json").is_file() and any(adapter.iterdir())
    (out / "keep.txt").unlink()
    merge_to_hf_dir(untied, [AdapterRef(adapter)], out, force=True, progress=False)  # an empty folder
    merge_to_hf_dir(untied, [AdapterRef(adapter)], out, force=True, max_shard_bytes=60_000, progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    ids = _ids(400)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_logits(hf, ids), _logits(_peft(untied, adapter, True), ids), **TOL)
    written, (in_memory, _) = load_checkpoint(out).tensors, _ours(untied, AdapterRef(adapter))
    assert written.keys() == in_memory.tensors.keys()
    assert all(torch.equal(written[k], in_memory.tensors[k]) for k in written)


@pytest.mark.parametrize("layout", ["tokenizer_config list", "additional_chat_templates"])
def test_merge_keeps_the_sources_tokenizer_settings_and_named_chat_templates(untied, tmp_path, layout):
    """tokenizer_config.json was rebuilt from nomoat's keys alone: padding_side "left" came back "right" (batched
    generate pads the wrong side) and a tool_use template beside the default was dropped (tools silently unused)."""
    from nomoat.converter.cli_merge import merge_to_hf_dir
    from transformers import AutoTokenizer

    source = Path(shutil.copytree(untied, tmp_path / "source"))
    config = json.loads((source / "tokenizer_config.json").read_text())
    default = config["chat_template"]
    tool_use = "{% if tools %}<|im_start|>system\nTOOLS: {{ tools | tojson }}<|im_end|>\n{% endif %}" + default
    config |= {"padding_side": "left", "model_max_length": 131072,
               "chat_template": [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]}
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    if layout == "additional_chat_templates":  # transformers 5 saves them as files
        AutoTokenizer.from_pretrained(source).save_pretrained(source)
        assert (source / "additional_chat_templates" / "tool_use.jinja").is_file()
    merged = merge_to_hf_dir(source, [], tmp_path / "merged", progress=False)

    messages = [{"role": "user", "content": "weather?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    theirs, ours = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(merged)
    assert "TOOLS: " in ours.apply_chat_template(messages, tools=tools, tokenize=False)
    for tokenizer in (theirs, ours):
        assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == \
            theirs.apply_chat_template(messages, tools=tools, tokenize=False)
        assert tokenizer.apply_chat_template(messages, tokenize=False) == \
            theirs.apply_chat_template(messages, tokenize=False)
    assert (ours.padding_side, ours.model_max_length) == ("left", 131072)
    assert load_checkpoint(merged).tokenizer.chat_template == load_checkpoint(source).tokenizer.chat_template


def test_merge_copies_only_named_templates_and_follows_no_link(untied, tmp_path):
    """A downloaded folder whose additional_chat_templates linked to ~/.ssh had it copied, keys and all,
    into the merged folder (which users publish)."""
    from nomoat.converter.cli_merge import merge_to_hf_dir

    secrets = tmp_path / "ssh"
    secrets.mkdir()
    (secrets / "id_ed25519").write_text("PRIVATE KEY")
    (secrets / "evil.jinja").write_text("{{ 'a linked file' }}")
    linked = Path(shutil.copytree(untied, tmp_path / "linked"))
    (linked / "additional_chat_templates").symlink_to(secrets)
    merged = merge_to_hf_dir(linked, [], tmp_path / "m1", progress=False)
    assert not (merged / "additional_chat_templates").exists()

    mixed = Path(shutil.copytree(untied, tmp_path / "mixed"))
    (mixed / "additional_chat_templates").mkdir()
    (mixed / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'tools' }}")
    (mixed / "additional_chat_templates" / "notes.txt").write_text("not a template")
    (mixed / "additional_chat_templates" / "key.jinja").symlink_to(secrets / "id_ed25519")
    merged = merge_to_hf_dir(mixed, [], tmp_path / "m2", progress=False)
    assert sorted(p.name for p in (merged / "additional_chat_templates").iterdir()) == ["tool_use.jinja"]
    texts = [p.read_text() for p in merged.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert not any("PRIVATE KEY" in text for text in texts)


@pytest.mark.parametrize("said, fix", [
    ("No space left on device (os error 28)", "free at least 1 MB on that disk (the merged fp32 weights)"),
    ("File too large (os error 27)", "the file system there takes no file this large: pass a smaller --max-shard-size"),
])
def test_a_write_that_fails_is_one_line_and_leaves_nothing(untied, tmp_path, capsys, monkeypatch, said, fix):
    """safetensors' own error is not an OSError: a full disk ended `nomoat merge` in a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: I/O error: {said}")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "merged"
    assert _nomoat("merge", "--model", str(untied), "--out", str(out), "--quiet") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nomoat merge: error: Error while serializing: I/O error: {said} (writing beside {out}); "
                          f"{fix}") and err.endswith(". Nothing was written.\n"), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_merge_with_a_bad_adapter_writes_nothing(untied, tmp_path, capsys):
    adapter = _adapter(untied, tmp_path / "a")
    _edit_config(adapter, r=16)
    out = tmp_path / "merged"
    assert _nomoat("merge", "--model", str(untied), "--lora", str(adapter), "--out", str(out), "--quiet") == 1
    err = capsys.readouterr().err
    assert "nomoat merge: error:" in err and "rank 4 in its weights but 16" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_a_merge_stopped_by_sigterm_leaves_nothing_and_says_so(untied, tmp_path, monkeypatch, capsys):
    import signal

    from nomoat.converter import cli_merge
    from nomoat.converter.bundle import Interrupted

    def killed_mid_write(ckpt, folder, max_shard_bytes):
        (folder / "model.safetensors").write_bytes(b"half")
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cli_merge, "write_hf_dir", killed_mid_write)
    assert _nomoat("merge", "--model", str(untied), "--out", str(tmp_path / "merged"), "--quiet") == 143
    assert capsys.readouterr().err.strip() == "nomoat merge: stopped by SIGTERM; nothing was written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged") or p.name == "merged"]


@pytest.mark.parametrize(("defaults", "reloaded"), [
    # a GGUF's general.sampling.* (no top_k): transformers' default top_k 50 must not creep in
    ({"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7, "top_k": 0, "top_p": 0.9}),
    # greedy with a penalty: do_sample false, the penalty kept
    ({"temperature": 0.0, "repetition_penalty": 1.1}, {"temperature": 0.0, "repetition_penalty": 1.1}),
    # ... and llama.cpp's window of it (general.sampling.penalty_last_n), which transformers lacks
    ({"temperature": 0.0, "repetition_penalty": 1.1, "repeat_last_n": 64},
     {"temperature": 0.0, "repetition_penalty": 1.1, "repeat_last_n": 64}),
    ({"temperature": 0.7, "repeat_last_n": 32}, {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "repeat_last_n": 32}),
    ({}, {"temperature": 0.0}),
])
def test_the_merged_folder_samples_as_its_source_did(untied, tmp_path, defaults, reloaded):
    import dataclasses

    from nomoat.converter.cli_merge import write_hf_dir
    from nomoat.converter.load_hf import read_generation_defaults

    ckpt = dataclasses.replace(load_checkpoint(untied), generation_defaults=defaults)
    write_hf_dir(ckpt, tmp_path)
    assert read_generation_defaults(tmp_path) == reloaded


@pytest.mark.parametrize("add_bos", [True, False])
def test_a_merged_gguf_sentencepiece_model_gets_its_bos_in_transformers(untied, tmp_path, add_bos):
    """transformers ignores tokenizer_config's add_bos_token for PreTrainedTokenizerFast: the BOS a
    Llama-2-style GGUF asks for must come from tokenizer.json's post-processor, and nomoat's own
    reading of the folder must not add a second one."""
    import dataclasses

    from nomoat.converter.cli_merge import write_hf_dir
    from nomoat.converter.load_gguf import tokenizer_from_gguf
    from nomoat.converter.load_hf import read_hf_tokenizer
    from tiny_models import sentencepiece_gguf_metadata
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    meta = sentencepiece_gguf_metadata() | {"tokenizer.ggml.add_bos_token": add_bos}
    tok = tokenizer_from_gguf(meta, "llama")
    write_hf_dir(dataclasses.replace(load_checkpoint(untied), tokenizer=tok), tmp_path)
    plain = Tokenizer.from_str(tok.tokenizer_json).encode("hello there", add_special_tokens=False).ids
    assert AutoTokenizer.from_pretrained(tmp_path)("hello there").input_ids == ([1] if add_bos else []) + plain
    reread = read_hf_tokenizer(tmp_path)
    assert (reread.add_bos_token, reread.bos_token_id) == (add_bos, 1)
    assert Tokenizer.from_str(reread.tokenizer_json).encode("hello there", add_special_tokens=False).ids == plain


@pytest.mark.parametrize(("text", "size"), [("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("2GiB", 2 * 2**30),
                                            ("1.5 mib", int(1.5 * 2**20)), ("50KB", 50_000), ("0", 1)])
def test_max_shard_size_takes_transformers_units(text, size):
    from nomoat.converter.cli_merge import parse_size

    assert parse_size(text) == size


def test_a_max_shard_size_that_is_not_a_size_is_refused():
    from nomoat.converter.cli_merge import parse_size

    with pytest.raises(ConversionError, match="is not a size like 500MB, 2GB or 2GiB"):
        parse_size("2 gigs")
