"""Stop strings over a stream of text deltas.

A stop string can arrive split across deltas ("<|im" + "_end|>"), so text that might be the start
of a stop string is held back until the next delta decides it. The stop string itself is never
emitted (like the OpenAI API and llama.cpp's server); text after it is dropped.

Stop *tokens* (eos, <|im_end|> as one id) are cheaper and are checked on ids by the caller; this
is for user-given strings that need not be single tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["StopMatcher", "stop_string_tuple"]


def stop_string_tuple(stop_strings: Sequence[str] | str | None) -> tuple[str, ...]:
    """The stop strings a caller gave, checked, each once in order. None is none (the default of the
    OpenAI API and llama-cpp-python); a bare string is one stop string, not a sequence of characters."""
    if stop_strings is None:
        return ()
    if not isinstance(stop_strings, (str, Iterable)) or isinstance(stop_strings, (bytes, bytearray)):
        # 123 failed as "'int' object is not iterable", b"x" as "got 120" (its first byte)
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop_strings).__name__}")
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    for stop in stops:
        if not isinstance(stop, str) or not stop:
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    return tuple(dict.fromkeys(stops))  # dedupe, keep order


class StopMatcher:
    """Feed text deltas, get back the part that is safe to show and whether a stop string hit.

    >>> m = StopMatcher(["\\n\\nUser:"])
    >>> m.feed("Hi!\\n")
    ('Hi!', False)
    >>> m.feed("\\nUser: more")
    ('', True)
    """

    def __init__(self, stop_strings: Sequence[str] | str | None = ()) -> None:
        self._stops = stop_string_tuple(stop_strings)
        # Every proper prefix of every stop string: the tails worth holding back.
        self._prefixes = frozenset(stop[:i] for stop in self._stops for i in range(1, len(stop)))
        self._longest_prefix = max((len(p) for p in self._prefixes), default=0)
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the stream, if any

    @property
    def strings(self) -> tuple[str, ...]:
        """The stop strings, each once, in the order given."""
        return self._stops

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, stopped?). After a stop, every call returns ('', True)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        found = self._find_stop(text)
        if found is not None:
            cut, self.matched = found
            self._held = ""
            return text[:cut], True
        keep = self._partial_match_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """At the end of generation: the held-back text was not a stop string after all."""
        held, self._held = self._held, ""
        return held

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """(index, stop string) of the earliest stop string in ``text``, or None.

        The held-back part was already checked and holds no full stop string, so any match ends in
        the new delta; taking the earliest start emits the least text when stop strings overlap.
        """
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for length in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-length:] in self._prefixes:
                return length
        return 0
