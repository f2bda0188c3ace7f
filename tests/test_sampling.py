from __future__ import annotations

import os
import subprocess
import sys
import warnings
from itertools import pairwise

import numpy as np
import pytest
from nomoat.runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def draws(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler.sample(logits, []) for _ in range(n)])


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Upper 0.1% points of the chi-square distribution; the draws use a fixed seed, so these tests are
# deterministic, and a correct sampler passes them with a wide margin.
CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47, 7: 24.32}

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=np.float32)


# --- parameters -------------------------------------------------------------------------------


def test_defaults_are_greedy_with_every_filter_off():
    params = SamplingParams()
    assert params.greedy
    assert (params.top_k, params.top_p, params.min_p, params.repetition_penalty) == (0, 1.0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature must be >= 0"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("temperature", "0.7", "temperature must be a finite number"),
        ("top_k", -1, "top_k must be >= 0"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("top_p", -0.1, r"top_p must be in \[0, 1\]"),
        ("top_p", 1.5, r"top_p must be in \[0, 1\]"),
        ("min_p", -0.01, r"min_p must be in \[0, 1\]"),
        ("min_p", 1.01, r"min_p must be in \[0, 1\]"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
        ("repetition_penalty", 1e-300, "repetition_penalty must be > 0"),  # 0 in float32, where it divides
        ("repetition_penalty", float("inf"), "repetition_penalty must be a finite number"),
        ("seed", -3, "seed must be a non-negative integer"),
        ("seed", 1.5, "seed must be an integer"),
        ("repeat_last_n", -2, "repeat_last_n must be >= -1"),
        ("repeat_last_n", 2.0, "repeat_last_n must be an integer"),
    ],
)
def test_out_of_range_values_are_rejected_with_a_clear_message(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_from_dict_ignores_none_and_rejects_unknown_keys():
    params = SamplingParams.from_dict({"temperature": 0.7, "top_p": None, "top_k": 40, "seed": None})
    assert params == SamplingParams(temperature=0.7, top_k=40)
    with pytest.raises(ValueError, match="topk"):
        SamplingParams.from_dict({"topk": 40})


def test_params_are_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


# --- greedy and repetition penalty -------------------------------------------------------------


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingParams())
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert sampler.sample(logits, []) == int(np.argmax(logits))


def test_repetition_penalty_changes_the_choice():
    # Token 0 leads, but it was already generated; the penalty halves its (positive) logit.
    logits = np.array([3.0, 2.0, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams()).sample(logits, [0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=2.0)).sample(logits, [0]) == 1


def test_repeat_last_n_limits_the_penalty_to_the_last_ids():
    # Penalized by 4, token 0 (3.0) and token 1 (2.0) both fall below token 2 (1.0).
    logits = np.array([3.0, 2.0, 1.0], dtype=np.float32)

    def pick(history: list[int], n: int) -> int:
        return Sampler(SamplingParams(repetition_penalty=4.0, repeat_last_n=n)).sample(logits, history)

    assert pick([0, 1], -1) == pick([0, 1], 2) == 2  # the whole history, as transformers
    assert pick([0, 1], 1) == 0  # llama.cpp's window: only the last id (1) is penalized
    assert pick([1, 0], 1) == 1  # ... the last, not the first
    assert pick([0, 1], 0) == 0 and not SamplingParams(repetition_penalty=4.0, repeat_last_n=0).penalized


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([4.0, -4.0, 1.0, 0.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, np.array([0, 1, 1, 3]), 2.0, np.empty_like(logits))
    np.testing.assert_array_equal(out, [2.0, -8.0, 1.0, 0.0])
    np.testing.assert_array_equal(logits, [4.0, -4.0, 1.0, 0.0])  # the caller's array is untouched


@pytest.mark.parametrize("params, history, prompt_length, want", [
    ({"repetition_penalty": 1e-40}, [0], 0, 0),  # 3 / 1e-40 is past float32: the seen id wins
    ({"repetition_penalty": 1e40}, [2, 0], 0, 1),  # 3 / 1e40 ~ 0 and -1 * 1e40 past float32
    ({"presence_penalty": -1e300, "temperature": 1.0}, [0], 0, 0),
    ({"frequency_penalty": 1e300, "repetition_penalty": 1e-40}, [0], 0, 1),  # +inf, then -inf: both finite
    # the largest finite logits of both signs in one row, sampled: their gap passes float32's range
    ({"repetition_penalty": 1e-40, "frequency_penalty": 1e300, "temperature": 1.0}, [0, 2], 1, 0),
])
def test_extreme_penalties_stay_finite_and_quiet(params, history, prompt_length, want):
    # Not an overflow warning nor "cannot sample: the largest logit is inf" (which blames the model).
    logits = np.array([3.0, 1.0, -1.0], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = {Sampler(SamplingParams(**params, seed=s)).sample(logits, history, prompt_length) for s in range(20)}
    assert out == {want}


def test_negative_logits_get_more_negative_under_penalty():
    logits = np.array([-1.0, -1.5], dtype=np.float32)
    assert Sampler(SamplingParams(repetition_penalty=2.0)).sample(logits, np.array([0])) == 1


# --- filters --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_equals_greedy_at_any_temperature(temperature):
    rng = np.random.default_rng(1)
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=3))
    for _ in range(50):
        logits = rng.standard_normal(5000).astype(np.float32)
        assert sampler.sample(logits, []) == int(np.argmax(logits))


def test_small_top_p_keeps_only_the_top_token():
    picks = draws(SamplingParams(temperature=1.0, top_p=0.05, seed=0), LOGITS, 300)
    assert set(picks) == {0}


def test_top_p_zero_keeps_the_top_token_even_among_equals():
    """OpenAI, transformers and llama.cpp take 0; transformers keeps the most likely token (its first)."""
    picks = draws(SamplingParams(temperature=1.0, top_p=0.0, seed=0), LOGITS, 300)
    assert set(picks) == {int(np.argmax(LOGITS))}
    flat = np.zeros(16, np.float32)  # every token as likely: the first one
    assert draws(SamplingParams(temperature=1.0, top_p=0.0, seed=1), flat, 50).tolist() == [0] * 50


@pytest.mark.parametrize("top_p", [1e-8, 1e-9, 1e-17])
def test_a_vanishing_top_p_keeps_the_top_token(top_p):
    """Its bound rounds to the top weight (float32 in numpy 2, 1 - top_p = 1 in float64): the top stays."""
    assert set(draws(SamplingParams(temperature=1.0, top_k=1, top_p=top_p, seed=0), LOGITS, 20)) == {0}
    flat = np.zeros(16, np.float32)  # every token tied at the top: the first one, as with top_p=0
    assert draws(SamplingParams(temperature=1.0, top_p=top_p, seed=1), flat, 20).tolist() == [0] * 20


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = softmax(LOGITS.astype(np.float64))
    # The top two hold 0.65 of the mass, the top three 0.80: top_p=0.7 keeps exactly three.
    assert probs[:2].sum() < 0.7 < probs[:3].sum()
    picks = draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0), LOGITS, 3000)
    assert set(picks) == {0, 1, 2}
    counts = np.bincount(picks, minlength=3)[:3]
    assert chi_square(counts, probs[:3] / probs[:3].sum()) < CHI2_999[2]


def test_min_p_filters_relative_to_the_top_probability():
    # p_i / p_max = exp(l_i - 2): 1, .61, .37, .22, .14, ... so min_p=0.3 keeps tokens 0..2.
    picks = draws(SamplingParams(temperature=1.0, min_p=0.3, seed=0), LOGITS, 2000)
    assert set(picks) == {0, 1, 2}


def test_top_k_distribution_is_the_renormalized_softmax():
    picks = draws(SamplingParams(temperature=1.0, top_k=4, seed=5), LOGITS, 5000)
    assert set(picks) <= {0, 1, 2, 3}
    probs = softmax(LOGITS[:4].astype(np.float64))
    assert chi_square(np.bincount(picks, minlength=4), probs) < CHI2_999[3]


def test_top_k_keeps_ties_with_the_kth_value():
    logits = np.array([5.0, 1.0, 1.0, 1.0, -2.0], dtype=np.float32)
    picks = draws(SamplingParams(temperature=1.0, top_k=2, seed=0), logits, 2000)
    assert set(picks) == {0, 1, 2, 3}


def test_large_vocab_top_k_matches_a_full_sort():
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(50_000) * 3).astype(np.float32)
    top = set(np.argsort(-logits)[:10].tolist())
    picks = draws(SamplingParams(temperature=2.0, top_k=10, seed=0), logits, 500)
    assert set(picks) <= top and len(set(picks)) > 5


def test_filters_combine_in_hf_order():
    # top_k=5 then top_p over the renormalized five, then min_p relative to the top token.
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.9, min_p=0.2, seed=0)
    probs5 = softmax(LOGITS[:5].astype(np.float64))
    nucleus = int(np.searchsorted(np.cumsum(probs5) - probs5, 0.9))  # tokens whose mass above < 0.9
    expected = {i for i in range(nucleus) if probs5[i] >= 0.2 * probs5[0]}
    assert set(draws(params, LOGITS, 2000)) == expected


# --- the draw ---------------------------------------------------------------------------------


def test_temperature_1_matches_softmax():
    picks = draws(SamplingParams(temperature=1.0, seed=42), LOGITS, 10_000)
    counts = np.bincount(picks, minlength=len(LOGITS))
    assert chi_square(counts, softmax(LOGITS.astype(np.float64))) < CHI2_999[7]


def test_temperature_scales_the_logits():
    picks = draws(SamplingParams(temperature=2.0, seed=4), LOGITS, 10_000)
    counts = np.bincount(picks, minlength=len(LOGITS))
    assert chi_square(counts, softmax(LOGITS.astype(np.float64) / 2.0)) < CHI2_999[7]


@pytest.mark.parametrize("temperature", [1e-20, 1e-39, 1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy_not_an_error(temperature):
    """1/T overflows float32 below ~3e-39 (and float64 below ~5e-309): the top logit's 0 * inf was NaN."""
    rng = np.random.default_rng(2)
    for top_k, top_p in ((0, 1.0), (40, 1.0), (0, 0.9)):
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=5))
        for _ in range(20):
            logits = rng.standard_normal(5000).astype(np.float32)
            assert sampler.sample(logits, []) == int(np.argmax(logits))
    ties = np.array([1.0, 3.0, 3.0, -np.inf], dtype=np.float32)  # exact ties stay a fair choice
    assert set(draws(SamplingParams(temperature=temperature, seed=0), ties, 200)) == {1, 2}


def test_large_vocab_draw_matches_softmax_over_blocks():
    # 5000 candidates take the two-level (block) draw; group them into 4 ranges to test the mass.
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(5000).astype(np.float32)
    picks = draws(SamplingParams(temperature=1.0, seed=11), logits, 10_000)
    edges = [0, 1024, 2048, 4000, 5000]
    probs = softmax(logits.astype(np.float64))
    expected = np.array([probs[a:b].sum() for a, b in pairwise(edges)])
    counts = np.array([((picks >= a) & (picks < b)).sum() for a, b in pairwise(edges)])
    assert chi_square(counts, expected) < CHI2_999[3]


def test_masked_tokens_are_never_drawn():
    logits = np.full(3000, -np.inf, dtype=np.float32)
    logits[[5, 2500]] = 0.0
    assert set(draws(SamplingParams(temperature=1.0, seed=0), logits, 300)) == {5, 2500}


def test_same_seed_gives_the_same_sequence_and_different_seeds_differ():
    params = dict(temperature=1.0, top_p=0.95)
    a = draws(SamplingParams(seed=123, **params), LOGITS, 200)
    b = draws(SamplingParams(seed=123, **params), LOGITS, 200)
    c = draws(SamplingParams(seed=124, **params), LOGITS, 200)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_logits_are_reported():
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(np.zeros((1, 10), dtype=np.float32), [])
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(np.array([0.0, np.nan], dtype=np.float32), [])
    # Greedy too: numpy's argmax would be the NaN's index, emitted as a token every step.
    for row in ([1.0, np.nan, 2.0], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="cannot decode: the model computed NaN logits"):
            Sampler(SamplingParams(temperature=0)).sample(np.array(row, dtype=np.float32), [])


def test_logits_of_other_float_dtypes_work():
    for dtype in (np.float16, np.float64):
        logits = LOGITS.astype(dtype)
        assert Sampler(SamplingParams(repetition_penalty=1.3)).sample(logits, [0]) in (0, 1)
        assert Sampler(SamplingParams(temperature=0.5, top_p=0.9, seed=0)).sample(logits, [0]) < 8


# --- device-side import hygiene -----------------------------------------------------------------


def test_text_modules_do_not_import_torch_or_transformers():
    code = (
        "import sys\n"
        "import nomoat.runtime.sampling, nomoat.runtime.detokenizer\n"
        "import nomoat.runtime.stops, nomoat.runtime.chat_template\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'nomoat.converter') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), check=True
    )
    assert result.stdout.strip() == ""


def test_numpy_numbers_are_numbers_and_kept_as_floats():
    """A temperature from a numpy pipeline (np.float32(0.7)) was refused as not a finite number."""
    params = SamplingParams(temperature=np.float32(0.7), top_p=np.float64(0.9), min_p=np.float16(0.05),
                            repetition_penalty=np.int64(1), frequency_penalty=np.float32(0.5), presence_penalty=0)
    assert params.temperature == float(np.float32(0.7)) and params.top_p == 0.9
    assert all(type(getattr(params, name)) is float for name in
               ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty"))
    assert type(params.presence_penalty) is int  # Python's own numbers stay as given
    for bad in (10 ** 400, -10 ** 400):
        with pytest.raises(ValueError, match="top_p must be a finite number"):
            SamplingParams(top_p=bad)
    assert Sampler(params).sample(np.array([0.0, 5.0, 1.0], np.float32)) in (0, 1, 2)
    for bad in (True, np.True_, np.float32("nan"), "0.7", None):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            SamplingParams(temperature=bad)
