package dev.nomoat.core

import kotlin.math.ln

/**
 * Prompt-lookup drafting for speculative greedy decoding (runtime/lookup.py, the same rules).
 *
 * Text that quotes or repeats its context (a pasted paragraph to correct, code to edit) often goes on
 * with a span that already occurred. Find the latest earlier occurrence of the last n tokens and
 * propose the tokens that followed it; the model checks all of them in one forward pass, and every
 * accepted token saves a decode step.
 */
object Lookup {
    /**
     * A drafted token is checked in the same pass as the real one, but not for free: on the host CPUs
     * measured each one added ~0.2-0.25 of a one-token decode step (lookup.py DRAFT_COST; on a phone
     * unmeasured). The j-th draft of a pass is made only while the chance that it and every draft
     * before it are accepted is at least this share.
     */
    const val DRAFT_COST = 0.25

    /** A match of [n] tokens and up to maxDraft tokens that followed it ([NONE]: nothing matched). */
    class Continuation(val n: Int, val follow: IntArray) {
        companion object {
            val NONE = Continuation(0, IntArray(0))
        }
    }

    /**
     * Up to [maxDraft] tokens that followed the latest earlier occurrence of the last n tokens of
     * [tokens][0, size); longer n-grams are tried first, as they predict better (find_continuation).
     */
    fun findContinuation(tokens: IntArray, size: Int, maxDraft: Int, maxNgram: Int = 3, minNgram: Int = 1): Continuation {
        for (n in minOf(maxNgram, size - 1) downTo minNgram) {
            val tail = size - n
            // Backwards, so the most recent occurrence (the likeliest continuation) wins.
            for (start in tail - 1 downTo 0) {
                if (!matches(tokens, start, tail, n)) continue
                val end = minOf(start + n + maxDraft, size)
                if (end > start + n) return Continuation(n, tokens.copyOfRange(start + n, end))
            }
        }
        return Continuation.NONE
    }

    private fun matches(tokens: IntArray, a: Int, b: Int, n: Int): Boolean {
        for (i in 0 until n) if (tokens[a + i] != tokens[b + i]) return false
        return true
    }

    /** How many of [draft]'s tokens the model's own greedy choices [predicted] confirm, from the start. */
    fun acceptedPrefix(draft: IntArray, predicted: IntArray): Int {
        var n = 0
        while (n < draft.size && draft[n] == predicted[n]) n++
        return n
    }
}

/**
 * Drafts only as long as they are likely to pay for themselves, learned during one generation (lookup.py
 * Drafter). Each match length keeps its own count of accepted and rejected drafts (the first rejection
 * ends a pass), giving q, the chance a draft is accepted given the one before it was; a pass drafts the
 * j-th token only while q^j >= [cost]. A match length whose drafts fail stops drafting, the others go on.
 * [cost] 0 drafts as many as [maxDraft] allows, always.
 */
class Drafter(val maxDraft: Int, val cost: Double = Lookup.DRAFT_COST, val maxNgram: Int = 3) {
    // A prior of one accepted draft and nothing rejected: the first match of each length is tried in
    // full, and one rejection is enough to shorten the next.
    private val accepted = IntArray(maxNgram + 1) { 1 }
    private val rejected = IntArray(maxNgram + 1)
    private var lastN = 0

    init {
        require(maxDraft >= 1) { "maxDraft must be at least 1, got $maxDraft" }
        require(cost >= 0.0 && cost < 1.0) { "cost must be in [0, 1), got $cost" }
    }

    /** The estimated chance that a draft from an [n]-token match is accepted (given the one before). */
    fun acceptance(n: Int): Double = accepted[n].toDouble() / (accepted[n] + rejected[n])

    fun worthDrafting(n: Int): Int {
        val q = acceptance(n)
        if (q >= 1.0 || cost <= 0.0) return maxDraft
        if (q <= cost) return 0
        return minOf(maxDraft, (ln(cost) / ln(q)).toInt())
    }

    /** Drafts to check after [context][0, size) (at most [limit]); empty for a plain decode step. */
    fun propose(context: IntArray, size: Int, limit: Int): IntArray {
        if (limit < 1) { // no room left (the context or the answer is full): nothing to search for
            lastN = 0
            return IntArray(0)
        }
        val match = Lookup.findContinuation(context, size, minOf(limit, maxDraft), maxNgram)
        lastN = match.n
        if (lastN == 0) return match.follow
        val worth = worthDrafting(lastN)
        return if (worth >= match.follow.size) match.follow else match.follow.copyOf(worth)
    }

    /** Learn from the pass that checked the last proposal. */
    fun update(drafted: Int, acceptedCount: Int) {
        if (drafted == 0 || lastN == 0) return
        accepted[lastN] += acceptedCount
        if (acceptedCount < drafted) rejected[lastN] += 1
    }
}
