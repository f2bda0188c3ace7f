"""The Android app's Kotlin tokenizer (android_demo/core) against Hugging Face `tokenizers`.

The Kotlin side runs on the host JVM (kotlin_host) through dev.nomoat.core.TokenizerCli; every
text is encoded and decoded by both, on the real SmolLM2 tokenizer (in the bundle's "a b" merges
form and in `tokenizers`' [a, b] form) and on small Llama 3 / Qwen2-shaped tokenizers trained here.
The stream shows what the Python runtime streams (no special tokens). Split regexes cut text where
`tokenizers`' Oniguruma cuts it, or are refused by name where Java's regex would read them otherwise.
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
    # SmolLM2's digits one by one, then GPT-2's split (converter/gguf_pretokenizer.py, "smollm").
    smollm2_split = shapes["smollm2-bundle"]["pre_tokenizer"]["pretokenizers"]
    assert [(p["type"], p.get("use_regex")) for p in smollm2_split] == [("Split", None), ("ByteLevel", True)]
    assert shapes["gpt2-prefix-space"]["pre_tokenizer"]["type"] == "ByteLevel"
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


# -- the pre-tokenizer's regex: Oniguruma's meaning, or refused ----------------------------------

# Characters from many general categories, all in Unicode for long (the platform's tables may be
# older than Oniguruma's: README, "Tokenizer parity"): digits of several scripts, every kind of space
# and line break, letters with and without case, marks, symbols, punctuation, controls, formats.
SPLIT_TEXTS = [
    "abc ABC 123 ٣٤٥ ১২৩ ０１２ Ⅻ ½ ² deadBEEF 0x1f",
    "tabs\tand\r\nwindows\r\nlines\u000bvt\u000cff\u0085nel\u00a0nbsp\u3000ideo\u2028ls\u2029ps\u1680\u202f\u205f",
    "naïve café Ωmega ǅemal ʰmod ſtar K\u212a e\u0301 ⃝ा 日本語 한국어 ไทย",
    "snake_case ß_ü ‿ — – (x) [y] {z} «q» ‘s’ “d” !? ¿¡ §¶ € $ £ + = < > | ~ ^ ` © ® ™ ∑ ≠ 😀 👩‍💻",
    "ctl\u0000\u0001\u0007\u001b\u007f fmt\u00ad\u200b\u200d\u2060\ufeff pua\ue000 don't I'LL it'ſ",
    "{brace} a{2} aa{,2} x{1,3} /path/to\\file #tag @user 'quote' \"dq\" a.b-c_d",
]

O200K_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_REGEX = r"[\r\n]|\s?[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s+(?!\S)|\s+|\p{N}{1,3}"

# Regexes the app runs: real tokenizers', then one construct at a time, most of them read differently
# by Java's regex engines unless translated.
SAME_SPLIT = [
    LLAMA3_REGEX, QWEN2_REGEX, O200K_REGEX, DEEPSEEK_REGEX,
    r"\d+", r"\D+", r"[\d_]+", r"[^\d\s]+", r"\h+", r"\H+", r"[\h.]+", r"\v", r"[\v\t]+",
    r"\x41+", r"\x7", r"\x{e9}", r"\u00e9", r"\x{1F600}", r"[\x{3000}\x20]+",
    r"\p{lu}+", r"\p{Uppercase_Letter}+", r"\p{^L}+", r"\P{^N}+", r"[\P{L}]+", r"\p{LC}+", r"\p{Nd}+",
    r"\p{Combining Mark}+", r"\p{Zs}|\p{Cc}|\p{Cf}|\p{Co}", r"\p{Pi}\p{L}*\p{Pf}?", r"\p{Sc}|\p{Sk}|\p{Sm}|\p{So}",
    r".", r".+", r"a{,2}", r"a?", r"\d{0,2}", r"\{brace}", r"a{2}|x{1,3}?", r"{", r"\A\p{L}+|\p{L}+\z",
    r"[\-\/\\#@'\"]+",
    r"\t|\n|\r|\f|\a|\e", r"(?i:'s|'t)|(?i)ll|d", r"(?i:k)+|(?-i:K)",
]


def test_pre_tokenizer_regexes_split_as_tokenizers_does():
    """Each regex splits each text into the pieces `tokenizers`' Split (Isolated) makes; so does every split
    the converter gives a GGUF's tokenizer."""
    from nomoat.converter.gguf_pretokenizer import _SPLITS as GGUF_SPLITS

    cases = [(regex, text) for regex in [*SAME_SPLIT, *sorted(set(GGUF_SPLITS.values()))] for text in SPLIT_TEXTS]
    for (regex, text), pieces in zip(cases, kotlin_split(cases), strict=True):
        assert pieces == [p for p, _ in pre_tokenizers.Split(Regex(regex), "isolated").pre_tokenize_str(text)], \
            (regex, text)


# Oniguruma constructs that Java reads differently, and the name the refusal gives each.
REFUSED = [
    (r"\w+", r"\w"), (r"\W+", r"\W"), (r"\bx", r"\b"), (r"\Bx", r"\B"), (r"[^\S\n]+", r"\S inside [...]"),
    (r"[\H]", r"\H inside [...]"), (r"\R", r"\R"), (r"\X", r"\X"), (r"\N", r"\N"), (r"\O", r"\O"), (r"a\Kb", r"\K"),
    (r"\Gx", r"\G"), (r"x\Z", r"\Z"), (r"\Qx", r"\Q"), (r"(a)\1", r"\1"), (r"\cA", r"\c"), (r"\y", r"\y"),
    (r"^\s+", "^"), (r"\s+$", "$"), (r"(?m:.)", "(?m)"), (r"(?x) a", "(?x)"), (r"[[:alpha:]]+", "[:...:]"),
    (r"xa{2}?", "{2}?"), (r"a{1,2}+", "{1,2}+"), (r"a{2}+", "{2}+"), (r"\p{Alpha}", r"\p{Alpha}"),
    (r"\p{Han}+", r"\p{Han}"), (r"\p{Latin}", r"\p{Latin}"), (r"(?i)\p{Lu}", r"\p{Lu} inside (?i)"),
    (r"(?i:[\p{Ll}])", r"\p{Ll} inside (?i)"), (r"\é", r"\é"), (r"\x", r"\x"),
]


def test_regex_constructs_java_reads_differently_are_refused_by_name():
    for (regex, named), answer in zip(REFUSED, kotlin_split([(regex, "x") for regex, _ in REFUSED]), strict=True):
        Regex(regex)  # Oniguruma takes it: a bundle could have it
        refusal = answer["error"]
        assert f"uses {named} (" in refusal and "cannot run as `tokenizers` does" in refusal, (regex, refusal)


def kotlin_split(cases: list[tuple[str, str]]) -> list:
    """TokenizerCli --split: the pieces of each text by its regex, or {"error": ...} where the app refuses it."""
    out = kotlin_host.run_kotlin(CLI, "--split", input="".join(json.dumps(list(case)) + "\n" for case in cases))
    return [json.loads(line) for line in out.splitlines()]
