"""The load stage: every source layout gives back the reference HF weights, spec and tokenizer."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from nomoat.converter.errors import ConversionError
from nomoat.converter.load import load_checkpoint
from nomoat.converter.load_gguf import tokenizer_from_gguf
from nomoat.converter.load_meta import spec_from_params
from nomoat.converter.spec import ModelSpec
from tiny_models import (
    CHATML_TEMPLATE,
    bf16_round,
    hf_state_dict,
    logits,
    make_tiny_hf_dir,
    model_from_checkpoint,
    reference_model,
    sentencepiece_gguf_metadata,
    sentencepiece_model,
    write_gguf_from_hf,
    write_meta_from_hf,
)
from tokenizers import Tokenizer

PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7, 1]
TEXTS = [
    "What is the capital of France?",
    "Emoji 😀🚀 and 中文字符, café; 12345 + 3.14",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces\tand\ttabs\n\nnew lines  ",
    "unseen words: zyxwvut ÆØÅ ñ",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("llama"), arch="llama")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("qwen2"), arch="qwen2", seed=1)


@pytest.fixture(scope="module")
def llama_reference_logits(llama_dir) -> torch.Tensor:
    return logits(reference_model(llama_dir), PROMPT_IDS)


def assert_same_logits(ckpt, hf_dir: Path) -> None:
    """A transformers model built from the checkpoint alone computes what the original does."""
    assert torch.equal(
        logits(model_from_checkpoint(ckpt), PROMPT_IDS), logits(reference_model(hf_dir), PROMPT_IDS)
    )


def assert_same_tensors(ckpt, reference: dict[str, torch.Tensor]) -> None:
    assert set(ckpt.tensors) == set(reference)
    for name, t in reference.items():
        assert ckpt.tensors[name].dtype == torch.float32, name
        assert torch.equal(ckpt.tensors[name], t.float()), name


# --- Hugging Face directories ----------------------------------------------------------


def test_hf_dir_gives_back_the_saved_weights_and_logits(llama_dir, llama_reference_logits):
    ckpt = load_checkpoint(llama_dir)
    assert ckpt.spec == ModelSpec.from_hf_config(json.loads((llama_dir / "config.json").read_text()))
    assert_same_tensors(ckpt, hf_state_dict(llama_dir))
    assert torch.equal(logits(model_from_checkpoint(ckpt), PROMPT_IDS), llama_reference_logits)
    assert ckpt.source == {"format": "safetensors", "path": str(llama_dir)}


def test_sharded_hf_dir_loads_every_shard(tmp_path, llama_dir):
    sharded = make_tiny_hf_dir(tmp_path, arch="llama", sharded=True)  # same seed: same weights
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").exists()
    ckpt = load_checkpoint(str(sharded))
    assert_same_tensors(ckpt, hf_state_dict(llama_dir))


@pytest.mark.parametrize("shard", ["{outside}/{name}", "../outside/{name}", "sub/{name}", 5, None])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, shard):
    """weight_map entries were joined to the folder as given: "/x" or "../x" read weights from outside it (into
    the bundle), and a number was a TypeError traceback."""
    sharded = make_tiny_hf_dir(tmp_path / "m", arch="llama", sharded=True)
    outside = shutil.copytree(sharded, tmp_path / "outside")  # real shards there: only the name gives it away
    shutil.copytree(sharded, sharded / "sub")
    if isinstance(shard, str):
        shard = shard.format(outside=outside, name=next(sharded.glob("*.safetensors")).name)
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(ConversionError, match=rf"index\.json's weight_map gives model\.norm\.weight the shard "
                                              rf"{re.escape(json.dumps(shard))}, which is not the name of a file in "
                                              rf"{re.escape(str(sharded))}; the index is damaged"):
        load_checkpoint(sharded)


def test_tied_hf_model_has_no_lm_head_and_same_logits(tmp_path):
    hf = make_tiny_hf_dir(tmp_path, arch="llama", tie=True, seed=3)
    ckpt = load_checkpoint(hf)
    assert ckpt.spec.tie_word_embeddings
    assert "lm_head.weight" not in ckpt.tensors
    assert_same_logits(ckpt, hf)


def test_hf_tokenizer_info_comes_from_the_tokenizer_files(llama_dir):
    tok = load_checkpoint(llama_dir).tokenizer
    vocab = Tokenizer.from_str(tok.tokenizer_json)
    im_end = vocab.token_to_id("<|im_end|>")
    assert tok.tokenizer_json == (llama_dir / "tokenizer.json").read_text()
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.eos_token_ids == [im_end]
    assert tok.bos_token_id is None
    assert tok.add_bos_token is False
    assert tok.special_tokens == {"eos": "<|im_end|>", "pad": "<|endoftext|>"}


def test_a_bos_token_said_null_is_not_rendered_by_the_chat_template(tmp_path):
    """Qwen2's files: "bos_token": null beside a config.json bos_token_id. transformers renders the
    template's {{ bos_token }} as "", so a fine-tune whose template writes it gets no <|endoftext|> first."""
    from nomoat.runtime.chat_template import ChatTemplate
    from transformers import AutoTokenizer

    hf = make_tiny_hf_dir(tmp_path, bos_token_id=0)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert "bos_token" in config and config["bos_token"] is None
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                               "{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_checkpoint(hf).tokenizer
    assert tok.bos_token_id == 0  # the id stays known (config.json says it)
    messages = [{"role": "user", "content": "hi"}]
    ours = ChatTemplate.for_tokenizer(tok.chat_template, tok.special_tokens).render(messages)
    assert ours == AutoTokenizer.from_pretrained(str(hf)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<|im_start|>")


def test_hf_generation_defaults_and_eos_list(tmp_path):
    hf = make_tiny_hf_dir(tmp_path)
    vocab = Tokenizer.from_file(str(hf / "tokenizer.json"))
    eot, im_end = vocab.token_to_id("<|endoftext|>"), vocab.token_to_id("<|im_end|>")
    gen = {"eos_token_id": [eot, im_end], "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": None}
    (hf / "generation_config.json").write_text(json.dumps(gen))
    (hf / "chat_template.jinja").write_text("{{ messages[0]['content'] }}<|im_end|>")
    ckpt = load_checkpoint(hf)
    assert ckpt.tokenizer.eos_token_ids == [eot, im_end]
    assert ckpt.tokenizer.chat_template == "{{ messages[0]['content'] }}<|im_end|>"
    assert ckpt.generation_defaults == {"temperature": 0.6, "top_k": 20, "top_p": 1.0}


@pytest.mark.parametrize(("gen", "defaults"), [
    # no do_sample: transformers decodes greedily whatever the temperature says; a penalty still applies
    ({"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.0}),
    ({"do_sample": False, "temperature": 0.7, "repetition_penalty": 1.1},
     {"temperature": 0.0, "repetition_penalty": 1.1}),
    # do_sample: GenerationConfig's defaults for what is left out (temperature 1.0, top_k 50, top_p 1.0)
    ({"do_sample": True, "top_p": 0.9}, {"temperature": 1.0, "top_k": 50, "top_p": 0.9}),
    ({"do_sample": True, "temperature": 0.7, "top_k": 0, "min_p": 0.1},
     {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.1}),
    ({}, {"temperature": 0.0}),
])
def test_hf_generation_defaults_are_what_transformers_generates_with(tmp_path, gen, defaults):
    from nomoat.converter.load_hf import read_generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    assert read_generation_defaults(tmp_path) == defaults


def test_qwen2_with_biases_through_hf(qwen2_dir):
    ckpt = load_checkpoint(qwen2_dir)
    assert ckpt.spec.architecture == "qwen2" and ckpt.spec.attention_bias
    assert "model.layers.1.self_attn.k_proj.bias" in ckpt.tensors
    assert_same_tensors(ckpt, hf_state_dict(qwen2_dir))
    assert_same_logits(ckpt, qwen2_dir)


# --- GGUF ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_gguf(llama_dir, tmp_path_factory) -> Path:
    return write_gguf_from_hf(llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def test_gguf_f32_gives_back_the_hf_weights_and_logits(llama_dir, llama_gguf, llama_reference_logits):
    ckpt = load_checkpoint(llama_gguf)
    assert ckpt.spec == ModelSpec.from_hf_config(json.loads((llama_dir / "config.json").read_text()))
    assert_same_tensors(ckpt, hf_state_dict(llama_dir))
    assert torch.equal(logits(model_from_checkpoint(ckpt), PROMPT_IDS), llama_reference_logits)
    assert ckpt.source == {"format": "gguf", "path": str(llama_gguf), "file_type": "ALL_F32"}
    assert ckpt.generation_defaults == {"temperature": 0.7, "top_p": 0.9}


def test_a_ggufs_repeat_penalty_and_its_window_become_the_bundles_defaults(llama_dir, tmp_path):
    gguf_path = write_gguf_from_hf(llama_dir, tmp_path / "penalty.gguf", penalty=(1.25, 64))
    defaults = load_checkpoint(gguf_path).generation_defaults
    assert defaults == {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.25, "repeat_last_n": 64}


def test_our_gguf_writer_matches_transformers_reading_of_llama_cpp_layout(llama_dir, llama_gguf):
    """Guards the fixture itself: transformers' own GGUF reader (which undoes llama.cpp's q/k
    permutation independently of our loader) must also get the HF weights back."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(
        llama_gguf.parent, gguf_file=llama_gguf.name, dtype=torch.float32
    )
    for name, t in hf_state_dict(llama_dir).items():
        assert torch.equal(theirs.state_dict()[name], t), name


def test_gguf_tied_model_has_no_lm_head(tmp_path):
    hf = make_tiny_hf_dir(tmp_path / "hf", tie=True, seed=4)
    ckpt = load_checkpoint(write_gguf_from_hf(hf, tmp_path / "tied.gguf"))
    assert ckpt.spec.tie_word_embeddings and "lm_head.weight" not in ckpt.tensors
    assert_same_logits(ckpt, hf)


@pytest.mark.parametrize(
    ("qtype", "file_type", "max_error"),
    [
        ("F16", "MOSTLY_F16", lambda amax: amax * 1e-3),
        ("BF16", "MOSTLY_BF16", lambda amax: amax / 2**8),
        ("Q8_0", "MOSTLY_Q8_0", lambda amax: amax / 127),  # per-block scale amax/127, error <= half of it
        ("Q4_0", "MOSTLY_Q4_0", lambda amax: amax / 7),  # 4-bit: scale amax/8
    ],
)
def test_quantized_gguf_is_dequantized_within_its_error(tmp_path, llama_dir, qtype, file_type, max_error):
    ckpt = load_checkpoint(write_gguf_from_hf(llama_dir, tmp_path / f"tiny-{qtype}.gguf", qtype=qtype))
    assert ckpt.source["file_type"] == file_type
    for name, ref in hf_state_dict(llama_dir).items():
        got = ckpt.tensors[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        error = (got - ref).abs().max().item()
        if ref.dim() == 1:
            assert error == 0, name  # norms stay F32 in a GGUF
        else:
            assert 0 < error <= max_error(ref.abs().max().item()), (name, error)


def test_gguf_tokenizer_encodes_like_the_original(llama_dir, llama_gguf):
    original = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    rebuilt = Tokenizer.from_str(load_checkpoint(llama_gguf).tokenizer.tokenizer_json)
    for text in TEXTS:
        ids = original.encode(text, add_special_tokens=False).ids
        assert rebuilt.encode(text, add_special_tokens=False).ids == ids, text
        assert rebuilt.decode(ids, skip_special_tokens=False) == text


# The splits of the original tokenizers, as their tokenizer.json files spell them: the oracle the
# GGUF rebuild (converter/gguf_pretokenizer.py) is checked against.
_ORIGINAL_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_SPLIT_CORPUS = ["def f(self, x):\n    return self.value + 12345", "(self.items) and (self.keys)",
                 "IT'S DON'T WON'T it's", "In 2024 there were 1234567 people.", "print(\"hello world\")",
                 "caf\u00e9 cafe\u0301 na\u00efve"] * 40


def _original_byte_level_bpe(pre: str):
    """A byte-level BPE trained with the split the tokenizer named `pre` uses (its merges depend on it)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pre in _ORIGINAL_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_ORIGINAL_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_SPLIT_CORPUS, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def _gguf_tokenizer_dict(tok, pre: str) -> dict:
    """The vocabulary as llama.cpp's converter stores it (keys as load_gguf maps them)."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    return {"tokenizer_type": "gpt2", "pre_tokenizer_type": pre,
            "tokens": [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])],
            "merges": [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]],
            "token_type": [3 if t == "<|endoftext|>" else 1 for t in sorted(vocab, key=vocab.get)]}


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt-2"])
def test_gguf_byte_level_tokenizer_splits_as_its_pre_tokenizer_says(pre):
    """Whatever transformers does with tokenizer.ggml.pre (4.x ignores it), the bundle splits like the original."""
    from nomoat.converter.load_gguf import _build_tokenizer_json

    original = _original_byte_level_bpe(pre)
    rebuilt = Tokenizer.from_str(_build_tokenizer_json("llama", _gguf_tokenizer_dict(original, pre)))
    for text in [*_SPLIT_CORPUS[:6], "return self.value + 12345", "IT'S (self.items)", "x 42 y\n\n  z"]:
        assert rebuilt.encode(text).tokens == original.encode(text).tokens, text


def _as_gguf_metadata(tokenizer_dict: dict, **more) -> dict:
    names = {"tokenizer_type": "model", "pre_tokenizer_type": "pre", "tokens": "tokens", "merges": "merges",
             "token_type": "token_type"}
    return {f"tokenizer.ggml.{names[k]}": v for k, v in tokenizer_dict.items()} | {
        f"tokenizer.ggml.{k}": v for k, v in more.items()}


def test_gguf_special_tokens_outside_the_byte_alphabet_are_matched_whole():
    """DeepSeek-R1-Distill GGUFs store "<｜User｜>" as its text; llama.cpp matches it whole, and so must the
    bundle (transformers' rebuild leaves such tokens out, and a chat template's turn markers became byte pieces)."""
    from nomoat.converter.load_gguf import _build_tokenizer_json

    tokenizer_dict = _gguf_tokenizer_dict(_original_byte_level_bpe("qwen2"), "deepseek-r1-qwen")
    specials = {"<｜begin▁of▁sentence｜>": 3, "<｜User｜>": 3, "<｜Assistant｜>": 3, "<think>": 4}
    first = len(tokenizer_dict["tokens"])
    tokenizer_dict["tokens"] += list(specials)
    tokenizer_dict["token_type"] += list(specials.values())
    rebuilt = Tokenizer.from_str(_build_tokenizer_json("qwen2", tokenizer_dict))
    ids = {text: first + n for n, text in enumerate(specials)}
    text = "<｜begin▁of▁sentence｜><｜User｜>return 12<｜Assistant｜><think>"
    encoded = rebuilt.encode(text, add_special_tokens=False).ids
    assert encoded[:2] == [ids["<｜begin▁of▁sentence｜>"], ids["<｜User｜>"]]
    assert encoded[-2:] == [ids["<｜Assistant｜>"], ids["<think>"]]
    assert rebuilt.decode(encoded, skip_special_tokens=False) == text
    assert rebuilt.decode(encoded) == "return 12<think>"  # control tokens skipped, user-defined ones kept
    assert rebuilt.get_vocab_size() == len(tokenizer_dict["tokens"])


@pytest.mark.parametrize("pre,whole", [("llama-bpe", True), ("qwen2", False)])
def test_gguf_llama3_vocabularies_take_whole_words_the_merges_do_not_reach(pre, whole):
    """llama.cpp's ignore_merges for Llama 3 and Tekken (their tokenizer.json has it too): a word in the
    vocabulary is one token even when no chain of merges builds it (Llama 3's " Việt")."""
    from nomoat.converter.load_gguf import _build_tokenizer_json

    tokenizer_dict = _gguf_tokenizer_dict(_original_byte_level_bpe(pre), pre)
    tokenizer_dict["tokens"].append("Ġzqxv")
    tokenizer_dict["token_type"].append(1)
    tokens = Tokenizer.from_str(_build_tokenizer_json("llama", tokenizer_dict)).encode("a zqxv").tokens
    assert (tokens[-1:] == ["Ġzqxv"]) is whole, tokens


@pytest.mark.parametrize("pre,adds", [("llama-bpe", True), ("tekken", True), ("smollm", False), ("qwen2", False)])
def test_a_gguf_without_the_bos_flag_gets_llama_cpps_default(pre, adds):
    tokenizer_dict = _gguf_tokenizer_dict(_original_byte_level_bpe("gpt-2"), pre)
    meta = _as_gguf_metadata(tokenizer_dict, bos_token_id=0, eos_token_id=0)
    assert tokenizer_from_gguf(meta, "llama").add_bos_token is adds
    assert tokenizer_from_gguf(meta | {"tokenizer.ggml.add_bos_token": not adds}, "llama").add_bos_token is not adds


def test_gguf_with_a_pre_tokenizer_nomoat_does_not_know_is_refused():
    from nomoat.converter.load_gguf import _build_tokenizer_json

    tokenizer_dict = _gguf_tokenizer_dict(_original_byte_level_bpe("gpt-2"), "deepseek-llm")
    with pytest.raises(ConversionError, match="splits text as 'deepseek-llm'.*Hugging Face folder"):
        _build_tokenizer_json("llama", tokenizer_dict)


def test_gguf_sentencepiece_tokenizer_encodes_like_sentencepiece():
    import sentencepiece as spm

    meta = sentencepiece_gguf_metadata()  # no add_bos_token key, like older llama GGUFs
    tok = tokenizer_from_gguf(meta, "llama")
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model())
    rebuilt = Tokenizer.from_str(tok.tokenizer_json)
    for text in ["What is the capital of France?", "Emoji 😀🚀 and 中文字符, café; 12345", "a\nb  c", "  two  spaces "]:
        assert rebuilt.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    assert tok.add_bos_token is True  # llama.cpp's default for SentencePiece vocabularies
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, [2])
    assert tok.special_tokens == {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}


@pytest.mark.parametrize("space_prefix", [True, False])
def test_gguf_sentencepiece_text_between_special_tokens_is_split_as_llama_cpp_splits_it(space_prefix):
    """llama.cpp encodes each stretch of text between special tokens on its own, with a leading space
    unless add_space_prefix is false: "<s>[INST] ..." is "<s>", "▁[", ... as Llama 2's tokenizer.json has it."""
    import re

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_model())
    proto.normalizer_spec.add_dummy_prefix = space_prefix
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def llama_cpp(text: str) -> list[int]:
        pieces = re.split(r"(<s>|</s>)", text)
        return [i for piece in pieces if piece
                for i in ([sp.piece_to_id(piece)] if piece in ("<s>", "</s>") else sp.encode(piece))]

    meta = sentencepiece_gguf_metadata() | {"tokenizer.ggml.add_space_prefix": space_prefix}
    rebuilt = Tokenizer.from_str(tokenizer_from_gguf(meta, "llama").tokenizer_json)
    for text in ["<s>[INST] The quick fox [/INST]", "The quick fox</s>\nThe lazy dog", "a</s> b", "  two  spaces ",
                 "Emoji 😀 café 12345"]:
        ids = rebuilt.encode(text, add_special_tokens=False).ids
        assert ids == llama_cpp(text), text
        if "<s>" not in text and "</s>" not in text:  # a leading space is stripped on decode only if one was added
            assert rebuilt.decode(ids) == sp.decode(ids), text


def test_gguf_stops_at_eos_and_at_the_templates_end_of_turn(llama_gguf):
    tok = load_checkpoint(llama_gguf).tokenizer
    vocab = Tokenizer.from_str(tok.tokenizer_json)
    # the file's eos is <|endoftext|>, but a chat turn ends with <|im_end|>
    assert tok.eos_token_ids == [vocab.token_to_id("<|endoftext|>"), vocab.token_to_id("<|im_end|>")]
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.add_bos_token is False and tok.bos_token_id is None
    assert tok.special_tokens["eos"] == "<|endoftext|>"


def test_qwen2_gguf_is_not_unpermuted_and_keeps_biases(qwen2_dir, tmp_path):
    ckpt = load_checkpoint(write_gguf_from_hf(qwen2_dir, tmp_path / "qwen2.gguf"))
    assert ckpt.spec.architecture == "qwen2"
    assert_same_tensors(ckpt, hf_state_dict(qwen2_dir))
    assert_same_logits(ckpt, qwen2_dir)


def test_qwen2_gguf_bundle_keeps_the_attention_biases(qwen2_dir, tmp_path):
    """The spec must say attention_bias, or the ONNX graph leaves the q/k/v biases out: another model."""
    import numpy as np
    from nomoat.converter.convert import ConvertOptions, convert
    from nomoat.runtime import Model

    gguf = write_gguf_from_hf(qwen2_dir, tmp_path / "qwen2.gguf")
    bundle = convert(ConvertOptions(model=str(gguf), out=tmp_path / "b", quant="fp32", max_context=64,
                                    progress=False, skip_verify=True))
    np.testing.assert_allclose(Model.load(bundle).logits(PROMPT_IDS),
                               logits(reference_model(qwen2_dir), PROMPT_IDS).numpy(), atol=1e-4, rtol=1e-4)
    assert load_checkpoint(gguf).spec == ModelSpec.from_hf_config(json.loads((qwen2_dir / "config.json").read_text()))


def test_llama_gguf_with_attention_biases_is_refused(qwen2_dir, tmp_path):
    # llama.cpp's 'llama' blocks may carry q/k/v biases; exported without them it would be another model
    gguf = write_gguf_from_hf(qwen2_dir, tmp_path / "biased-llama.gguf", architecture="llama")
    with pytest.raises(ConversionError, match=r"llama blocks carry biases \(attn_k.bias, attn_q.bias, attn_v.bias\)"):
        load_checkpoint(gguf)


def test_gguf_llama3_rope_freqs_become_rope_scaling(tmp_path):
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    hf = make_tiny_hf_dir(tmp_path / "hf", rope_parameters=llama3, max_position_embeddings=16384)
    ckpt = load_checkpoint(write_gguf_from_hf(hf, tmp_path / "llama3.gguf"))
    expected = ModelSpec.from_hf_config(json.loads((hf / "config.json").read_text()))
    assert expected.rope_scaling is not None
    assert ckpt.spec == expected
    assert_same_logits(ckpt, hf)


# --- Meta ------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_gives_back_the_hf_weights_and_logits(
    tmp_path, llama_dir, llama_reference_logits, shards
):
    meta = write_meta_from_hf(llama_dir, tmp_path / "meta", shards=shards)
    ckpt = load_checkpoint(meta)
    hf_spec = ModelSpec.from_hf_config(json.loads((llama_dir / "config.json").read_text()))
    # params.json does not record the context length; Llama 2's 4096 is assumed
    assert ckpt.spec == dataclasses.replace(hf_spec, max_position_embeddings=4096)
    assert_same_tensors(ckpt, hf_state_dict(llama_dir))
    assert torch.equal(logits(model_from_checkpoint(ckpt), PROMPT_IDS), llama_reference_logits)
    assert ckpt.source["shards"] == shards


def test_meta_bf16_checkpoint_is_cast_to_fp32(tmp_path, llama_dir):
    ckpt = load_checkpoint(write_meta_from_hf(llama_dir, tmp_path / "meta", dtype=torch.bfloat16))
    assert_same_tensors(ckpt, bf16_round(hf_state_dict(llama_dir)))


def test_meta_tokenizer_defaults(tmp_path, llama_dir):
    tok = load_checkpoint(write_meta_from_hf(llama_dir, tmp_path / "meta")).tokenizer
    vocab = Tokenizer.from_str(tok.tokenizer_json)
    # no tokenizer_config.json: the well-known special tokens of the vocabulary are used
    assert tok.eos_token_ids == [vocab.token_to_id("<|endoftext|>"), vocab.token_to_id("<|im_end|>")]
    assert tok.bos_token_id == vocab.token_to_id("<s>")
    assert tok.add_bos_token is True  # Meta's reference code always starts with BOS
    assert tok.chat_template is None


def test_a_meta_instruct_folder_stops_at_its_tokenizers_eos_too(tmp_path):
    """Meta's tokenizer ends a sequence at <|end_of_text|> (Llama 3; </s> for Llama 2), and transformers'
    converter and the Hugging Face repo list it; tokenizer_config.json of an Instruct model names only
    <|eot_id|>: a raw completion went on past <|end_of_text|> to the token limit."""
    from tokenizers import AddedToken

    # rows for the four special tokens added below (a tokenizer with more tokens than rows is refused)
    meta = write_meta_from_hf(make_tiny_hf_dir(tmp_path / "hf", vocab_size=404), tmp_path / "meta")
    vocab = Tokenizer.from_file(str(meta / "tokenizer.json"))
    vocab.add_special_tokens([AddedToken(t, special=True) for t in ("<|begin_of_text|>", "<|end_of_text|>",
                                                                   "<|eom_id|>", "<|eot_id|>")])
    vocab.save(str(meta / "tokenizer.json"))
    (meta / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                            "eos_token": "<|eot_id|>"}))
    tok = load_checkpoint(meta).tokenizer
    assert tok.eos_token_ids == [vocab.token_to_id("<|eot_id|>"), vocab.token_to_id("<|end_of_text|>")]


def _llama3_params(dim: int, layers: int, **extra) -> dict:
    return {"dim": dim, "n_layers": layers, "n_heads": dim // 64, "n_kv_heads": 8, "vocab_size": 128256,
            "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True, **extra}


@pytest.mark.parametrize(
    ("params", "factor"),
    [
        (_llama3_params(2048, 16), 32.0),  # Llama 3.2 1B: params.json has no factor; HF's config says 32
        (_llama3_params(3072, 28), 32.0),  # Llama 3.2 3B
        (_llama3_params(4096, 32), 8.0),  # Llama 3.1 8B
        (_llama3_params(2048, 16, rope_scale_factor=16), 16.0),  # a factor params.json states wins
        (_llama3_params(4096, 32, rope_scaling_factor=32), 32.0),
    ],
)
def test_meta_llama3_rope_factor(params, factor):
    dim = params["dim"]
    # shapes only: meta-device tensors cost no memory
    state = {"tok_embeddings.weight": torch.empty(128256, dim, device="meta"),
             "layers.0.feed_forward.w1.weight": torch.empty(4 * dim, dim, device="meta")}
    spec = spec_from_params(params, state)
    assert spec.rope_scaling.factor == factor
    assert spec.to_hf_config()["rope_scaling"]["factor"] == factor


# --- bad input -------------------------------------------------------------------------


def _hf_copy(tmp_path: Path, **config_changes) -> Path:
    hf = make_tiny_hf_dir(tmp_path / "model")
    if config_changes:
        cfg = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**cfg, **config_changes}))
    return hf


def test_missing_safetensors_is_refused(tmp_path):
    hf = _hf_copy(tmp_path)
    (hf / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"config\.json but no \*\.safetensors"):
        load_checkpoint(hf)


def test_missing_shard_is_named(tmp_path):
    hf = make_tiny_hf_dir(tmp_path / "model", sharded=True)
    shard = sorted(hf.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ConversionError, match=rf"{shard.name}.*download"):
        load_checkpoint(hf)


def test_truncated_safetensors_is_named(tmp_path):
    hf = _hf_copy(tmp_path)
    f = hf / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(
        ConversionError, match=r"model\.safetensors is not a readable safetensors file.*again"
    ):
        load_checkpoint(hf)


def test_safetensors_with_a_bad_header_is_named(tmp_path):
    hf = _hf_copy(tmp_path)
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ConversionError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(hf)


def test_unknown_model_type_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="model_type 'gpt_neox' is not supported"):
        load_checkpoint(_hf_copy(tmp_path, model_type="gpt_neox"))


@pytest.mark.parametrize(("changes", "setting"), [
    pytest.param({"max_window_layers": 1}, r"max_window_layers 1 is below num_hidden_layers 2, so layer\(s\) 1 "
                 "attend within the window", id="max_window_layers"),
    pytest.param({"max_window_layers": 0, "num_hidden_layers": 3},
                 r"max_window_layers 0 is below num_hidden_layers 3, so layer\(s\) 0-2", id="every layer"),
    pytest.param({"max_window_layers": 2, "layer_types": ["full_attention", "sliding_attention"]},
                 r"layer_types marks layer\(s\) 1 as sliding_attention", id="layer_types"),
])
def test_qwen2_with_sliding_layers_is_refused_naming_the_setting(tmp_path, changes, setting):
    # Qwen2's window applies to some layers only (layers max_window_layers and up); Mistral's is exported
    # (tests/test_sliding_window.py).
    hf = _hf_copy(tmp_path, model_type="qwen2", use_sliding_window=True, sliding_window=4, **changes)
    with pytest.raises(ConversionError, match=rf"config.json sets use_sliding_window=true with sliding_window 4, "
                                              rf"and {setting}.*set it to false in"):
        load_checkpoint(hf)


@pytest.mark.parametrize("changes", [
    pytest.param({"max_window_layers": 2}, id="max_window_layers covers every layer"),
    pytest.param({}, id="Qwen2Config's default 28 layers"),
    pytest.param({"max_window_layers": 1, "sliding_window": None}, id="no window"),
])
def test_qwen2_with_use_sliding_window_but_no_sliding_layer_is_plain_attention(qwen2_dir, tmp_path, changes):
    """transformers slides only layers max_window_layers and up: with as many as the model has, none does."""
    hf = Path(shutil.copytree(qwen2_dir, tmp_path / "qwen2"))
    cfg = {**json.loads((hf / "config.json").read_text()), "use_sliding_window": True, "sliding_window": 2,
           **changes}
    cfg.pop("layer_types", None)  # saved by transformers 5 from the model's own settings; rebuilt from these
    (hf / "config.json").write_text(json.dumps(cfg))
    ckpt = load_checkpoint(hf)
    assert ckpt.spec.sliding_window is None
    # the window of 2 changes the logits of an 8-token prompt wherever it applies: the reference does not slide
    assert_same_logits(ckpt, hf)


def test_untied_model_without_lm_head_is_refused(tmp_path):
    hf = make_tiny_hf_dir(tmp_path / "model", tie=True)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(ConversionError, match="tie_word_embeddings=false but .* no lm_head"):
        load_checkpoint(hf)


def test_hf_dir_without_tokenizer_json_is_refused(tmp_path):
    hf = _hf_copy(tmp_path)
    (hf / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer.json"):
        load_checkpoint(hf)


def test_gguf_of_another_architecture_is_refused(tmp_path, llama_dir):
    bad = write_gguf_from_hf(llama_dir, tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(ConversionError, match="GGUF architecture 'gpt2' is not supported"):
        load_checkpoint(bad)


def test_gguf_tensor_type_that_cannot_be_dequantized_is_named(tmp_path, llama_dir):
    bad = write_gguf_from_hf(llama_dir, tmp_path / "int8.gguf", qtype="I8")
    with pytest.raises(ConversionError, match=r"tensor [\w.]+ is stored as I8, which .* cannot dequantize"):
        load_checkpoint(bad)


def test_truncated_gguf_is_refused(tmp_path, llama_gguf):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(llama_gguf.read_bytes()[:2000])
    with pytest.raises(ConversionError, match="cut.gguf cannot be read as a GGUF file"):
        load_checkpoint(bad)


def test_truncated_meta_shard_is_named(tmp_path, llama_dir):
    meta = write_meta_from_hf(llama_dir, tmp_path / "meta")
    shard = meta / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ConversionError, match=r"consolidated\.00\.pth cannot be read .* download it again"):
        load_checkpoint(meta)


def test_meta_dir_without_tokenizer_is_refused(tmp_path, llama_dir):
    meta = write_meta_from_hf(llama_dir, tmp_path / "meta")
    (meta / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer.json .* put it next to consolidated"):
        load_checkpoint(meta)


def _edit_params(meta: Path, **changes) -> None:
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, **changes}))


def _edit_shard(shard: Path, edit, **save) -> None:
    state = torch.load(shard, weights_only=True)
    edit(state)
    torch.save(state, shard, **save)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_meta_params_with_another_layer_count_is_refused_by_load_and_peek(tmp_path, llama_dir, n_layers):
    """n_layers 1 with 2 layers in the .pth was converted into a model cut after its first layer."""
    from nomoat.converter.peek import peek_spec

    meta = write_meta_from_hf(llama_dir, tmp_path / "meta")
    _edit_params(meta, n_layers=n_layers)
    expected = rf"params\.json says n_layers {n_layers} but the weights hold 2 layers \(layers\.0 to layers\.1\)"
    with pytest.raises(ConversionError, match=expected):
        load_checkpoint(meta)
    with pytest.raises(ConversionError, match=expected):
        peek_spec(meta)  # the fit pre-check sizes the model the load would build


def _other_models_shard(tmp_path: Path, meta: Path) -> None:
    other = write_meta_from_hf(make_tiny_hf_dir(tmp_path / "hf2", intermediate_size=96), tmp_path / "other", shards=2)
    shutil.copy(other / "consolidated.01.pth", meta / "consolidated.01.pth")


@pytest.mark.parametrize(
    "mismatch",
    [
        lambda tmp, meta: _edit_shard(meta / "consolidated.01.pth", lambda s: s.update(
            {"layers.0.attention.wo.weight": s["layers.0.attention.wo.weight"][:8]})),  # was a torch.cat error
        lambda tmp, meta: _edit_shard(meta / "consolidated.01.pth", lambda s: s.update(
            {"layers.0.attention.wo.weight": s["layers.0.attention.wo.weight"].half()})),
        _other_models_shard,  # another FFN size: was merged into a model that never existed
    ],
    ids=["shape", "dtype", "other-model"],
)
def test_meta_shards_from_different_downloads_are_refused(tmp_path, llama_dir, mismatch):
    meta = write_meta_from_hf(llama_dir, tmp_path / "meta", shards=2)
    mismatch(tmp_path, meta)
    with pytest.raises(ConversionError, match=r"tensor layers\.0\.\S+ is \(.*\) \w+ in consolidated\.00\.pth but "
                                              r"\(.*\) \w+ in consolidated\.01\.pth; the shards come from different "
                                              r"downloads"):
        load_checkpoint(meta)


def test_meta_quantized_release_is_refused_as_such(tmp_path, llama_dir):
    """Meta's Llama 3.2 QLoRA / SpinQuant int4 downloads: params.json has quantization_args."""
    meta = write_meta_from_hf(llama_dir, tmp_path / "meta")
    _edit_params(meta, quantization_args={"group_size": 32, "scheme": "int4_weight_int8_dynamic_activation"})
    with pytest.raises(ConversionError, match=r"quantization_args: this is Meta's quantized release .* Download the "
                                              r"bf16 one \(e\.g\. Llama3\.2-1B-Instruct\)"):
        load_checkpoint(meta)


def test_meta_integer_weights_are_refused_not_read_as_numbers(tmp_path, llama_dir):
    meta = write_meta_from_hf(llama_dir, tmp_path / "meta")
    name = "layers.0.attention.wq.weight"
    _edit_shard(meta / "consolidated.00.pth", lambda s: s.update({name: (s[name] * 100).round().to(torch.int8)}))
    with pytest.raises(ConversionError, match=rf"consolidated\.00\.pth stores {name} as int8, not as floating-point "
                                              "weights: the checkpoint is quantized"):
        load_checkpoint(meta)


@pytest.mark.parametrize(
    ("vocab", "params", "positions"),
    [
        (32016, {"rope_theta": 1000000.0}, 16384),  # CodeLlama, as transformers' convert_llama_weights_to_hf
        (32000, {}, 4096),  # Llama 2
        (128256, {"rope_theta": 500000.0}, 8192),  # Llama 3
        (128256, {"rope_theta": 500000.0, "use_scaled_rope": True}, 131072),  # Llama 3.1
        (32016, {"rope_theta": 1000000.0, "max_seq_len": 2048}, 2048),  # a length params.json states wins
    ],
)
def test_meta_trained_context_length(vocab, params, positions):
    state = {"tok_embeddings.weight": torch.empty(vocab, 4096, device="meta"),
             "layers.0.feed_forward.w1.weight": torch.empty(11008, 4096, device="meta")}
    spec = spec_from_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": -1, **params}, state)
    assert spec.max_position_embeddings == positions


@pytest.mark.parametrize(("shards", "removed"), [(4, 1), (2, 1)])  # a gap in the numbering; the last one
def test_missing_meta_shard_is_named(tmp_path, llama_dir, shards, removed):
    meta = write_meta_from_hf(llama_dir, tmp_path / "meta", shards=shards)
    (meta / f"consolidated.{removed:02d}.pth").unlink()
    with pytest.raises(ConversionError, match=rf"^consolidated\.{removed:02d}\.pth is missing: .* split into {shards} "
                                              "shards"):
        load_checkpoint(meta)


def test_single_consolidated_pth_loads(tmp_path, llama_dir):
    """folder_kind recognised consolidated.pth as a Meta folder, whose load then found no consolidated.*.pth."""
    from nomoat.converter.peek import peek_spec

    meta = write_meta_from_hf(llama_dir, tmp_path / "meta")
    (meta / "consolidated.00.pth").rename(meta / "consolidated.pth")
    ckpt = load_checkpoint(meta)
    assert_same_tensors(ckpt, hf_state_dict(llama_dir))
    assert peek_spec(meta) == ckpt.spec


def test_legacy_torch_save_format_loads(tmp_path, llama_dir):
    """torch.save's pre-1.6 format cannot be memory-mapped; it is no corrupt file."""
    meta = write_meta_from_hf(llama_dir, tmp_path / "meta")
    _edit_shard(meta / "consolidated.00.pth", lambda s: None, _use_new_zipfile_serialization=False)
    assert_same_tensors(load_checkpoint(meta), hf_state_dict(llama_dir))


def test_meta_shard_with_pickled_objects_is_a_one_line_error(tmp_path, llama_dir):
    import argparse

    meta = write_meta_from_hf(llama_dir, tmp_path / "meta")
    _edit_shard(meta / "consolidated.00.pth", lambda s: s.update({"args": argparse.Namespace(a=1)}))
    with pytest.raises(ConversionError, match=r"consolidated\.00\.pth holds pickled Python objects "
                                              r"\(argparse\.Namespace\)") as e:
        load_checkpoint(meta)
    assert "\n" not in str(e.value) and "WeightsUnpickler" not in str(e.value)


def test_meta_shape_mismatch_names_params_json(tmp_path, llama_dir):
    meta = write_meta_from_hf(llama_dir, tmp_path / "meta")
    _edit_params(meta, n_kv_heads=4)
    with pytest.raises(ConversionError, match=r"but params\.json says \(64, 64\); the weights and params\.json do not"):
        load_checkpoint(meta)


def test_mistral_native_layout_asks_for_the_hugging_face_files(tmp_path):
    """mistral-inference's download: params.json + consolidated.safetensors + tokenizer.model.v3, no .pth."""
    from safetensors.torch import save_file

    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128,
                                                      "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5,
                                                      "vocab_size": 400, "rope_theta": 1e6}))
    save_file({"tok_embeddings.weight": torch.zeros(400, 64)}, str(tmp_path / "consolidated.safetensors"))
    (tmp_path / "tokenizer.model.v3").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"Mistral's native layout .* Hugging Face files instead \(config\.json, "
                                              r"model\*\.safetensors") as e:
        load_checkpoint(tmp_path)
    assert ".pth" not in str(e.value)


def test_a_repo_with_its_meta_weights_in_original_points_there(tmp_path, llama_dir):
    """`hf download REPO --include 'original/*' 'config.json' 'tokenizer*'`: the model is all there."""
    repo = tmp_path / "Llama-3.2-1B-Instruct"
    write_meta_from_hf(llama_dir, repo / "original")
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(llama_dir / name, repo / name)
    with pytest.raises(ConversionError, match=r"its Meta weights are in original/: point --model at .*original, or"):
        load_checkpoint(repo)
    assert load_checkpoint(repo / "original").source["format"] == "meta"


def test_unrecognised_directory_lists_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConversionError, match=r"holds: notes\.txt.*Accepted: a Hugging Face model directory"):
        load_checkpoint(tmp_path)


def test_cached_hub_id_loads_the_local_snapshot(tmp_path, monkeypatch, llama_dir):
    from huggingface_hub import constants

    # the Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    repo = tmp_path / "hub" / "models--nomoat-test--tiny"
    shutil.copytree(llama_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ckpt = load_checkpoint("nomoat-test/tiny")
    assert ckpt.source["path"] == str(repo / "snapshots" / ("0" * 40))
    assert_same_tensors(ckpt, hf_state_dict(llama_dir))


def test_uncached_hub_id_asks_for_a_local_copy():
    with pytest.raises(ConversionError, match="not a local path .* does not download"):
        load_checkpoint("nomoat-test/definitely-not-cached")


def test_missing_local_path_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_a_quantized_safetensors_checkpoint_is_refused_not_read_as_numbers(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = make_tiny_hf_dir(tmp_path / "m")
    weights = load_file(hf / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = (weights[name] * 127 / weights[name].abs().max()).round().to(torch.int8)
    save_file(weights, hf / "model.safetensors")
    with pytest.raises(ConversionError, match=rf"stores {name} as int8, not as floating-point.*quantized"):
        load_checkpoint(hf)


def test_a_per_layer_gguf_count_is_one_value_or_refused():
    from nomoat.converter.load_gguf import _one_count

    assert _one_count(3, "attention.head_count_kv") == 3
    assert _one_count([3, 3, 3], "attention.head_count_kv") == 3
    with pytest.raises(ConversionError, match=r"head_count_kv differs from layer to layer \(\[1, 3\]\)"):
        _one_count([3, 1, 3], "attention.head_count_kv")


@pytest.mark.parametrize("change", [{"num_kv_heads": 0}, {"rope_theta": 0.0}, {"rope_theta": float("nan")}])
def test_a_spec_with_no_kv_heads_or_no_rope_base_is_refused_not_divided_by(llama_dir, change):
    """The loaders refuse these naming their key; a spec built otherwise must not divide by zero either."""
    spec = ModelSpec.from_hf_config(json.loads((llama_dir / "config.json").read_text()))
    with pytest.raises(ConversionError, match=rf"{next(iter(change))} .*must be positive"):
        dataclasses.replace(spec, **change)


def test_rope_parameters_win_over_a_top_level_rope_theta_as_in_transformers(tmp_path):
    from transformers import LlamaConfig

    hf = make_tiny_hf_dir(tmp_path / "m")
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update({"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}})
    assert ModelSpec.from_hf_config(cfg).rope_theta == 50000.0
    assert LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}).rope_parameters["rope_theta"] == 50000.0


def _llama3_rope() -> dict:
    """A fresh dict each time: transformers' config classes add keys to the one they are given."""
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "rope_theta": 10000.0}


def _tiny_config(tmp_path: Path, **changes) -> dict:
    hf = make_tiny_hf_dir(tmp_path / "m")
    return {**json.loads((hf / "config.json").read_text()), **changes}


def test_a_top_level_original_max_position_embeddings_is_read_as_in_transformers_5(tmp_path):
    """transformers 5 (standardize_rope_params, again when the model is built) lets a top-level key override
    the one in rope_parameters: with only that one, the model it builds counts against it."""
    hf = make_tiny_hf_dir(tmp_path / "m", rope_parameters=_llama3_rope())
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rope_parameters"].pop("original_max_position_embeddings", None)
    (hf / "config.json").write_text(json.dumps({**cfg, "original_max_position_embeddings": 64}))
    ckpt = load_checkpoint(hf)
    assert ckpt.spec.rope_scaling.original_max_position_embeddings == 64
    assert_same_logits(ckpt, hf)  # 64 against the 256 max_position_embeddings changes every rotation


@pytest.mark.parametrize("section", ["rope_scaling", "rope_parameters"])
def test_original_max_position_embeddings_twice_must_agree(tmp_path, section):
    """transformers 4 reads the one in rope_scaling, 5 the top-level one: which is meant is the user's call."""
    rope = {**_llama3_rope(), "original_max_position_embeddings": 32}
    cfg = _tiny_config(tmp_path, **{section: rope}, original_max_position_embeddings=64)
    with pytest.raises(ConversionError, match=rf"config.json sets original_max_position_embeddings twice: 64 at the "
                                              rf"top level and 32 in {section}; .*edit config.json so the two agree"):
        ModelSpec.from_hf_config(cfg)
    agreed = ModelSpec.from_hf_config({**cfg, "original_max_position_embeddings": 32})
    assert agreed.rope_scaling.original_max_position_embeddings == 32


def test_llama3_rope_without_original_max_position_embeddings_says_it_is_needed(tmp_path):
    # transformers 5 would take max_position_embeddings instead (131072 for Llama 3.1, not its 8192)
    cfg = _tiny_config(tmp_path, rope_scaling=_llama3_rope())
    with pytest.raises(ConversionError, match=r"config.json sets llama3 rope scaling without "
                                              r"rope_scaling.original_max_position_embeddings, which llama3 rope "
                                              r"needs: it is the context the model was pretrained with.*Add it"):
        ModelSpec.from_hf_config(cfg)


def test_keys_a_config_lacks_get_transformers_defaults_per_architecture(tmp_path):
    """MistralConfig has 131,072 positions and 8 KV heads, Qwen2Config 32,768 and 32, LlamaConfig 2,048 and
    one per query head, whatever the model; a null num_key_value_heads is one per query head in each."""
    from transformers import AutoConfig

    base = _tiny_config(tmp_path, num_attention_heads=32, head_dim=16, hidden_size=512)
    for arch in ("llama", "mistral", "qwen2"):
        cfg = {k: v for k, v in base.items() if k not in ("max_position_embeddings", "num_key_value_heads")}
        cfg["model_type"] = arch
        spec = ModelSpec.from_hf_config(cfg)
        expected = AutoConfig.for_model(arch, **{k: v for k, v in cfg.items() if k != "model_type"})
        assert (arch, spec.max_position_embeddings, spec.num_kv_heads) == \
            (arch, expected.max_position_embeddings, expected.num_key_value_heads)
        assert ModelSpec.from_hf_config({**cfg, "num_key_value_heads": None}).num_kv_heads == 32


@pytest.mark.parametrize("arch, expected", [("llama", 2048), ("qwen2", 32768)])
def test_a_gguf_without_context_length_gets_what_transformers_gives_it(llama_dir, qwen2_dir, tmp_path, monkeypatch,
                                                                        arch, expected):
    """llama.cpp requires the key; transformers' GGUF loader leaves it to the config class's default."""
    import gguf
    from transformers import AutoConfig

    monkeypatch.setattr(gguf.GGUFWriter, "add_context_length", lambda self, n: None)
    path = write_gguf_from_hf({"llama": llama_dir, "qwen2": qwen2_dir}[arch], tmp_path / "m.gguf")
    assert load_checkpoint(path).spec.max_position_embeddings == expected
    assert AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf").max_position_embeddings == expected
