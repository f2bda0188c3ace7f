"""Prompt-lookup drafting for speculative greedy decoding.

Text that quotes or repeats its context (summaries, code edits, extraction) often continues
with a span that already occurred. Find the most recent earlier occurrence of the last
n tokens and propose the tokens that followed it; the model then checks all of them in one
forward pass, and every accepted token skips a full decode step.
"""

from __future__ import annotations

from collections.abc import Sequence


def draft_from_context(tokens: Sequence[int], max_draft: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to max_draft tokens that followed the latest earlier match of the sequence's tail.

    Longer n-grams are tried first: they predict better. Returns [] when nothing matches.
    """
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        tail = list(tokens[n_tokens - n:])
        # Search backwards so the most recent occurrence (the likeliest continuation) wins.
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start] == tail[0] and list(tokens[start:start + n]) == tail:
                follow = list(tokens[start + n: start + n + max_draft])
                if follow:
                    return follow
    return []


def accepted_prefix(draft: Sequence[int], predicted: Sequence[int]) -> int:
    """How many draft tokens the model's own greedy choices confirm, from the start."""
    n = 0
    while n < len(draft) and draft[n] == predicted[n]:
        n += 1
    return n
