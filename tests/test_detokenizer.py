"""IncrementalDetokenizer against small tokenizers trained here: byte-level BPE (GPT-2/LLaMA-3 style)
and SentencePiece-style BPE with byte fallback (LLaMA-2/Mistral style), two decoder chains."""

from __future__ import annotations

import random

import pytest
from nomoat.runtime.detokenizer import MAX_WINDOW_TOKENS, IncrementalDetokenizer
from tiny_models import CORPUS, llama2_decoder, sentencepiece_parts, sentencepiece_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXTS = [
    "Hello world",
    "👋🏽🎉",
    "你好世界",
    "Say 👋🏽 to 你好世界 and 🎉!",
    "line one\nline two\n\n  indented 東京\n",
    " leading space and  double  spaces ",
    "Emoji🚀run🚀together😀😀😀 café naïve résumé",
    "a",
    "",
    "The quick brown fox jumps over the lazy dog. " * 6 + "你好 👋🏽",
]

def _byte_level_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # A vocabulary barely above the 256 byte symbols: emoji and CJK stay split into byte pieces.
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers_by_kind() -> dict[str, Tokenizer]:
    vocab, merges = sentencepiece_parts()
    metaspace = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    # The chain LLaMA-2's tokenizer.json uses: the leading space is stripped from the whole text.
    llama2 = llama2_decoder()
    return {
        "byte_level": _byte_level_tokenizer(),
        "metaspace": sentencepiece_tokenizer(vocab, merges, metaspace),
        "llama2_decoder": sentencepiece_tokenizer(vocab, merges, llama2),
    }


KINDS = ["byte_level", "metaspace", "llama2_decoder"]


def stream(tokenizer, ids, skip_special_tokens=True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(token_id) for token_id in ids]
    return deltas, detok.flush()


def test_fixtures_really_split_characters(tokenizers_by_kind):
    # Guard the premise: without split characters the streaming tests below would prove nothing.
    byte_level = tokenizers_by_kind["byte_level"]
    for text in ["👋🏽🎉", "你好世界"]:
        ids = byte_level.encode(text).ids
        assert len(ids) > len(text)
        assert any(byte_level.decode([i]) == "\ufffd" for i in ids)
    sentencepiece = tokenizers_by_kind["metaspace"]
    tokens = sentencepiece.encode(" ".join(TEXTS)).tokens
    assert any(t.startswith("<0x") for t in tokens), "no byte-fallback token in the test texts"
    assert sum(t.startswith("▁") for t in tokens) > 10


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_without_partial_characters(
    tokenizers_by_kind, kind, skip_special_tokens, text
):
    tokenizer = tokenizers_by_kind[kind]
    ids = tokenizer.encode(text).ids
    deltas, tail = stream(tokenizer, ids, skip_special_tokens)
    assert not any("\ufffd" in delta for delta in deltas)
    assert tail == ""
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_between_words(tokenizers_by_kind, kind, skip_special_tokens):
    tokenizer = tokenizers_by_kind[kind]
    special = tokenizer.token_to_id("</s>" if kind != "byte_level" else "<|im_end|>")
    bos = tokenizer.token_to_id("<s>" if kind != "byte_level" else "<|im_start|>")
    ids = [bos] + tokenizer.encode("Hello 👋🏽 world").ids + [special] * 25
    ids += tokenizer.encode("again 你好").ids + [special]
    deltas, tail = stream(tokenizer, ids, skip_special_tokens)
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in delta for delta in deltas)


def test_sentencepiece_keeps_spaces_of_mid_sentence_words(tokenizers_by_kind):
    # Decoding tokens one by one would drop every space: the decoder strips '▁' of a first token.
    tokenizer = tokenizers_by_kind["metaspace"]
    ids = tokenizer.encode("Hello world there").ids
    assert "".join(tokenizer.decode([i]) for i in ids) != "Hello world there"
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == "Hello world there"


def test_incomplete_character_is_held_until_flush(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["byte_level"]
    ids = tokenizer.encode("ok 👋").ids
    partial = ids[:-1]  # the emoji's last byte piece never arrives
    deltas, tail = stream(tokenizer, partial)
    assert "".join(deltas) == "ok "
    assert tail == "\ufffd"
    assert "".join(deltas) + tail == tokenizer.decode(partial)


def test_flush_then_continue(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["metaspace"]
    ids = tokenizer.encode("Hello 你好 world").ids
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.add(i) for i in ids[:3]] + [detok.flush()] + [detok.add(i) for i in ids[3:]]
    assert "".join(out) + detok.flush() == tokenizer.decode(ids)
    assert detok.ids == ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_byte_level_ids_even_invalid_utf8(tokenizers_by_kind, skip_special_tokens):
    # Byte-level decoding is lossy UTF-8 over the whole byte string, so the stream matches decode()
    # even for garbage byte sequences (U+FFFD included), as long as it is held back and flushed.
    tokenizer = tokenizers_by_kind["byte_level"]
    rng = random.Random(1234)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(rng.randrange(1, 80))]
        deltas, tail = stream(tokenizer, ids, skip_special_tokens)
        assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", ["metaspace", "llama2_decoder"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_sentencepiece_ids(tokenizers_by_kind, kind, skip_special_tokens):
    # Byte tokens are left out: ByteFallback replaces a whole run of byte tokens if any byte is bad,
    # which no stream can match before the run ends (documented in the module).
    tokenizer = tokenizers_by_kind[kind]
    vocab = tokenizer.get_vocab()
    allowed = sorted(i for token, i in vocab.items() if not token.startswith("<0x"))
    rng = random.Random(99)
    for _ in range(200):
        ids = [rng.choice(allowed) for _ in range(rng.randrange(1, 80))]
        deltas, tail = stream(tokenizer, ids, skip_special_tokens)
        assert tail == ""
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class _CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call received."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_work_per_token_is_bounded(tokenizers_by_kind, kind):
    tokenizer = tokenizers_by_kind[kind]
    ids = tokenizer.encode(" ".join(TEXTS) * 8).ids
    assert len(ids) > 1000
    counting = _CountingTokenizer(tokenizer)
    deltas, tail = stream(counting, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    # The window slides at character boundaries, so it can overshoot by the pieces of one character
    # (at most 4 bytes, hence 4 byte-level tokens) before sliding back.
    assert max(counting.sizes) <= MAX_WINDOW_TOKENS + 4
    assert len(counting.sizes) < 1.2 * len(ids) + 2  # about one decode per token


# -- A continuation of a prompt (a text completion) ---------------------------------------------------

PROMPT = "The quick brown fox"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", ["jumps over", "你好 👋🏽 world", "over the lazy dog. " * 4])
def test_a_continuation_streams_as_it_reads_after_its_prompt(tokenizers_by_kind, kind, text):
    """With the prompt as context the stream is the full text past the prompt's: the first word
    keeps its space, which LLaMA-2's decoder strips from a first token decoded alone."""
    tokenizer = tokenizers_by_kind[kind]
    prompt, answer = tokenizer.encode(PROMPT).ids, tokenizer.encode(" " + text).ids
    expected = tokenizer.decode(prompt + answer)[len(tokenizer.decode(prompt)):]
    assert expected.startswith(" ")
    detok = IncrementalDetokenizer(tokenizer, context=prompt)
    deltas = [detok.add(token_id) for token_id in answer]
    assert "".join(deltas) + detok.flush() == expected
    assert detok.ids == answer
    assert not any("\ufffd" in delta for delta in deltas)
    if kind == "llama2_decoder":  # what the context is for
        assert not "".join(stream(tokenizer, answer)[0]).startswith(" ")


def test_a_context_that_ends_inside_a_character_or_renders_nothing_is_not_used(tokenizers_by_kind):
    byte_level = tokenizers_by_kind["byte_level"]
    answer = byte_level.encode(" ok").ids
    cut = byte_level.encode("hi 👋").ids[:-1]  # the emoji's last piece would come with the answer
    assert byte_level.decode(cut).endswith("\ufffd")
    bos = byte_level.token_to_id("<|im_start|>")
    for context in (cut, [bos]):
        detok = IncrementalDetokenizer(byte_level, context=context)
        assert "".join(detok.add(t) for t in answer) + detok.flush() == byte_level.decode(answer)


@pytest.mark.parametrize("kind", ["metaspace", "llama2_decoder"])
@pytest.mark.parametrize("tail", ["🌞ǂ", "🦀Ω"])
def test_a_context_whose_last_tokens_start_inside_a_character_is_widened(tokenizers_by_kind, kind, tail):
    """A prompt ending in characters outside the vocabulary (byte-fallback tokens, a newline too in
    LLaMA-2's): its last few tokens start mid-character and the whole byte run decodes as U+FFFD;
    dropped, that context cost the answer's first space."""
    tokenizer = tokenizers_by_kind[kind]
    prompt, answer = tokenizer.encode(f"{PROMPT} {tail}").ids, tokenizer.encode(" jumps over").ids
    assert "\ufffd" in tokenizer.decode(prompt[-4:])  # what makes the case: the short context starts mid-character
    expected = tokenizer.decode(prompt + answer)[len(tokenizer.decode(prompt)):]
    detok = IncrementalDetokenizer(tokenizer, context=prompt)
    assert "".join(detok.add(token_id) for token_id in answer) + detok.flush() == expected
