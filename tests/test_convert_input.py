"""Input the converter must refuse in one line, or take as the user meant it: a tokenizer of another model,
a damaged config, a symlinked or `~` --out, a bad --lora weight or --eval-text, a GGUF without its suffix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from nomoat.__main__ import main
from nomoat.converter import convert as convert_module
from nomoat.converter.bundle import check_destination, move_into_place
from nomoat.converter.cli_merge import merge_to_hf_dir
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.errors import ConversionError
from nomoat.converter.load import load_checkpoint
from nomoat.converter.merge import AdapterRef
from nomoat.converter.peek import peek_spec
from nomoat.converter.verify import check_eval_text, default_eval_text, read_eval_text
from nomoat.runtime.manifest import MANIFEST_NAME
from tiny_models import make_tiny_hf_dir, write_gguf_from_hf, write_meta_from_hf

TOKENIZER_TOKENS = 400  # tiny_models' BPE tokenizer


def _convert(model, out: Path, **kw) -> Path:
    return convert(ConvertOptions(model=str(model), out=out, target="host", quant=kw.pop("quant", "fp32"),
                                  max_context=64, progress=False, skip_verify=kw.pop("skip_verify", True), **kw))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def small_embedding_dir(tmp_path_factory) -> Path:
    """A model with 300 embedding rows next to the 400-token tokenizer of another model."""
    return make_tiny_hf_dir(tmp_path_factory.mktemp("v300") / "hf", vocab_size=300)


def _copy(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / model.name))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- 1. a tokenizer with more tokens than the model's embedding rows ----------------------------------------

TOO_MANY_TOKENS = (f"tokenizer.json has {TOKENIZER_TOKENS} tokens but the model's embedding has 300 rows; "
                   "the tokenizer belongs to another model")


def test_a_tokenizer_of_another_model_is_refused_at_load(small_embedding_dir, tmp_path):
    with pytest.raises(ConversionError, match=TOO_MANY_TOKENS):
        load_checkpoint(small_embedding_dir)
    meta = write_meta_from_hf(small_embedding_dir, tmp_path / "meta")
    with pytest.raises(ConversionError, match=TOO_MANY_TOKENS):
        load_checkpoint(meta)


def test_a_gguf_whose_vocabulary_outgrows_its_embedding_is_refused(small_embedding_dir, tmp_path):
    gguf = write_gguf_from_hf(small_embedding_dir, tmp_path / "m.gguf")
    with pytest.raises(ConversionError, match=f"tokenizer.ggml.tokens.* has {TOKENIZER_TOKENS} tokens but the "
                                              "model's embedding has 300 rows"):
        load_checkpoint(gguf)


def test_no_bundle_is_written_for_a_tokenizer_of_another_model(small_embedding_dir, tmp_path):
    """rtn with --skip-verify wrote a bundle that answered with garbage: nothing stopped it."""
    out = tmp_path / "b"
    with pytest.raises(ConversionError, match=TOO_MANY_TOKENS):
        _convert(small_embedding_dir, out, quant="int4", algorithm="rtn")
    assert not out.exists()


def test_an_embedding_padded_beyond_the_tokenizer_is_fine(tmp_path):
    """Fewer tokens than rows is how models pad their embedding (Qwen2: 151,936 rows, 151,665 tokens)."""
    padded = make_tiny_hf_dir(tmp_path / "padded", vocab_size=448)
    assert load_checkpoint(padded).spec.vocab_size == 448


@pytest.mark.parametrize(("file", "key"), [("config.json", "bos_token_id"),
                                           ("generation_config.json", "eos_token_id")])
def test_a_bos_or_eos_id_past_the_vocabulary_is_refused(tiny_dir, tmp_path, file, key):
    model = _copy(tiny_dir, tmp_path)
    _edit_json(model / file, lambda d: d.update({key: TOKENIZER_TOKENS + 5}))
    with pytest.raises(ConversionError, match=f"{key} {TOKENIZER_TOKENS + 5} lies past the model's vocabulary "
                                              f"of {TOKENIZER_TOKENS} tokens"):
        load_checkpoint(model)


# -- 2. --force onto an --out that is a symbolic link ------------------------------------------------------

def test_force_onto_a_symlinked_out_replaces_the_bundle_it_points_to(tiny_dir, tmp_path):
    v1 = _convert(tiny_dir, tmp_path / "v1")
    (tmp_path / "current").symlink_to("v1")
    for _ in range(2):  # the second --force failed after the whole conversion
        (v1 / "marker").write_text("the old bundle")  # --force replaces the folder whole: it goes with it
        assert _convert(tiny_dir, tmp_path / "current", force=True) == v1
        assert (tmp_path / "current").is_symlink() and (tmp_path / "current").resolve() == v1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]  # no .current.old left behind
        assert not (v1 / "marker").exists() and (v1 / MANIFEST_NAME).is_file()  # a new bundle
    with pytest.raises(ConversionError, match="already exists"):
        _convert(tiny_dir, tmp_path / "current")


def test_a_symlinked_out_to_a_folder_of_other_files_is_not_replaced(tiny_dir, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "docs")
    with pytest.raises(ConversionError, match="replaces only a bundle or an empty folder"):
        _convert(tiny_dir, tmp_path / "link", force=True)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("leftover", ["symlink", "file"])
def test_a_stale_old_entry_that_is_no_folder_is_removed_not_followed(tmp_path, leftover):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("keep me")
    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("{}")
    staging.mkdir()
    (staging / MANIFEST_NAME).write_text('{"new": true}')
    trash = tmp_path / ".out.old"
    if leftover == "symlink":
        trash.symlink_to(keep)
    else:
        trash.write_text("left by a killed replacement")
    move_into_place(staging, out, force=True)
    assert (out / MANIFEST_NAME).read_text() == '{"new": true}'
    assert not trash.exists() and not trash.is_symlink()
    assert (keep / "precious.txt").read_text() == "keep me"


# -- 3. ~ in every path argument ---------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def test_tilde_is_expanded_in_out(tiny_dir, home, tmp_path):
    assert check_destination(Path("~/b"), force=False) == home / "b"
    assert _convert(tiny_dir, Path("~/bundle")) == home / "bundle"
    merge_to_hf_dir(tiny_dir, [], Path("~/merged"), progress=False)
    assert (home / "bundle" / MANIFEST_NAME).is_file() and (home / "merged" / "config.json").is_file()
    assert not (tmp_path / "~").exists()


def test_tilde_is_expanded_in_lora_and_eval_text(home):
    (home / "adapter").mkdir()
    (home / "eval.txt").write_text(default_eval_text())
    assert AdapterRef.parse("~/adapter:0.5") == AdapterRef(home / "adapter", 0.5)
    assert AdapterRef.parse("~/adapter").path == home / "adapter"
    assert AdapterRef(Path("~/adapter")).path == home / "adapter"
    text, source = read_eval_text(Path("~/eval.txt"))
    assert text == default_eval_text() and source == str(home / "eval.txt")


# -- 4. a damaged config.json or params.json ---------------------------------------------------------------

@pytest.mark.parametrize(("edit", "key"), [
    pytest.param(lambda c: c.pop("num_attention_heads"), "num_attention_heads", id="missing"),
    pytest.param(lambda c: c.update(vocab_size=None), "vocab_size", id="null"),
    pytest.param(lambda c: c.update(hidden_size="wide"), "hidden_size", id="a word"),
    pytest.param(lambda c: c.update(num_attention_heads=0), "num_attention_heads", id="zero heads"),
    pytest.param(lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                 "rope_scaling.low_freq_factor", id="llama3 rope without its factors"),
    pytest.param(lambda c: c.update(rope_scaling="llama3"), "rope_scaling", id="rope_scaling no object"),
    # a rope base of 0, below 0 or NaN ran the whole conversion into a NaN rotary table ("a bug in nomoat")
    pytest.param(lambda c: c.update(rope_theta=-10000.0), "rope_theta", id="negative rope_theta"),
    pytest.param(lambda c: c.update(rope_theta=float("nan")), "rope_theta", id="NaN rope_theta"),
    pytest.param(lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 0}),
                 "rope_parameters.rope_theta", id="rope_parameters' rope_theta 0"),
])
def test_a_damaged_config_json_names_the_file_and_key(tiny_dir, tmp_path, edit, key):
    model = _copy(tiny_dir, tmp_path)
    _edit_json(model / "config.json", edit)
    message = f"{model / 'config.json'} lacks or has an invalid {key}\\b"
    with pytest.raises(ConversionError, match=message):
        peek_spec(model)  # what `nomoat convert` reads first
    with pytest.raises(ConversionError, match=message):
        load_checkpoint(model)  # what `nomoat merge` reads


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json"])
def test_a_json_file_nested_too_deep_is_one_line_as_malformed_json_is(tiny_dir, tmp_path, name):
    """json.loads recurses per bracket: 200,000 were a RecursionError traceback."""
    model = _copy(tiny_dir, tmp_path)
    (model / name).write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    message = rf"{model / name} is not valid JSON \(maximum recursion depth exceeded.*\); download or fix it"
    with pytest.raises(ConversionError, match=message):
        _convert(model, tmp_path / "b")
    with pytest.raises(ConversionError, match=message):
        load_checkpoint(model)


def test_a_config_json_that_is_not_utf8_is_one_line_in_convert(tiny_dir, tmp_path):
    """The fit pre-check caught only JSONDecodeError: a UnicodeDecodeError was a traceback."""
    model = _copy(tiny_dir, tmp_path)
    (model / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    with pytest.raises(ConversionError, match=r"config\.json is not valid JSON \('utf-8' codec can't decode"):
        _convert(model, tmp_path / "b")


@pytest.mark.parametrize(("edit", "message"), [
    pytest.param(lambda p: p.pop("n_heads"), "params.json lacks n_heads; it is not a Llama params.json",
                 id="missing"),
    pytest.param(lambda p: p.update(n_layers=None), "params.json lacks or has an invalid n_layers", id="null"),
    pytest.param(lambda p: p.update(norm_eps="small"), "params.json lacks or has an invalid norm_eps", id="a word"),
    pytest.param(lambda p: p.update(rope_theta=0), "params.json lacks or has an invalid rope_theta", id="rope 0"),
])
def test_a_damaged_params_json_is_one_line_in_convert_as_in_merge(tiny_dir, tmp_path, edit, message):
    meta = write_meta_from_hf(tiny_dir, tmp_path / "meta")
    _edit_json(meta / "params.json", edit)
    with pytest.raises(ConversionError, match=message):
        _convert(meta, tmp_path / "b")
    with pytest.raises(ConversionError, match=message):
        merge_to_hf_dir(meta, [], tmp_path / "m", progress=False)


# -- 5. a bad --lora weight on the command line ------------------------------------------------------------

@pytest.mark.parametrize("verb", ["convert", "merge"])
def test_a_lora_weight_that_is_no_number_is_one_line(tiny_dir, tmp_path, capsys, verb):
    code = main([verb, "--model", str(tiny_dir), "--lora", f"{tiny_dir}:nan", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and f"nomoat {verb}: error: --lora {tiny_dir}:nan: the weight 'nan'" in err


# -- 6. an --eval-text too short for the quality check -----------------------------------------------------

@pytest.mark.parametrize("content", ["", " \n\t\n"])
def test_an_empty_eval_text_is_refused_when_read(tmp_path, content):
    (tmp_path / "empty.txt").write_text(content)
    with pytest.raises(ConversionError, match="--eval-text .*empty.txt is empty"):
        read_eval_text(tmp_path / "empty.txt")


def test_a_short_eval_text_is_refused_right_after_the_load(tiny_dir, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("calibrate and export ran before the evaluation text was counted")

    monkeypatch.setattr(convert_module, "_build", no_build)
    (tmp_path / "short.txt").write_text("Hello there.")
    with pytest.raises(ConversionError, match=r"--eval-text .*short.txt is only \d+ tokens for this model's "
                                              "tokenizer, and the quality check needs at least 16"):
        _convert(tiny_dir, tmp_path / "b", skip_verify=False, eval_text=tmp_path / "short.txt")
    assert not (tmp_path / "b").exists()


def test_the_default_eval_text_is_long_enough(tiny_dir):
    check_eval_text((default_eval_text(), "default"), load_checkpoint(tiny_dir).tokenizer)


# -- 7. a GGUF whose name does not end in .gguf ------------------------------------------------------------

def test_a_gguf_without_its_suffix_is_read_by_its_magic(tiny_dir, tmp_path):
    blob = write_gguf_from_hf(tiny_dir, tmp_path / "sha256-6a0746a1ec1a")  # as Ollama names its blobs
    assert blob.read_bytes()[:4] == b"GGUF"
    spec = load_checkpoint(blob).spec
    assert peek_spec(blob) == spec
    assert (_convert(blob, tmp_path / "b") / MANIFEST_NAME).is_file()


def test_a_file_that_is_no_gguf_is_still_not_a_model(tmp_path):
    (tmp_path / "notes").write_text("GGU, almost")
    with pytest.raises(ConversionError, match="is not a model file nomoat reads"):
        load_checkpoint(tmp_path / "notes")
    assert peek_spec(tmp_path / "notes") is None


# -- a model's sampling defaults -----------------------------------------------------------------------

@pytest.mark.parametrize(("given", "kept"), [
    ({"do_sample": True, "top_k": -1}, {"temperature": 1.0, "top_k": 0, "top_p": 1.0}),  # vLLM's "off"
    ({"do_sample": True, "top_k": 0, "top_p": 0.9}, {"temperature": 1.0, "top_k": 0, "top_p": 0.9}),
])
def test_a_top_k_below_zero_is_off(tmp_path, given, kept):
    from nomoat.converter.load_hf import read_generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps(given))
    assert read_generation_defaults(tmp_path) == kept


@pytest.mark.parametrize("given", [{"do_sample": True, "top_p": 1.5}, {"do_sample": True, "temperature": -1},
                                   {"repetition_penalty": 0}, {"repeat_last_n": -7}])
def test_a_sampling_default_the_runtime_would_refuse_is_refused_at_load_naming_the_file(tmp_path, given):
    from nomoat.converter.load_hf import read_generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps(given))
    with pytest.raises(ConversionError, match=r"generation_config.json holds a sampling setting nomoat cannot use"):
        read_generation_defaults(tmp_path)


def test_a_model_with_vllms_top_k_converts_and_its_bundle_loads(tiny_dir, tmp_path):
    from nomoat.runtime import Model

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": -1, "temperature": 0.7}))
    out = _convert(model, tmp_path / "b")
    assert Model.load(out).sampling_params().top_k == 0


# -- GGUF linear rope scaling without a scaling type ----------------------------------------------------------

def _gguf_with_keys(hf_dir: Path, path: Path, monkeypatch, keys: dict) -> Path:
    """write_gguf_from_hf's file with extra float32 metadata keys (written right after general.name)."""
    import gguf

    add_name = gguf.GGUFWriter.add_name

    def with_keys(self, name):
        add_name(self, name)
        for key, value in keys.items():
            self.add_float32(key, value)

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_name", with_keys)
        return write_gguf_from_hf(hf_dir, path)


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_a_gguf_rope_factor_without_a_type_is_linear_scaling_and_refused(tiny_dir, tmp_path, monkeypatch, key):
    """llama.cpp reads a missing rope.scaling.type as 'linear': the factor alone scales every position."""
    gguf_file = _gguf_with_keys(tiny_dir, tmp_path / "m.gguf", monkeypatch, {key: 4.0})
    refusal = r"GGUF rope scaling 'linear' \(factor 4\) is not supported"
    with pytest.raises(ConversionError, match=refusal):
        load_checkpoint(gguf_file)
    with pytest.raises(ConversionError, match=refusal):
        peek_spec(gguf_file)  # the fit pre-check says the same, before any weight is read


@pytest.mark.parametrize(("method", "value", "said"), [
    ("add_head_count", 0, "llama.attention.head_count is 0"),  # a ZeroDivisionError traceback
    ("add_head_count_kv", 0, "llama.attention.head_count_kv is 0"),
    ("add_rope_freq_base", 0.0, "llama.rope.freq_base is 0.0"),  # ran the conversion into a NaN rotary table
    ("add_rope_freq_base", float("nan"), "llama.rope.freq_base is nan"),
])
def test_a_gguf_without_heads_or_rope_base_is_refused_naming_the_key(tiny_dir, tmp_path, monkeypatch, method, value,
                                                                      said):
    import gguf

    write = getattr(gguf.GGUFWriter, method)
    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, method, lambda self, _: write(self, value))
        gguf_file = write_gguf_from_hf(tiny_dir, tmp_path / "m.gguf")
    refusal = rf"m\.gguf: the GGUF metadata's {said}, not a positive .*the file is damaged"
    with pytest.raises(ConversionError, match=refusal):
        peek_spec(gguf_file)  # what `nomoat convert` reads first
    with pytest.raises(ConversionError, match=refusal):
        load_checkpoint(gguf_file)


@pytest.mark.parametrize(("text", "said"), [
    (b"tiny test model", r"general\.name holds text that is not UTF-8 \(byte 0xff\); the file is damaged"),
    (b"<|endoftext|>", r"tokenizer\.ggml\.tokens holds text that is not UTF-8 \(byte 0xff\); its tokenizer metadata "
                       "is damaged"),
])
def test_a_gguf_string_that_is_not_utf8_is_refused_naming_the_key(tiny_dir, tmp_path, text, said):
    """The gguf package's UnicodeDecodeError was a traceback."""
    gguf_file = write_gguf_from_hf(tiny_dir, tmp_path / "m.gguf")
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data.replace(text, b"\xff" + text[1:], 1))  # the same length: the layout holds
    for read in (peek_spec, load_checkpoint):
        with pytest.raises(ConversionError, match=rf"m\.gguf: the GGUF metadata's {said}: download the file again"):
            read(gguf_file)


@pytest.mark.parametrize("factor", [0.0, 1.0])
def test_a_gguf_rope_factor_of_0_or_1_scales_nothing(tiny_dir, tmp_path, monkeypatch, factor):
    gguf_file = _gguf_with_keys(tiny_dir, tmp_path / "m.gguf", monkeypatch, {"llama.rope.scaling.factor": factor})
    assert load_checkpoint(gguf_file).spec.rope_scaling is None


# -- the fit pre-check reads a folder as the loader does ---------------------------------------------------

def test_a_folder_of_one_gguf_and_a_stub_config_json_converts(tiny_dir, tmp_path):
    """The loader reads such a folder as a GGUF (no safetensors); the pre-check read its config.json and died."""
    folder = tmp_path / "gguf"
    folder.mkdir()
    write_gguf_from_hf(tiny_dir, folder / "m.gguf")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))  # e.g. a hub repo's stub
    assert peek_spec(folder) == load_checkpoint(folder).spec
    assert (_convert(folder, tmp_path / "b") / MANIFEST_NAME).is_file()


# -- a LoRA adapter given as --model ---------------------------------------------------------------------

def _peft_folder(path: Path, with_model_config: Path | None = None) -> Path:
    """A PEFT adapter's files (their contents do not matter: the folder is refused by its files)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
              str(path / "adapter_model.safetensors"))
    if with_model_config is None:
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    else:  # a training run's output folder: the base model's config.json beside the adapter
        shutil.copy(with_model_config / "config.json", path / "config.json")
    return path


def _lora_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["peft", "training-output", "peft-weights-file", "lora-gguf"])
def test_a_lora_adapter_given_as_model_is_told_to_use_lora(tiny_dir, tmp_path, kind):
    adapter = {"peft": lambda: _peft_folder(tmp_path / "adapter"),
               "training-output": lambda: _peft_folder(tmp_path / "adapter", with_model_config=tiny_dir),
               "peft-weights-file": lambda: _peft_folder(tmp_path / "adapter") / "adapter_model.safetensors",
               "lora-gguf": lambda: _lora_gguf(tmp_path / "lora.gguf")}[kind]()
    named = adapter.parent if kind == "peft-weights-file" else adapter
    refusal = f"{named} is a LoRA adapter, not a model: pass it with --lora and its base model with --model"
    with pytest.raises(ConversionError, match=refusal):
        _convert(adapter, tmp_path / "b")
    assert not (tmp_path / "b").exists()


# -- --out that --force could not replace ----------------------------------------------------------------

def test_force_is_suggested_only_for_an_out_force_would_replace(tiny_dir, tmp_path, capsys):
    other = tmp_path / "docs"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    for out, match in [(other, rf"{other} (exists and )?holds other files \(no {MANIFEST_NAME}\); choose another "
                                "--out, or empty that folder yourself"),
                       (tmp_path / "file", "exists and is not a directory; remove it or choose another --out")]:
        for force in (False, True):
            with pytest.raises(ConversionError, match=match) as e:
                check_destination(out, force=force, replaces=(MANIFEST_NAME, "a bundle"))
            assert "pass --force" not in str(e.value)
    assert main(["convert", "--model", str(tiny_dir), "--out", str(other)]) == 1
    assert "pass --force" not in capsys.readouterr().err
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ConversionError, match="already exists; choose another --out or pass --force"):
        check_destination(bundle, force=False, replaces=(MANIFEST_NAME, "a bundle"))
    assert check_destination(bundle, force=True, replaces=(MANIFEST_NAME, "a bundle")) == bundle


# -- --max-ppl-increase is checked before any work -------------------------------------------------------

@pytest.mark.parametrize("limit", ["-5", "nan", "inf", "-inf"])
def test_a_max_ppl_increase_the_gate_cannot_use_is_refused_before_the_model_is_read(tiny_dir, tmp_path, monkeypatch,
                                                                                   capsys, limit):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was read before --max-ppl-increase was checked")

    monkeypatch.setattr("nomoat.converter.peek.peek_spec", no_load)
    monkeypatch.setattr("nomoat.converter.load.load_checkpoint", no_load)
    code = main(["convert", "--model", str(tiny_dir), "--out", str(tmp_path / "b"), f"--max-ppl-increase={limit}"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"nomoat convert: error: --max-ppl-increase {float(limit):g} is not a "
                                        "percentage"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_a_max_ppl_increase_of_zero_is_a_limit(tiny_dir, tmp_path):
    # only refused when the gate measures a rise
    convert_module.plan(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", max_ppl_increase=0.0))


@pytest.mark.parametrize("given", [{"eval_text": "text.txt"}, {"max_ppl_increase": 5.0},
                                   {"eval_text": "text.txt", "max_ppl_increase": 5.0}])
def test_flags_for_the_quality_gate_are_refused_with_skip_verify(tiny_dir, tmp_path, given):
    flags = " and ".join(f"--{name.replace('_', '-')}" for name in given)
    with pytest.raises(ConversionError, match=f"^{flags} ha(s|ve) no effect with --skip-verify.*Drop {flags}, or"):
        _convert(tiny_dir, tmp_path / "b", skip_verify=True, **given)
    assert not (tmp_path / "b").exists()


def test_a_float16_kv_cache_for_a_phone_is_refused_before_any_work(tiny_dir, tmp_path):
    """The Android app keeps its cache in float32: deploy would refuse the bundle only after the conversion."""
    with pytest.raises(ConversionError, match="--kv-dtype float16 makes a bundle the Android app cannot load.*"
                                              "--target pixel6 is a phone. Drop --kv-dtype"):
        convert_module.plan(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", target="pixel6",
                                           kv_dtype="float16"))
    convert_module.plan(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", target="rpi5-8gb", kv_dtype="float16"))


def test_a_model_trained_for_fewer_positions_than_a_bundle_needs_is_refused_naming_the_model(tmp_path):
    short = make_tiny_hf_dir(tmp_path / "short", max_position_embeddings=12)
    with pytest.raises(ConversionError, match="the model was trained for only 12 positions .max_position_embeddings."):
        _convert(short, tmp_path / "b")  # --max-context 64 was asked for: not what is wrong


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    import errno

    def full(ckpt, adapters, recipe, target, estimate, staging, *rest):
        (staging / "model.onnx.data").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "model.onnx.data"))

    monkeypatch.setattr(convert_module, "_build", full)
    out = tmp_path / "b"
    code = main(["convert", "--model", str(tiny_dir), "--out", str(out), "--quant", "fp32", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("nomoat convert: error: No space left on device (writing ") and "free at least" in err
    assert err.rstrip().endswith("Nothing was written.")
    assert list(tmp_path.iterdir()) == [], "nothing may be left beside --out"


# -- staging folders left by a killed conversion, whatever its process id ------------------------------------

def test_a_staging_folder_is_stale_when_its_lock_is_free_even_under_this_process_id(tmp_path):
    """In a container nomoat is PID 1 on every run: an OOM-killed run's folder carries this run's id."""
    import os
    import subprocess
    import sys

    from nomoat.converter.bundle import STAGING_LOCK, remove_stale_staging

    killed, running, older = (tmp_path / f".b.tmp-{os.getpid()}-{s}" for s in ("kill", "runs", "old"))
    for folder in (killed, running, older):
        folder.mkdir()
        (folder / "model.onnx.data").write_bytes(b"x" * 100)
    (killed / STAGING_LOCK).touch()  # its holder is gone, and the kernel dropped its lock
    (running / STAGING_LOCK).touch()
    holder = subprocess.Popen(  # another conversion that holds its lock
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'r+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.read()", str(running / STAGING_LOCK)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert remove_stale_staging(tmp_path / "b") == [killed]
    finally:
        holder.communicate("")  # closing stdin ends it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, older.name])  # older: its id lives
    assert remove_stale_staging(tmp_path / "b") == [running]  # its holder is gone now


def test_a_running_conversion_holds_its_staging_lock_and_the_bundle_has_no_lock_file(tiny_dir, tmp_path, monkeypatch):
    from nomoat.converter.bundle import STAGING_LOCK, remove_stale_staging

    package = convert_module._package

    def package_after_a_second_conversion_looked(staging, *args):
        assert (staging / STAGING_LOCK).is_file()
        assert remove_stale_staging(tmp_path / "b") == []  # another conversion to the same --out keeps it
        package(staging, *args)

    monkeypatch.setattr(convert_module, "_package", package_after_a_second_conversion_looked)
    out = _convert(tiny_dir, tmp_path / "b")
    assert not (out / STAGING_LOCK).exists()
    assert STAGING_LOCK not in json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
