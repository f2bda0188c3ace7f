"""The Android app's Kotlin tokenizer (android_demo/core) against Hugging Face `tokenizers`.

The Kotlin side runs on the host JVM (kotlin_host) through dev.nomoat.core.TokenizerCli; every
text is encoded and decoded by both, on the real SmolLM2 tokenizer (in the bundle's "a b" merges
form and in `tokenizers`' [a, b] form) and on small Llama 3 / Qwen2-shaped tokenizers trained here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import kotlin_host
import pytest
from real_model import smollm2_gguf_path
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

pytestmark = pytest.mark.android

CLI = "dev.nomoat.core.TokenizerCli"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_PARAGRAPH = " ".join(
    f"Sentence {i}: the model on the phone reads {i * 37} tokens, naïve café costs €{i}.{i % 10}0; "
    f"日本語 {i} and 😀 emoji, don't STOP!\n" for i in range(24)
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France?",
    "def hello(name):\n    if name:\n\t\treturn f'hi {name}'\n\n\n    return None   \n  \n",
    "numbers 12345 3.14 1234567 0.000001 ٣٤٥ Ⅻ ½",
    "don't I'll you're we've I'm she'd it's DON'T I'LL It'S",
    "ſtar\nit'ſtar",  # see _with_words
    "日本語のテキスト 中文字符 한국어",
    "emoji 😀🚀 👩‍💻🏳️‍🌈 👍🏽",
    "naïve café Ångström façade",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|im_start|>",
    "",
    " ",
    "   leading and trailing   ",
    "\n\n\n",
    "tabs\tand\r\nwindows\r\nlines\u000bvt\u0085nel\u00a0nbsp\u3000ideographic\u2028sep",
    "mixed<|endoftext|>   <|im_end|>x",
    "e\u0301 composed é decomposed",  # NFC changes this one
    _PARAGRAPH,
]


def _train(pre_tokenizer, normalizer=None, ignore_merges=False) -> str:
    """A small byte-level BPE of the given shape, trained on the test texts."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    return tok.to_str()


def _with_words(tokenizer_json: str, words: list[str]) -> str:
    """Words added to the vocabulary that no merge reaches: with ignore_merges a pre-token that is
    one of them is that token. "ſtar" (Å¿tar) is one; "'ſtar" would be, were "'ſ" not a
    contraction under (?i:'s) (ſ folds to s), which it is in Oniguruma and must be in Java too."""
    data = json.loads(tokenizer_json)
    vocab = data["model"]["vocab"]
    for word in words:
        vocab[word] = max(vocab.values()) + 1
    return json.dumps(data, ensure_ascii=False)


@pytest.fixture(scope="module")
def smollm2_json() -> str:
    """SmolLM2's tokenizer.json as the converter builds it from the GGUF ([a, b] merges), ~5 s."""
    from nomoat.converter.load_gguf import load_gguf_tokenizer

    return load_gguf_tokenizer(smollm2_gguf_path()).tokenizer_json


def _shapes(smollm2_json: str) -> dict[str, str]:
    from nomoat.converter.tokenizer_json import bundle_tokenizer_json

    return {
        "smollm2-bundle": bundle_tokenizer_json(smollm2_json),  # what a bundle ships: "a b" merges
        "smollm2-pairs": smollm2_json,
        "llama3-style": _with_words(_train(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), ignore_merges=True), ["Å¿tar", "'Å¿tar"]),
        "qwen2-style": _train(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), normalizer=normalizers.NFC()),
        "gpt2-prefix-space": _train(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    }


@pytest.fixture(scope="module", params=["smollm2-bundle", "smollm2-pairs", "llama3-style", "qwen2-style",
                                        "gpt2-prefix-space"])
def shape(request, smollm2_json, tmp_path_factory) -> tuple[Path, Tokenizer]:
    text = _shapes(smollm2_json)[request.param]
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    return path, Tokenizer.from_str(text)


def test_junit_unit_tests():
    kotlin_host.run_junit("dev.nomoat.core.TokenizerTest")


def test_the_shapes_are_the_ones_named(smollm2_json):
    shapes = {name: json.loads(text) for name, text in _shapes(smollm2_json).items()}
    assert isinstance(shapes["smollm2-bundle"]["model"]["merges"][0], str)
    assert isinstance(shapes["smollm2-pairs"]["model"]["merges"][0], list)
    assert shapes["smollm2-bundle"]["pre_tokenizer"]["type"] == "ByteLevel"
    assert shapes["llama3-style"]["model"]["ignore_merges"] is True
    hf = Tokenizer.from_str(_shapes(smollm2_json)["llama3-style"])
    assert hf.encode("ſtar\nit'ſtar").tokens == ["Å¿tar", "Ċ", "it", "'Å¿", "tar"]
    assert [p["type"] for p in shapes["qwen2-style"]["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    assert shapes["qwen2-style"]["normalizer"]["type"] == "NFC"


def python_stream(hf: Tokenizer, ids: list[int]) -> str:
    """What the Python runtime streams for ids (runtime/detokenizer.py: special tokens skipped)."""
    from nomoat.runtime.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(hf)
    return "".join(detok.add(i) for i in ids) + detok.flush()


def test_encode_and_decode_match_hf(shape):
    path, hf = shape
    lines = kotlin_host.run_kotlin(CLI, str(path), input="".join(json.dumps(t) + "\n" for t in TEXTS))
    for text, row in zip(TEXTS, lines.rstrip("\n").split("\n"), strict=True):
        ids, decoded, streamed = (json.loads(part) for part in row.split("\t"))
        expected = hf.encode(text, add_special_tokens=False).ids
        assert ids == expected, f"{text[:60]!r}: {[hf.id_to_token(i) for i in ids]} != " \
                                f"{[hf.id_to_token(i) for i in expected]}"
        assert decoded == hf.decode(expected, skip_special_tokens=False)
        # Streamed as the Python runtime streams: the special tokens in TEXTS give no text.
        assert streamed == python_stream(hf, expected) == hf.decode(expected, skip_special_tokens=True)


def test_decode_of_broken_utf8_matches_hf(smollm2_json, tmp_path):
    """Cut characters and random byte tokens: where U+FFFD goes must agree with Rust's from_utf8_lossy."""
    hf = Tokenizer.from_str(smollm2_json)
    path = tmp_path / "tokenizer.json"
    path.write_text(smollm2_json, encoding="utf-8")
    emoji = hf.encode("a😀日本👩‍💻é", add_special_tokens=False).ids
    byte_tokens = [i for i in map(hf.token_to_id, pre_tokenizers.ByteLevel.alphabet()) if i is not None]
    assert len(byte_tokens) > 200
    rng = random.Random(0)
    cases = [emoji[:k] for k in range(len(emoji) + 1)] + [[i] for i in emoji]
    cases += [emoji[:2] + [hf.token_to_id("<|im_end|>")] + emoji[2:], [49151, 10**6, -1]]
    cases += [rng.choices(byte_tokens, k=rng.randint(1, 12)) for _ in range(300)]
    out = kotlin_host.run_kotlin(CLI, str(path), "--decode", input="".join(json.dumps(c) + "\n" for c in cases))
    for ids, row in zip(cases, out.rstrip("\n").split("\n"), strict=True):
        decoded, streamed = (json.loads(part) for part in row.split("\t"))
        expected = hf.decode([i for i in ids if i >= 0], skip_special_tokens=False)
        assert decoded == expected, ids
        assert streamed == hf.decode([i for i in ids if i >= 0], skip_special_tokens=True), ids
        if len(ids) > 1 and min(ids) >= 0:  # ids the model can write, one at a time
            assert streamed == python_stream(hf, ids), ids
