"""Prompt-lookup drafting for speculative greedy decoding.

Text that quotes or repeats its context (summaries, code edits, extraction) often continues
with a span that already occurred. Find the most recent earlier occurrence of the last
n tokens and propose the tokens that followed it; the model then checks all of them in one
forward pass, and every accepted token skips a full decode step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# A drafted token is checked in the same pass as the real one, but not for free: on the CPUs
# measured, each one added ~0.15-0.3 of a one-token decode step (SmolLM2-135M int4, Intel
# AVX-512 host, 1 thread: 12.0 ms for one token, 14.3 with one draft, 24.4 with four, 37.0
# with eight; 2 threads 7.6 / 9.0 / 13.8 / 20.9; on an AMD EPYC, Zen 4, 0.19 / 0.25 / 0.26 of
# a step per draft with one / four / eight at 1 and 2 threads alike; on a Zen 5, 0.20 / 0.31 /
# 0.30 at 1 thread, 0.14 / 0.21 / 0.21 at 2). The j-th draft of a pass
# pays only if the chance that it and every draft before it are accepted is at least that share.
DRAFT_COST = 0.25


def find_continuation(tokens: Sequence[int], max_draft: int, max_ngram: int = 3,
                      min_ngram: int = 1) -> tuple[int, list[int]]:
    """(n, follow): up to max_draft tokens that followed the latest earlier occurrence of the
    sequence's last n tokens. Longer n-grams are tried first: they predict better. (0, []) when
    nothing matches."""
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        tail = list(tokens[n_tokens - n:])
        # Search backwards so the most recent occurrence (the likeliest continuation) wins.
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start] == tail[0] and list(tokens[start:start + n]) == tail:
                follow = list(tokens[start + n: start + n + max_draft])
                if follow:
                    return n, follow
    return 0, []


class Drafter:
    """Drafts as long as they are likely to pay for themselves, learned during one generation.

    Drafts from a long match (the answer is copying its context) are mostly accepted; drafts
    from a one-token match in ordinary prose mostly are not, and checking them made a chat
    answer 15-25 % slower than plain decoding with eight of them. So each match length n keeps
    its own count of accepted and rejected drafts (the first rejection ends a pass), giving q,
    the chance a draft is accepted given the one before it was; a pass drafts the j-th token
    only while q**j >= cost. A match length whose drafts fail stops drafting, the others go on.
    """

    def __init__(self, max_draft: int, cost: float | None = None, max_ngram: int = 3):
        if max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {max_draft}")
        self.max_draft = max_draft
        self.cost = DRAFT_COST if cost is None else cost  # 0: every draft as long as max_draft allows
        self.max_ngram = max_ngram
        # A prior of one accepted draft and nothing rejected: the first match of each length
        # is tried in full, and one rejection is enough to shorten the next.
        self._accepted = dict.fromkeys(range(1, max_ngram + 1), 1)
        self._rejected = dict.fromkeys(range(1, max_ngram + 1), 0)
        self._last_n = 0

    def acceptance(self, n: int) -> float:
        """The estimated chance that a draft from an n-token match is accepted (given the one before)."""
        return self._accepted[n] / (self._accepted[n] + self._rejected[n])

    def worth_drafting(self, n: int) -> int:
        q = self.acceptance(n)
        if q >= 1.0 or self.cost <= 0.0:
            return self.max_draft
        if q <= self.cost:
            return 0
        return min(self.max_draft, int(math.log(self.cost) / math.log(q)))

    def propose(self, context: Sequence[int], limit: int) -> list[int]:
        """Drafts to check after `context` (at most `limit`); [] for a plain decode step."""
        if limit < 1:  # no room left (the context or the answer is full): nothing to search for
            self._last_n = 0
            return []
        self._last_n, follow = find_continuation(context, min(limit, self.max_draft), self.max_ngram)
        return follow[:self.worth_drafting(self._last_n)] if self._last_n else []

    def update(self, drafted: int, accepted: int) -> None:
        """Learn from the pass that checked the last proposal."""
        if drafted and self._last_n:
            self._accepted[self._last_n] += accepted
            self._rejected[self._last_n] += accepted < drafted


def accepted_prefix(draft: Sequence[int], predicted: Sequence[int]) -> int:
    """How many draft tokens the model's own greedy choices confirm, from the start."""
    n = 0
    while n < len(draft) and draft[n] == predicted[n]:
        n += 1
    return n
