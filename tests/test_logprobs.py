"""Logprobs (SDK and OpenAI server) and OpenAI's frequency / presence penalties."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nomoat.runtime import Model, SamplingParams
from nomoat.runtime.logprobs import TokenText, token_logprob
from nomoat.runtime.sampling import Sampler
from test_detokenizer import KINDS, TEXTS, tokenizers_by_kind  # noqa: F401 - the fixture, shared

REPO = Path(__file__).resolve().parents[1]


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - (row.max() + np.log(np.exp(row - row.max()).sum()))


# -- the numbers --------------------------------------------------------------------------------------


def test_token_logprob_is_the_log_softmax_and_its_top_is_sorted():
    rng = np.random.default_rng(0)
    row = (rng.standard_normal(49_152) * 4).astype(np.float32)
    expected = log_softmax(row)
    scored = token_logprob(row, 123, top=5)
    assert scored.token_id == 123
    assert scored.logprob == pytest.approx(expected[123], abs=1e-5)
    best = np.argsort(-expected)[:5]
    assert [i for i, _ in scored.top] == best.tolist()
    assert [lp for _, lp in scored.top] == pytest.approx(expected[best].tolist(), abs=1e-5)
    assert math.fsum(math.exp(v) for v in expected) == pytest.approx(1.0)
    assert token_logprob(row, 7).top == ()  # top=0: the token's own alone


@pytest.mark.parametrize("kind", KINDS)
def test_token_bytes_join_to_the_decoded_text_even_inside_characters(tokenizers_by_kind, kind):  # noqa: F811
    tokenizer = tokenizers_by_kind[kind]
    tokens = TokenText(tokenizer)
    split_inside_a_character = False
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        joined = b"".join(tokens.bytes_of(i) for i in ids)
        decoded = tokenizer.decode(ids)
        # SentencePiece writes the first word's space too, which its decoders drop from the whole text.
        assert joined.decode("utf-8") in (decoded, " " + decoded), (kind, text)
        split_inside_a_character |= any("\ufffd" in tokens.text_of(i) for i in ids)
    assert split_inside_a_character  # the premise: some token is a part of a character


def test_an_added_token_is_its_own_text(tokenizers_by_kind):  # noqa: F811
    tokenizer = tokenizers_by_kind["byte_level"]
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert TokenText(tokenizer).bytes_of(im_end) == b"<|im_end|>"


def test_a_token_text_is_freed_with_its_model_after_use(tokenizers_by_kind):  # noqa: F811
    """Its cache is its own: an lru_cache on the method kept self (and the tokenizer) in a class-wide cache."""
    import gc
    import weakref

    tokens = TokenText(tokenizers_by_kind["byte_level"])
    assert tokens.bytes_of(5) == tokens.bytes_of(5)  # the second from the cache
    freed = weakref.ref(tokens)
    del tokens
    gc.collect()
    assert freed() is None


def test_the_token_cache_is_bounded(tokenizers_by_kind, monkeypatch):  # noqa: F811
    from nomoat.runtime import logprobs

    monkeypatch.setattr(logprobs, "_CACHED_TOKENS", 8)  # the tiny vocabulary is below the real bound
    tokenizer = tokenizers_by_kind["byte_level"]
    tokens = TokenText(tokenizer)
    for i in range(20):
        tokens.bytes_of(i)
    assert tokens.bytes_of.cache_info().currsize == 8
    before = tokens.bytes_of.cache_info()
    tokens.bytes_of(12)  # among the last 8: from the cache
    assert tokens.bytes_of.cache_info().hits == before.hits + 1
    tokens.bytes_of(11)  # the oldest went first
    assert tokens.bytes_of.cache_info().misses == before.misses + 1
    assert tokens.bytes_of(0) == TokenText(tokenizer).bytes_of(0)


# -- penalties ----------------------------------------------------------------------------------------


def penalized_reference(logits, history, prompt_length, repetition, frequency, presence):
    """llama.cpp's chain, written out: the repetition penalty over the whole history, then frequency and
    presence over the answer (the ids past the prompt), as OpenAI and vLLM count them."""
    out = logits.astype(np.float64)
    for token in set(history.tolist()):
        value = out[token]
        out[token] = value * repetition if value < 0 else value / repetition
    answer = history[prompt_length:]
    for token in set(answer.tolist()):
        out[token] -= (answer == token).sum() * frequency + presence
    return out


def test_frequency_and_presence_penalties_subtract_per_count_and_once_after_the_repetition_penalty():
    rng = np.random.default_rng(1)
    changed = 0
    for _ in range(200):
        logits = rng.standard_normal(40).astype(np.float32)
        history, prompt_length = rng.integers(0, 40, size=12), int(rng.integers(0, 12))
        repetition, frequency, presence = rng.uniform(1.0, 1.5), rng.uniform(-0.5, 1.0), rng.uniform(-0.5, 1.0)
        params = SamplingParams(repetition_penalty=repetition, frequency_penalty=frequency, presence_penalty=presence)
        before = logits.copy()
        chosen = Sampler(params).sample(logits, history, prompt_length=prompt_length)
        expected = penalized_reference(logits, history, prompt_length, repetition, frequency, presence)
        assert chosen == int(np.argmax(expected))
        np.testing.assert_array_equal(logits, before)  # the caller's logits are left alone
        changed += chosen != int(np.argmax(logits))
    assert changed > 20  # the premise: the penalties decided the choice often


def test_a_presence_penalty_moves_greedy_off_a_seen_token_and_repeat_last_n_bounds_it():
    logits = np.array([0.0, 2.0, 1.8, 0.5], dtype=np.float32)
    assert Sampler(SamplingParams()).sample(logits, [1]) == 1
    assert Sampler(SamplingParams(presence_penalty=0.5)).sample(logits, [1]) == 2
    assert Sampler(SamplingParams(frequency_penalty=0.1)).sample(logits, [1]) == 1  # 1.9 > 1.8
    assert Sampler(SamplingParams(frequency_penalty=0.1)).sample(logits, [1, 1, 1]) == 2  # 1.7 < 1.8
    # Only the last repeat_last_n tokens count; 0 turns every penalty off.
    assert Sampler(SamplingParams(presence_penalty=0.5, repeat_last_n=1)).sample(logits, [1, 3]) == 1
    assert not SamplingParams(presence_penalty=0.5, repeat_last_n=0).penalized
    assert SamplingParams(frequency_penalty=-0.5).penalized  # negative values encourage, as OpenAI's


def test_frequency_and_presence_count_the_answer_not_the_prompt():
    # A chat prompt holds an end-of-turn token per message: counted, they would push the stop token below
    # reach and the answer would not end. OpenAI and vLLM count the generated text only.
    logits = np.array([0.0, 2.0, 1.8, 0.5], dtype=np.float32)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.5)
    assert Sampler(params).sample(logits, [1, 1, 1], prompt_length=3) == 1  # all prompt
    assert Sampler(params).sample(logits, [1, 1, 1], prompt_length=2) == 2  # the last 1 is the answer's
    # ... while the repetition penalty reads the prompt too, as transformers' does
    assert Sampler(SamplingParams(repetition_penalty=1.2)).sample(logits, [1], prompt_length=1) == 2


def test_generation_tells_the_sampler_where_the_answer_starts(model, monkeypatch):
    seen = []
    original = Sampler.sample

    def spy(self, logits, previous_ids=(), prompt_length=0):
        seen.append((len(previous_ids), prompt_length))
        return original(self, logits, previous_ids, prompt_length)

    monkeypatch.setattr(Sampler, "sample", spy)
    prompt = model.prompt_ids("Hello")
    model.generate("Hello", 3, temperature=0, presence_penalty=1.0)
    assert seen and all(length == len(prompt) for _, length in seen)
    assert [n for n, _ in seen] == list(range(len(prompt), len(prompt) + len(seen)))


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
def test_a_penalty_that_is_not_a_finite_number_is_refused(field):
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: bad})


def test_the_cli_takes_the_penalties_and_refuses_a_bad_one(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nomoat", "generate", str(tmp_path), "--prompt", "x",
                             "--presence-penalty", "nan"], capture_output=True, text=True)
    assert result.returncode == 2 and "presence_penalty must be a finite number" in result.stderr, result.stderr


# -- the runtime --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    from tiny_models import tiny_fp32_bundle

    return Model.load(tiny_fp32_bundle(tmp_path_factory, max_context=256), threads=1)


def test_each_streamed_token_carries_the_log_softmax_of_the_logits_it_came_from(model):
    prompt = model.prompt_ids("Tell me about small models.")
    completion = model.generate("Tell me about small models.", 12, logprobs=3, temperature=0)
    assert completion.token_ids and len(completion.logprobs) == len(completion.token_ids)
    reference = model.logits(prompt + completion.token_ids[:-1])[len(prompt) - 1:]
    for position, (token, scored) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        expected = log_softmax(reference[position])
        assert scored.token_id == token
        assert scored.logprob == pytest.approx(expected[token], abs=1e-3)
        assert len(scored.top) == 3 and scored.top[0][0] == token  # greedy: the token is the most likely
        assert [lp for _, lp in scored.top] == sorted((lp for _, lp in scored.top), reverse=True)


def test_logprobs_leave_the_answer_alone_and_are_off_unless_asked(model):
    plain = model.generate("Name a colour.", 10, temperature=0)
    scored = model.generate("Name a colour.", 10, logprobs=0, temperature=0)
    assert scored.token_ids == plain.token_ids and plain.logprobs == []
    assert all(s.top == () for s in scored.logprobs)
    # The server's --prompt-lookup meets such a request in stream_ids, which runs it without lookup
    # (the SDK's stream refuses the two together).
    events = list(model.stream_ids(model.prompt_ids("Name a colour."), 10, params=model.sampling_params(temperature=0),
                                   prompt_lookup=4, logprobs=0))
    assert [e.token_id for e in events if e.token_id is not None] == plain.token_ids
    assert events[-1].stats.drafted_tokens == 0
    with pytest.raises(ValueError, match="logprobs must be at least 0"):
        model.generate("x", 2, logprobs=-1)


def test_a_chat_turn_gives_logprobs_and_sampled_ones_score_the_drawn_token(model):
    chat = model.chat()
    answer = chat.send("Hello!", 6, logprobs=1, temperature=1.2, seed=3)
    assert [s.token_id for s in answer.logprobs] == answer.token_ids
    assert all(s.logprob <= s.top[0][1] + 1e-6 for s in answer.logprobs)


def test_the_penalties_reach_generation_through_the_sdk(model):
    plain = model.generate("Say the same word again and again:", 24, temperature=0)
    penalized = model.generate("Say the same word again and again:", 24, temperature=0, presence_penalty=2.0,
                               frequency_penalty=2.0)
    assert penalized.token_ids != plain.token_ids
    repeats = len(plain.token_ids) - len(set(plain.token_ids))
    assert len(penalized.token_ids) - len(set(penalized.token_ids)) < repeats


def test_legacy_logprobs_write_a_part_of_a_character_as_its_bytes():
    sys.path.insert(0, str(REPO))
    from nomoat.runtime.logprobs import TokenLogprob

    from pi_demo.openai_api import completion_logprobs

    class Pieces:  # 🎉 is f0 9f 8e 89: two tokens of two bytes each, then "a"
        table = {1: b"\xf0\x9f", 2: b"\x8e\x89", 3: b"a"}

        def bytes_of(self, token_id: int) -> bytes:
            return self.table[token_id]

    scored = [TokenLogprob(1, -0.1, ((1, -0.1), (2, -2.0), (3, -3.0))), TokenLogprob(3, -0.5, ((2, -0.2),))]
    body = completion_logprobs(scored, [0, 1], Pieces())
    assert body["tokens"] == ["bytes:\\xf0\\x9f", "a"]
    # two parts of characters are two keys, not one U+FFFD that the later one overwrote
    assert body["top_logprobs"] == [{"bytes:\\xf0\\x9f": -0.1, "bytes:\\x8e\\x89": -2.0, "a": -3.0},
                                    {"bytes:\\x8e\\x89": -0.2, "a": -0.5}]
