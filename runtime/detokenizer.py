"""Incremental (streaming) detokenization that is UTF-8 safe and O(window) per token.

Why not decode each token on its own? Two reasons:

* byte-level BPE (GPT-2/LLaMA-3 style) and SentencePiece byte fallback split one multi-byte
  character (emoji, CJK) across several tokens; decoding a lone piece gives U+FFFD ('\\ufffd');
* SentencePiece-style decoders treat the first token of whatever they decode specially (the
  leading '▁' becomes nothing instead of a space), so ``decode([t])`` of a mid-sentence word
  loses its space.

And re-decoding the whole sequence every step is O(n) per token (O(n^2) per reply).

The technique (the "prefix offset / read offset" one of TGI and vLLM): decode a short window of
recent ids that starts a few tokens back at a character boundary, and emit the part of the
window's text that has not been emitted yet. The tokens at the start of the window are context
only: they were emitted earlier, and they make the new tokens decode exactly as they do inside
the full sequence (a new token is never the window's first token, so it keeps its space).
Text ending in U+FFFD is held back until the character completes.

Contract: for valid UTF-8 output, ``"".join(deltas) + flush() == tokenizer.decode(ids)`` exactly,
for decoders whose output only grows at the end as ids are appended (ByteLevel, Metaspace,
the Replace/ByteFallback/Fuse/Strip chain of LLaMA-2 tokenizers). If the model produces invalid
byte sequences, the stream shows U+FFFD for them; it may then differ from ``decode`` in how many
U+FFFD it shows, because ByteFallback replaces a whole run of byte tokens when any byte is bad.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["IncrementalDetokenizer"]

REPLACEMENT_CHAR = "\ufffd"

# Tokens kept before the new ones when the window slides: already emitted, decoded again only as
# context. One token is enough for the decoders above (only a window's first token is special);
# a few more cost nothing and cover decoders whose rendering looks at a neighbour
# (WordPiece '##', clean-up of " ." and friends).
CONTEXT_TOKENS = 4
# The window slides once it spans this many tokens, so each step decodes at most ~16 ids and the
# sliding itself (one extra short decode) happens once every ~12 tokens, not every token.
MAX_WINDOW_TOKENS = 16


class _Decoder(Protocol):
    # Only this part of tokenizers.Tokenizer is used, so tests can wrap it to count work.
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text deltas that are safe to show.

    Call ``add(token_id)`` for every generated id and print what it returns (often ''), then
    ``flush()`` once at the end for anything still held back.

    ``context``: ids the text continues (a raw prompt's), never emitted. Its last few tokens open
    the window, so the first new token decodes as it does inside prompt + answer: a SentencePiece
    word keeps its leading space (" jumps" after "The quick brown fox", as a text completion
    continues its prompt) where alone it would lose it. Without it the text is that of the new
    ids decoded alone, as a chat answer is.
    """

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._context = 0  # how many of _ids are context
        # The window is ids[_start:]. _start is always a character boundary (the text up to it
        # decoded without a trailing U+FFFD), so the window decodes on its own without garbage.
        self._start = 0
        # How many characters of decode(ids[_start:]) have been emitted already.
        self._emitted = 0
        # Character boundaries seen since _start (token indices), candidates for the next _start.
        self._boundaries: list[int] = []
        self._open_with([int(t) for t in context[-MAX_WINDOW_TOKENS:]])

    def _open_with(self, context: list[int]) -> None:
        """Start the window with the last context ids as if they had been emitted: CONTEXT_TOKENS of
        them, or more when those start inside a character. A SentencePiece byte-fallback run cut
        mid-character decodes as U+FFFD throughout, the newline after an emoji included, and the
        answer's first token would lose its leading space behind it: widen back to a start whose
        text has no U+FFFD. No context at all when none within MAX_WINDOW_TOKENS does, when the ids
        end inside a character (the answer's first token would finish the prompt's character), or
        when they render nothing (all skipped special tokens: the first new token is the decoder's
        first either way)."""
        for count in range(min(CONTEXT_TOKENS, len(context)), len(context) + 1):
            ids = context[len(context) - count:]
            text = self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
            if text and REPLACEMENT_CHAR not in text:
                self._ids = ids
                self._context = len(ids)
                self._emitted = len(text)
                return

    @property
    def ids(self) -> list[int]:
        """Every id added so far (a copy; not the context)."""
        return self._ids[self._context:]

    def add(self, token_id: int) -> str:
        """Append one id; return the newly decodable text (often '', e.g. mid-character)."""
        self._ids.append(int(token_id))
        text = self._decode_window()
        # Hold back a trailing run of U+FFFD: it may be an incomplete character (byte-level BPE
        # shows one, ByteFallback one per byte token) that the next tokens complete.
        safe_end = len(text.rstrip(REPLACEMENT_CHAR))
        delta = text[self._emitted : safe_end]
        self._emitted = max(self._emitted, safe_end)
        if safe_end == len(text):
            self._boundaries.append(len(self._ids))
            self._maybe_slide()
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (a U+FFFD run that never completed) at the end of generation."""
        text = self._decode_window()
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta

    def _decode_window(self) -> str:
        return self._tokenizer.decode(self._ids[self._start :], skip_special_tokens=self._skip_special)

    def _maybe_slide(self) -> None:
        """Move the window start forward to a boundary that keeps >= CONTEXT_TOKENS tokens of context.

        Called only right after a boundary, when everything decoded so far has been emitted: the
        emitted count for the new window is then simply the length of its decoded text (which may
        differ from the old window's tail, e.g. by a stripped leading space; that is the point).
        """
        if len(self._ids) - self._start <= MAX_WINDOW_TOKENS:
            return
        latest_allowed = len(self._ids) - CONTEXT_TOKENS
        candidates = [b for b in self._boundaries if b <= latest_allowed]
        if not candidates:  # only after a long run of held-back tokens; keep the wide window
            return
        # The context must render some text: if it were all skipped special tokens, the next real
        # token would become the decoder's first token and lose its leading space. Try the nearest
        # boundary, then the one with the most context; otherwise keep the window as it is.
        for start in dict.fromkeys((candidates[-1], candidates[0])):
            text = self._tokenizer.decode(self._ids[start:], skip_special_tokens=self._skip_special)
            if text:
                self._start = start
                self._emitted = len(text)
                self._boundaries = [b for b in self._boundaries if b > start]
                return
