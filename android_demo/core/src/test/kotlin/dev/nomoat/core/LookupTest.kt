package dev.nomoat.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class LookupTest {
    private val codec = LetterCodec()

    private fun ids(vararg xs: Int) = xs

    private fun generator(forward: FakeForward) = Generator(forward, codec, listOf(Letters.END))

    /**
     * Rejected drafts are forgotten: the positions the generator counts as cached hold the prompt and
     * the answer (all but its last token, which no pass needed), as the model saw them.
     */
    private fun assertCacheHoldsTheRealTokens(g: Generator, forward: FakeForward, prompt: IntArray, answer: Generation) {
        val held = g.cachedTokens.toList()
        val real = (prompt + answer.tokenIds).toList()
        assertTrue("${held.size} cached of ${real.size}", held.size >= real.size - 1)
        assertEquals(real.subList(0, held.size), held)
        assertEquals(held, forward.cache.subList(0, held.size))
    }

    @Test
    fun findsTheLatestContinuationOfTheLongestMatch() {
        val seq = ids(1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3)
        val match = Lookup.findContinuation(seq, seq.size, 2)
        assertEquals(3, match.n)
        assertArrayEquals(ids(7, 5), match.follow)
        assertEquals(0, Lookup.findContinuation(ids(1, 2, 3, 4), 4, 3).n)
        val one = Lookup.findContinuation(ids(5, 6, 5), 3, 3)
        assertEquals(1, one.n)
        assertArrayEquals(ids(6, 5), one.follow)
        // Only the first `size` tokens are the context (the rest of the array is room to grow).
        assertEquals(0, Lookup.findContinuation(ids(5, 6, 7, 5), 3, 3).n)
        assertEquals(2, Lookup.acceptedPrefix(ids(4, 5, 6), ids(4, 5, 9, 1)))
    }

    @Test
    fun theDrafterStopsDraftingWhereDraftsFailAndGoesOnWhereTheyPass() {
        val drafter = Drafter(8, cost = 0.25)
        val oneTokenMatch = ids(5, 1, 2, 3, 4, 6, 7, 8, 9, 10, 5) // only the last token occurred before
        assertArrayEquals(ids(1, 2, 3, 4, 6, 7, 8, 9), drafter.propose(oneTokenMatch, oneTokenMatch.size, 8))
        val lengths = arrayListOf(8)
        repeat(3) {
            drafter.update(lengths.last(), 0) // every draft rejected
            lengths.add(drafter.propose(oneTokenMatch, oneTokenMatch.size, 8).size)
        }
        // q = 1/2, 1/3, 1/4: the j-th draft while q^j >= 0.25, then none (plain steps)
        assertEquals(listOf(8, 2, 1, 0), lengths)
        drafter.update(0, 0) // a pass without drafts teaches nothing
        assertEquals(0.25, drafter.acceptance(1), 0.0)
        val threeTokenMatch = ids(1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3) // judged on its own record
        assertArrayEquals(ids(4, 5, 6, 7, 8, 9, 1, 2), drafter.propose(threeTokenMatch, threeTokenMatch.size, 8))
        assertArrayEquals(ids(4, 5), drafter.propose(threeTokenMatch, threeTokenMatch.size, 2)) // the room left
        assertArrayEquals(ids(), drafter.propose(threeTokenMatch, threeTokenMatch.size, 0)) // none left: a plain step
        val always = Drafter(8, cost = 0.0)
        assertArrayEquals(ids(9, 1, 2, 3), always.propose(ids(1, 2, 3, 9, 1, 2, 3), 7, 8))
        try {
            Drafter(0)
            fail("a drafter of 0 tokens was accepted")
        } catch (e: IllegalArgumentException) {
            assertTrue(e.message!!, e.message!!.contains("maxDraft"))
        }
    }

    @Test
    fun lookupGivesTheGreedyTokensInFewerPasses() {
        val prompt = codec.encode("abcdefghijklmnopqrstuvwxyz".repeat(2))
        val plainForward = FakeForward.endless(maxContext = 128)
        val plain = generator(plainForward).generate(prompt, 40, ignoreEos = true)
        val forward = FakeForward.endless(maxContext = 128)
        val g = generator(forward)
        val fast = g.generate(prompt, 40, ignoreEos = true, promptLookup = 4)
        assertArrayEquals(plain.tokenIds, fast.tokenIds)
        assertEquals(plain.text, fast.text)
        assertEquals(Generation.LENGTH, fast.finishReason)
        assertTrue("drafted ${fast.stats.draftedTokens}", fast.stats.acceptedTokens > 0)
        assertEquals(fast.stats.draftedTokens, fast.stats.acceptedTokens) // the fake never disagrees with its drafts
        // One prefill, then one pass per 1 + 4 tokens (the last pass is cut to the tokens still wanted).
        assertEquals(plainForward.calls.size - 1, 39)
        assertTrue("${forward.calls.size} passes", forward.calls.size <= 1 + 8)
        assertCacheHoldsTheRealTokens(g, forward, prompt, fast)
    }

    @Test
    fun rejectedDraftsAreForgottenAndTheModelsOwnTokenFollows() {
        // The prompt says "a" is followed by "x", but the model follows "a" with "b": every draft from "a" fails.
        val prompt = codec.encode("axaxaxax")
        val forward = FakeForward(64) { last -> if (last == 0) 1 else 0 } // a -> b, anything else -> a
        val plain = generator(FakeForward(64) { last -> if (last == 0) 1 else 0 }).generate(prompt, 12, ignoreEos = true)
        val g = generator(forward)
        val fast = g.generate(prompt, 12, ignoreEos = true, promptLookup = 4)
        assertEquals("abababababab", plain.text)
        assertEquals(plain.text, fast.text)
        assertTrue(fast.stats.draftedTokens > fast.stats.acceptedTokens)
        assertCacheHoldsTheRealTokens(g, forward, prompt, fast)
    }

    @Test
    fun aStopTokenAmongAcceptedDraftsEndsTheAnswer() {
        // "abcde<|end|>" was seen before, so after "d" the drafts run through the stop token.
        val prompt = codec.encode("abcde<|end|>abc")
        val plain = generator(FakeForward.countingUp()).generate(prompt, 10)
        val forward = FakeForward.countingUp()
        val fast = generator(forward).generate(prompt, 10, promptLookup = 4)
        assertEquals("de", plain.text)
        assertEquals(plain.text, fast.text)
        assertArrayEquals(plain.tokenIds, fast.tokenIds)
        assertEquals(Generation.STOP, fast.finishReason)
        // "e" and the stop token came from one pass; only "e" is in the answer, so only "e" was accepted.
        assertTrue(fast.stats.draftedTokens >= 2)
        assertEquals(1, fast.stats.acceptedTokens)
    }

    @Test
    fun sampledRequestsRunPlain() {
        val forward = FakeForward.endless(maxContext = 128)
        val prompt = codec.encode("abcdefghijklmnopqrstuvwxyz")
        val sampled = generator(forward).generate(prompt, 8, SamplingParams(temperature = 0.7, seed = 1),
            ignoreEos = true, promptLookup = 4)
        assertEquals(0, sampled.stats.draftedTokens)
        assertEquals(1 + 7, forward.calls.size) // prefill, then one token a pass
        val penalized = generator(FakeForward.endless(maxContext = 128)).generate(prompt, 8,
            SamplingParams(repetitionPenalty = 1.3), ignoreEos = true, promptLookup = 4)
        assertEquals(0, penalized.stats.draftedTokens)
    }

    @Test
    fun lookupFillsTheContextAsPlainDecodingDoes() {
        val prompt = codec.encode("abcdefghijklmnopqrstuvwxyz".repeat(2))
        val plain = generator(FakeForward.endless(maxContext = 60)).generate(prompt, 30, ignoreEos = true)
        val fast = generator(FakeForward.endless(maxContext = 60)).generate(prompt, 30, ignoreEos = true, promptLookup = 4)
        assertEquals(60 - prompt.size + 1, plain.tokenIds.size) // the last token needs the last position
        assertArrayEquals(plain.tokenIds, fast.tokenIds)
        assertEquals(Generation.LENGTH, plain.finishReason) // cut off by the context, not finished
        assertEquals(Generation.LENGTH, fast.finishReason)
    }

    @Test
    fun theDefaultRunAllFeedsOneTokenAtATime() {
        val forward = FakeForward.endless()
        val plainForward = object : Forward {
            override val maxContext = forward.maxContext
            override fun run(ids: IntArray, startPos: Int) = forward.run(ids, startPos)
        }
        val rows = plainForward.runAll(codec.encode("abc"), 0)
        assertEquals(listOf(listOf(0), listOf(1), listOf(2)), forward.calls.map { it.ids })
        assertEquals(listOf(1, 2, 3), rows.map { Sampler.argmax(it) })
    }

    @Test
    fun aChatWithLookupGivesTheSameTurnsAndDraftsFromTheWholeConversation() {
        val format = ChatFormat(
            firstTurn = listOf("u:", "user", "\na:"),
            firstTurnWithSystem = listOf("s:", "system", "\nu:", "user", "\na:"),
            nextTurn = listOf("", "assistant", "\nu:", "user", "\na:")
        )
        fun converse(lookup: Int): List<Generation> {
            val chat = Chat(generator(FakeForward.countingUp(maxContext = 256)), format)
            return listOf("abc", "xyz", "abcd").map { chat.send(it, 8, promptLookup = lookup) }
        }
        val plain = converse(0)
        val drafted = converse(4)
        assertEquals(plain.map { it.text }, drafted.map { it.text })
        assertEquals(0, plain.sumBy { it.stats.draftedTokens })
        // Later turns answer as earlier ones did ("bcde" after "a:"): drafted from the conversation, and kept.
        assertTrue(drafted.last().stats.acceptedTokens > 0)
        // The rewound drafts left the cache exact: the next turn still prefills only its new text.
        assertEquals(plain.last().stats.prefillTokens, drafted.last().stats.prefillTokens)
    }
}
