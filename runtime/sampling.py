"""Next-token sampling over one row of logits: numpy only, called once per generated token.

The order of operations follows Hugging Face ``generate`` (llama.cpp's default chain differs:
it applies the temperature after top-k, top-p and min-p):

    penalties -> (greedy: argmax) | temperature -> top-k -> top-p -> min-p -> draw

(the penalties: transformers' repetition penalty, over the prompt and the answer, then OpenAI's
frequency and presence penalties, over the answer alone as OpenAI and vLLM count them; in that
order, as llama.cpp's penalties sampler applies all three)

so that a bundle checked against the transformers reference behaves the same on the device.

Speed matters because this runs per token over a vocabulary of ~50k entries:

* greedy is a single ``argmax`` (plus an in-place penalty on the previous ids when asked);
* top-k uses ``np.partition`` (O(vocab)) and never sorts the whole vocabulary;
* top-p sorts only the tokens that can possibly be in the nucleus (see ``_top_p_filter``);
* temperature is folded into the softmax, which runs in float32 (2x faster ``exp`` than float64;
  the sums that need precision are accumulated in float64);
* the draw never runs a sequential cumulative sum over the whole vocabulary (see ``_draw``);
* the vocabulary-sized scratch buffers are allocated once per ``Sampler`` and reused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["SamplingParams", "Sampler", "apply_count_penalties", "apply_repetition_penalty"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. The defaults switch every filter off and decode greedily.

    temperature:        0.0 means greedy (argmax); otherwise logits are divided by it.
    top_k:              keep the k most likely tokens (0 = off).
    top_p:              keep the smallest set of most likely tokens whose mass reaches top_p (1.0 = off;
                        0.0 keeps the most likely token alone, as transformers and OpenAI take it).
    min_p:              drop tokens whose probability is below min_p * the top probability (0.0 = off).
    repetition_penalty: CTRL-style penalty on every id in ``previous_ids`` (1.0 = off, >1 discourages).
    repeat_last_n:      how many of the last ``previous_ids`` the penalty looks at (-1 = all of them, as
                        transformers does; 0 = none, which turns the penalty off; llama.cpp's default is 64).
    frequency_penalty:  OpenAI's: subtract penalty x (times an id occurs in the answer) from its logit (0 = off).
    presence_penalty:   OpenAI's: subtract penalty from the logit of every id in the answer once (0 = off).
                        Both count the generated ids only (OpenAI's and vLLM's "text so far"; a chat prompt
                        holds an end-of-turn token per message, which they would push below reach), within
                        the last repeat_last_n ids; negative values encourage.
    seed:               seed of the sampler's random generator; None draws fresh OS entropy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = -1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in _REAL_FIELDS:  # np.float32(0.7) from a numpy pipeline is a number too: kept as a float
            object.__setattr__(self, name, _real(name, getattr(self, name)))
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (1 turns it off), got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}")
        # The penalty divides float32 logits in float32 (numpy's rule for a Python float): one that
        # rounds to 0 there (below ~1.4e-45) would make 0 / 0 a NaN, reported as a broken model.
        with np.errstate(over="ignore"):  # 1e40 is inf in float32: a huge penalty, allowed
            in_float32 = np.float32(self.repetition_penalty)
        if not in_float32 > 0.0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}"
            )
        _check_int("repeat_last_n", self.repeat_last_n)
        if self.repeat_last_n < -1:
            raise ValueError(
                f"repeat_last_n must be >= -1 (-1 = the whole history, 0 = none), got {self.repeat_last_n}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed)
            if self.seed < 0:  # numpy's SeedSequence rejects negative seeds with a cryptic message
                raise ValueError(f"seed must be a non-negative integer or None, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes anything (so the caller must pass the history)."""
        return self.repeat_last_n != 0 and (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                                            or self.presence_penalty != 0.0)

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> SamplingParams:
        """Build from e.g. manifest generation defaults or a JSON request.

        Keys whose value is None are ignored (so "not given" falls back to the default);
        unknown keys are an error rather than silently ignored, to catch typos like ``topk``.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; expected some of {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def over_defaults(cls, defaults: Mapping[str, object], overrides: Mapping[str, object]) -> SamplingParams:
        """A bundle's generation defaults (its keys that are no sampling setting, e.g. max_new_tokens, left
        out) with the caller's non-None values on top."""
        known = {f.name for f in fields(cls)}
        return cls.from_dict({**{k: v for k, v in defaults.items() if k in known},
                              **{k: v for k, v in overrides.items() if v is not None}})


_REAL_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


def _real(name: str, value: object) -> float:
    """value as a float: any real number (Python's, numpy's float32 or int64), finite. bool is an int
    subclass (and numpy's is not Real); True as a temperature is almost certainly a bug in the caller."""
    try:
        finite = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    except OverflowError:  # an int of hundreds of digits
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    # Python's own numbers stay as given (an error message says -1, as the Android app's does, not -1.0).
    return value if type(value) in (int, float) else float(value)


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def apply_repetition_penalty(
    logits: np.ndarray, previous_ids: np.ndarray, penalty: float, out: np.ndarray
) -> np.ndarray:
    """CTRL penalty (as in HF): divide positive logits of seen ids by ``penalty``, multiply negative ones.

    Writes into ``out`` (a reusable buffer) so the caller's logits are never modified.
    Duplicated ids are harmless: every write of an id computes the same value from ``logits``.
    An extreme penalty (1e-40, 1e40) takes a logit past float32's range: it stays at the largest
    finite value of its sign, so sampling sees a very strong preference, not an infinity it refuses.
    """
    np.copyto(out, logits)
    seen = logits[previous_ids]
    with np.errstate(over="ignore", divide="ignore"):
        penalized = np.where(seen < 0, seen * penalty, seen / penalty)
    big = np.finfo(out.dtype).max
    out[previous_ids] = np.clip(penalized, -big, big)
    return out


def apply_count_penalties(logits: np.ndarray, previous_ids: np.ndarray, frequency: float, presence: float) -> None:
    """OpenAI's frequency and presence penalties, in place: each id seen c times loses
    c * frequency + presence from its logit (kept within the dtype's finite range, as the repetition
    penalty's result is)."""
    ids, counts = np.unique(previous_ids, return_counts=True)
    with np.errstate(over="ignore", invalid="ignore"):
        penalized = logits[ids] - (counts * frequency + presence).astype(logits.dtype)
    big = np.finfo(logits.dtype).max
    logits[ids] = np.clip(penalized, -big, big)


class Sampler:
    """Stateful sampler: owns the random generator (so a seed gives a reproducible sequence of draws)
    and the scratch buffers reused across calls. Use one per generation; it is not thread-safe."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params if params is not None else SamplingParams()
        self._rng = np.random.default_rng(self.params.seed)
        self._penalized: np.ndarray | None = None  # same shape/dtype as the logits
        self._weights: np.ndarray | None = None  # float32, vocabulary-sized
        self._all_ids: np.ndarray | None = None  # arange(vocab), the candidate ids when nothing filters

    def sample(self, logits: np.ndarray, previous_ids: Sequence[int] | np.ndarray = (), prompt_length: int = 0) -> int:
        """Pick the next token id from one row of logits (shape ``(vocab,)``).

        ``previous_ids`` is the sequence so far, oldest first; the repetition penalty applies to
        its last ``repeat_last_n`` ids (HF uses the whole sequence, llama.cpp the last 64); the frequency
        and presence penalties to those of them past the first ``prompt_length`` (the generated ones).
        Passing an int ndarray avoids converting a Python list on every call.
        """
        logits = _as_logits_row(logits)
        p = self.params
        if p.penalized:
            ids = np.asarray(previous_ids, dtype=np.intp)
            start = max(0, ids.size - p.repeat_last_n) if p.repeat_last_n > 0 else 0
            window, answer = ids[start:], ids[max(start, prompt_length):]
            repeated = window.size and p.repetition_penalty != 1.0
            counted = answer.size and (p.frequency_penalty or p.presence_penalty)
            if repeated or counted:
                out = self._scratch(logits)
                if repeated:
                    logits = apply_repetition_penalty(logits, window, p.repetition_penalty, out)
                else:  # the caller's logits are never modified
                    np.copyto(out, logits)
                    logits = out
                if counted:
                    apply_count_penalties(logits, answer, p.frequency_penalty, p.presence_penalty)
        if p.temperature == 0.0:
            return greedy_token(logits)
        ids, weights = self._candidates(logits)
        if p.top_p < 1.0:
            ids, weights = _top_p_filter(ids, weights, p.top_p)
        if p.min_p > 0.0:
            ids, weights = _min_p_filter(ids, weights, p.min_p)
        return _draw(self._rng, ids, weights)

    def _scratch(self, logits: np.ndarray) -> np.ndarray:
        if (
            self._penalized is None
            or self._penalized.shape != logits.shape
            or (self._penalized.dtype != logits.dtype)
        ):
            self._penalized = np.empty_like(logits)
        return self._penalized

    def _candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply top-k and temperature: return candidate ids and their unnormalized softmax weights."""
        vocab = logits.shape[0]
        top_k = self.params.top_k
        if 0 < top_k < vocab:
            ids = _top_k_ids(logits, top_k)
            return ids, _softmax_weights(logits[ids], self.params.temperature)
        if self._all_ids is None or self._all_ids.shape[0] != vocab:
            self._all_ids = np.arange(vocab)
            self._weights = np.empty(vocab, dtype=np.float32)
        return self._all_ids, _softmax_weights(logits, self.params.temperature, out=self._weights)


def _as_logits_row(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(
            f"expected one row of logits with shape (vocab,), got shape {logits.shape}; "
            "pass logits[-1] for the last position"
        )
    return logits


def _kth_largest(values: np.ndarray, k: int) -> np.floating:
    return np.partition(values, values.shape[0] - k)[values.shape[0] - k]


def _top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, plus any tied with the k-th (as HF's ``scores < kth`` test does).

    Never sorts the vocabulary. Partitioning all of it is O(vocab) but slow in practice (~250 us
    for 50k), so first bound the answer from a strided subsample: its k-th largest value is <= the
    true k-th largest (at least k logits reach it), so every top-k token passes ``logits >= bound``.
    A stride of sqrt(vocab / k) balances the two partitions (~sqrt(vocab * k) values each).
    Keeping ties makes the result independent of how partition happens to order equal values.
    """
    stride = max(1, int(math.sqrt(logits.shape[0] / k)))
    subsample = logits[::stride]
    if subsample.shape[0] >= k:
        candidates = np.flatnonzero(logits >= _kth_largest(subsample, k))
    else:  # k close to the vocabulary size: nothing to gain
        candidates = np.arange(logits.shape[0])
    values = logits[candidates]
    return candidates[values >= _kth_largest(values, k)]


def greedy_token(logits: np.ndarray) -> int:
    """The argmax of one row of logits. numpy's argmax is the first NaN's index when there is one,
    which would go on as a token (the same one every step): a NaN is an error, as when sampling."""
    token = int(np.argmax(logits))
    if math.isnan(logits[token]):
        raise ValueError("cannot decode: the model computed NaN logits (a broken export or a numeric overflow "
                         "in this build; convert the model again, or try another --quant)")
    return token


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _softmax_weights(values: np.ndarray, temperature: float, out: np.ndarray | None = None) -> np.ndarray:
    """exp((v - max) / T): unnormalized probabilities in (0, 1] (the filters and the draw only need
    ratios, so dividing by the sum is skipped). float32 is plenty for each weight; what needs
    float64 is summing 50k of them, which the callers do."""
    top = values.max()
    if not math.isfinite(top):  # NaN anywhere makes max NaN; an all -inf row has nothing to sample
        raise ValueError(f"cannot sample: the largest logit is {top} (NaN or infinite logits)")
    scale = 1.0 / temperature
    # A gap (between the largest finite logits of both signs, after an extreme penalty) or a gap
    # times a large scale may pass float32's range: -inf, whose exp is the 0 it should be.
    with np.errstate(over="ignore"):
        weights = np.subtract(values, top, out=out, dtype=np.float32)
        if scale <= _FLOAT32_MAX:
            weights *= scale
            return np.exp(weights, out=weights)
        # Below T ~ 3e-39, 1/T is inf in float32 and the top logit's 0 * inf would be NaN (no
        # token left to draw). Dividing in float64 keeps the top at exp(0) = 1 and sends every
        # gap to 0 (a tiny temperature is greedy, exact ties stay a fair choice).
        return np.exp(np.subtract(values, top, dtype=np.float64) / temperature, out=weights, casting="same_kind")


def _top_p_filter(ids: np.ndarray, weights: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus filter: keep a token iff the mass of the tokens ranked above it is < top_p.

    That is HF's rule (drop the ascending-sorted tail whose cumulative mass is <= 1 - top_p), and it
    always keeps the most likely token. Only tokens with weight > total * (1 - top_p) / n are sorted:
    any token at or below that bound, together with every smaller token, has mass <= 1 - top_p,
    so it is in the dropped tail anyway. With real logits this leaves a few hundred tokens to sort
    instead of the whole vocabulary.
    """
    if top_p <= 0.0:  # the most likely token alone (the first of equals, as the sort below keeps them)
        top = np.argmax(weights)
        return ids[top:top + 1], weights[top:top + 1]
    total = float(weights.sum(dtype=np.float64))
    bound = total * (1.0 - top_p) / weights.shape[0]
    # Compared in float64: a Python float against float32 weights is rounded to float32 first
    # (numpy 2), and a top_p below ~3e-8 then rounds the bound up to the tied top weight's 1.0.
    maybe = np.flatnonzero(weights > np.float64(bound))
    if maybe.size == 0:  # every weight tied at the bound (1 - top_p rounds to 1): the top one stays
        maybe = np.argmax(weights)[None]
    order = maybe[np.argsort(-weights[maybe], kind="stable")]
    sorted_weights = weights[order].astype(np.float64)
    mass_above = np.cumsum(sorted_weights) - sorted_weights  # exclusive cumulative sum
    mass_above[0] = 0.0  # exactly zero, so the top token always survives float rounding
    keep = max(1, int(np.searchsorted(mass_above, top_p * total, side="left")))
    kept = order[:keep]
    return ids[kept], weights[kept]


def _min_p_filter(ids: np.ndarray, weights: np.ndarray, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep tokens whose probability is >= min_p * the top probability. Ratios of weights equal
    ratios of probabilities, so no normalization is needed; the top token always survives."""
    keep = np.flatnonzero(weights >= min_p * weights.max())
    return ids[keep], weights[keep]


_DRAW_BLOCK = 1024


def _draw(rng: np.random.Generator, ids: np.ndarray, weights: np.ndarray) -> int:
    """Inverse-CDF draw from unnormalized weights.

    A cumulative sum is sequential and slow over 50k values (~250 us), so large candidate sets are
    searched in two levels: vectorized per-block sums locate the block, then the cumulative sum of
    that one block locates the token. Zero-weight entries (exp underflow, filtered ties) are never
    picked: searchsorted(side='right') steps over flat parts of a cumulative sum.
    """
    target = rng.random()
    if weights.shape[0] <= _DRAW_BLOCK:
        return int(ids[_search(weights, target)])
    starts = np.arange(0, weights.shape[0], _DRAW_BLOCK)
    block = _search(np.add.reduceat(weights, starts, dtype=np.float64), target)
    offset = block * _DRAW_BLOCK
    # Redraw inside the chosen block; given the block, this has exactly the right distribution.
    within = _search(weights[offset : offset + _DRAW_BLOCK], rng.random())
    return int(ids[offset + within])


def _search(weights: np.ndarray, fraction: float) -> int:
    """Index i with cdf[i-1] <= fraction * total < cdf[i], for unnormalized weights."""
    cdf = np.cumsum(weights, dtype=np.float64)
    total = cdf[-1]
    if not (total > 0.0 and math.isfinite(total)):
        raise ValueError("cannot sample: no candidate token has a positive, finite probability")
    index = int(np.searchsorted(cdf, fraction * total, side="right"))
    # fraction < 1, so index < len unless rounding bites; then take the last positive weight.
    return index if index < weights.shape[0] else int(np.flatnonzero(weights)[-1])
