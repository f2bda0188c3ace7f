from __future__ import annotations

import random
from itertools import pairwise

import pytest
from nomoat.runtime.stops import StopMatcher


def run(matcher: StopMatcher, deltas: list[str]) -> tuple[str, bool]:
    """Feed every delta like a generation loop would; return the shown text and whether it stopped."""
    shown = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        shown.append(text)
        if stopped:
            return "".join(shown), True
    return "".join(shown) + matcher.flush(), False


def test_empty_stop_list_is_passthrough():
    matcher = StopMatcher([])
    assert matcher.feed("<|im_") == ("<|im_", False)
    assert matcher.feed("end|>") == ("end|>", False)
    assert matcher.flush() == ""


def test_stop_string_inside_one_delta():
    matcher = StopMatcher(["<|im_end|>"])
    assert matcher.feed("Hello<|im_end|>ignored") == ("Hello", True)
    assert matcher.stopped and matcher.matched == "<|im_end|>"


def test_stop_string_split_across_deltas_is_never_shown():
    matcher = StopMatcher(["<|im_end|>"])
    assert matcher.feed("Hi <|im") == ("Hi ", False)
    assert matcher.feed("_en") == ("", False)
    assert matcher.feed("d|> tail") == ("", True)


def test_held_text_is_released_when_the_match_fails():
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.feed("one\n") == ("one", False)
    assert matcher.feed("\nUs") == ("", False)
    assert matcher.feed("ually") == ("\n\nUsually", False)


def test_flush_returns_held_text_at_the_end():
    matcher = StopMatcher(["###"])
    assert matcher.feed("a ##") == ("a ", False)
    assert matcher.flush() == "##"
    assert matcher.flush() == ""


def test_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == ("hel", True)
    assert matcher.matched == "lo w"


def test_overlapping_prefixes():
    # "aab" after "aaa...": the held suffix must be the longest one that can still start a match.
    assert run(StopMatcher(["aab"]), ["a", "a", "a", "a", "b", "c"]) == ("aa", True)


def test_after_a_stop_nothing_more_is_emitted():
    matcher = StopMatcher(["END"])
    assert matcher.feed("xEND") == ("x", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_a_plain_string_is_one_stop_string():
    assert StopMatcher("ab").feed("xa b ab") == ("xa b ", True)


@pytest.mark.parametrize("bad", [[""], ["ok", ""], [None]])
def test_invalid_stop_strings_are_rejected(bad):
    with pytest.raises(ValueError, match="non-empty strings"):
        StopMatcher(bad)


def test_random_splits_agree_with_a_one_shot_search():
    rng = random.Random(7)
    stops = ["<|im_end|>", "\n\n", "Observation:", "😀😀"]
    alphabet = list("ab<|>_imend\n:Obsrvto😀 ")
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        if rng.random() < 0.5:
            text = text[: rng.randrange(len(text) + 1)] + rng.choice(stops) + text
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(1, 12))))
        deltas = [text[a:b] for a, b in pairwise([0, *cuts, len(text)])]
        hits = [i for i in (text.find(s) for s in stops) if i != -1]
        expected = (text[: min(hits)], True) if hits else (text, False)
        assert run(StopMatcher(stops), deltas) == expected, (text, deltas)
