package dev.nomoat.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.json.JSONObject
import org.junit.Test

class GeneratorTest {
    private val codec = LetterCodec()

    private fun generator(forward: FakeForward, chunk: Int = 64) =
        Generator(forward, codec, listOf(Letters.END), prefillChunk = chunk)

    @Test
    fun greedyFollowsTheLogitsUntilMaxNewTokens() {
        val forward = FakeForward.endless()
        val deltas = ArrayList<String>()
        val result = generator(forward).generate(codec.encode("abc"), 4) { deltas.add(it) }
        assertEquals("defg", result.text)
        assertEquals(listOf("d", "e", "f", "g"), deltas)
        assertEquals(Generation.LENGTH, result.finishReason)
        // Prefill in one run, then one run per token except the last (nothing needs its logits).
        assertEquals(listOf(listOf(0, 1, 2), listOf(3), listOf(4), listOf(5)), forward.calls.map { it.ids })
        assertEquals(listOf(0, 3, 4, 5), forward.calls.map { it.startPos })
        val s = result.stats
        assertEquals(3, s.promptTokens)
        assertEquals(3, s.prefillTokens)
        assertEquals(0, s.cachedTokens)
        assertEquals(4, s.generatedTokens)
        assertTrue(s.firstTokenNanos >= s.prefillNanos && s.lastTokenNanos >= s.firstTokenNanos)
    }

    @Test
    fun stopsAtAStopTokenWithoutShowingIt() {
        val result = generator(FakeForward.countingUp()).generate(codec.encode("abc"), 10)
        assertEquals("de", result.text)
        assertArrayEquals(codec.encode("de"), result.tokenIds)
        assertEquals(Generation.STOP, result.finishReason)
    }

    @Test
    fun ignoreEosGeneratesThroughTheStopToken() {
        val result = generator(FakeForward.countingUp()).generate(codec.encode("d"), 3, ignoreEos = true)
        assertArrayEquals(intArrayOf(4, Letters.END, 1), result.tokenIds)
        assertEquals(Generation.LENGTH, result.finishReason)
    }

    @Test
    fun stopsAtAStopStringSplitAcrossTokens() {
        val deltas = ArrayList<String>()
        val result = generator(FakeForward.endless()).generate(codec.encode("a"), 20, stop = listOf("ef")) {
            deltas.add(it)
        }
        assertEquals("bcd", result.text)
        assertEquals(listOf("b", "c", "d"), deltas) // "e" was held back, then dropped with the stop
        assertEquals(Generation.STOP, result.finishReason)
        assertArrayEquals(codec.encode("bcdef"), result.tokenIds) // the tokens that made the stop string
    }

    @Test
    fun aSpecialTokenIsGeneratedButNotShown() {
        // "<|end|>" is not a stop token of this generator: it is in the answer's ids, not in its text.
        val deltas = ArrayList<String>()
        val result = Generator(FakeForward.countingUp(), codec, emptyList()).generate(codec.encode("d"), 4) {
            deltas.add(it)
        }
        assertArrayEquals(intArrayOf(4, Letters.END, 1, 2), result.tokenIds)
        assertEquals("ebc", result.text)
        assertEquals(listOf("e", "b", "c"), deltas)
    }

    @Test
    fun promptIdsOutsideTheVocabularyAreRefusedBeforeAnyRun() {
        for ((ids, said) in listOf(intArrayOf(1, 28, 2) to "token id 28 at position 1 is not in the vocabulary (0 to 27)",
                                   intArrayOf(-1) to "token id -1 at position 0")) {
            val forward = FakeForward.countingUp()
            try {
                Generator(forward, codec, emptyList(), vocabSize = 28).generate(ids, 2)
                fail("accepted ${ids.toList()}")
            } catch (e: IllegalArgumentException) {
                assertTrue(e.message, e.message!!.startsWith(said))
            }
            assertTrue(forward.calls.isEmpty())
        }
        assertEquals(2, Generator(FakeForward.countingUp(), codec, emptyList(), vocabSize = 28)
            .generate(intArrayOf(0, 27), 2).tokenIds.size)
    }

    @Test
    fun aStopStringThatIsASpecialTokenStopsAtTheToken() {
        // Model._special_token_ids: the streamed text never holds "<|end|>", so it stops as a token,
        // which is then not in the answer's ids.
        val result = Generator(FakeForward.countingUp(), codec, emptyList()).generate(codec.encode("c"), 10,
            stop = listOf("x", "<|end|>"))
        assertEquals("de", result.text)
        assertArrayEquals(codec.encode("de"), result.tokenIds)
        assertEquals(Generation.STOP, result.finishReason)
        assertTrue(result.stats.stopToken)
        // As the bundle's stop tokens, it does not stop a benchmark that ignores them.
        val ignored = Generator(FakeForward.countingUp(), codec, emptyList()).generate(codec.encode("d"), 3,
            stop = listOf("<|end|>"), ignoreEos = true)
        assertArrayEquals(intArrayOf(4, Letters.END, 1), ignored.tokenIds)
    }

    @Test
    fun aHeldBackTailThatIsNoStopIsShownLater() {
        val deltas = ArrayList<String>()
        val result = generator(FakeForward.endless()).generate(codec.encode("a"), 5, stop = listOf("ex", "fz")) {
            deltas.add(it)
        }
        assertEquals("bcdef", result.text)
        assertEquals(listOf("b", "c", "d", "e", "f"), deltas) // "e" held for one token, "f" held until the end
        assertEquals(Generation.LENGTH, result.finishReason)
    }

    @Test
    fun refusesAPromptThatFillsTheContext() {
        val forward = FakeForward.endless(maxContext = 8)
        try {
            generator(forward).generate(IntArray(8) { it }, 4)
            fail("a prompt as long as the context was accepted")
        } catch (e: ContextOverflowException) {
            val message = e.message ?: ""
            assertTrue(message, message.contains("8 tokens") && message.contains("context holds 8"))
            assertTrue(message, message.contains("--max-context"))
        }
        assertEquals(0, forward.calls.size)
    }

    @Test
    fun stopsWhenTheContextIsFull() {
        val forward = FakeForward.endless(maxContext = 8)
        val result = generator(forward).generate(IntArray(6) { it }, 10)
        assertEquals("ghi", result.text) // the third token fills position 8: it is shown, never fed
        assertEquals(8, forward.cache.size)
        assertEquals(Generation.LENGTH, result.finishReason) // as runtime/model.py and OpenAI: cut off, not finished
    }

    @Test
    fun prefillsInChunks() {
        val forward = FakeForward.endless()
        generator(forward, chunk = 2).generate(codec.encode("abcde"), 1)
        assertEquals(listOf(2, 2, 1), forward.calls.map { it.ids.size })
        assertEquals(listOf(0, 2, 4), forward.calls.map { it.startPos })
    }

    @Test
    fun aSharedPrefixIsNotPrefilledAgain() {
        val forward = FakeForward.endless()
        val gen = generator(forward)
        gen.generate(codec.encode("abcdx"), 1)
        forward.calls.clear()
        val result = gen.generate(codec.encode("abcyz"), 1)
        assertEquals(listOf(listOf(24, 25)), forward.calls.map { it.ids })
        assertEquals(3, forward.calls[0].startPos)
        assertEquals(3, result.stats.cachedTokens)
        assertEquals(2, result.stats.prefillTokens)
        // The same prompt again still runs its last token: the next-token logits come from a forward.
        forward.calls.clear()
        gen.generate(codec.encode("abcyz"), 1)
        assertEquals(listOf(listOf(25)), forward.calls.map { it.ids })
    }

    @Test
    fun addsBosOnceWhenTheBundleAsksForIt() {
        val gen = Generator(FakeForward.endless(), codec, listOf(Letters.END), bosTokenId = 27, addBosToken = true)
        assertArrayEquals(intArrayOf(27, 0), gen.encode("a"))
        assertArrayEquals(intArrayOf(27, 0), gen.encode(" a"))
        assertArrayEquals(intArrayOf(0), gen.encode("a", addBos = false))
    }

    @Test
    fun anyMaxNewTokensRunsToTheContextsEnd() {
        // A bundle's max_new_tokens may be as large as Int.MAX_VALUE: the penalized and the lookup paths
        // size their arrays by what the context leaves, not by it (it overflowed, or took the whole heap).
        val penalized = SamplingParams(repetitionPenalty = 1.1)
        for ((params, lookup) in listOf(penalized to 0, SamplingParams() to 4, SamplingParams() to 0)) {
            val result = generator(FakeForward.endless(maxContext = 12))
                .generate(codec.encode("abc"), Int.MAX_VALUE, params, ignoreEos = true, promptLookup = lookup)
            assertTrue("$params, lookup $lookup", result.stats.contextFull)
            assertEquals("$params, lookup $lookup", 12 - 3 + 1, result.tokenIds.size)
        }
    }

    @Test
    fun noStopStringsHoldNothingBack() {
        // StopMatcher without stop strings: built for every generation that has none (chat, bench).
        val matcher = StopMatcher(emptyList())
        assertEquals("abc", matcher.feed("abc").text)
        assertEquals("", matcher.flush())
    }

    @Test
    fun rejectsAnEmptyPrompt() {
        try {
            generator(FakeForward.endless()).generate(IntArray(0), 4)
            fail("an empty prompt was accepted")
        } catch (e: IllegalArgumentException) {
            assertTrue(e.message!!.contains("the prompt is empty"))
        }
    }

    private val format = ChatFormat(
        firstTurn = listOf("u:", "user", "\na:"),
        firstTurnWithSystem = listOf("s:", "system", "\nu:", "user", "\na:"),
        nextTurn = listOf("", "assistant", "\nu:", "user", "\na:")
    )

    @Test
    fun chatFeedsOnlyTheNewTokensOfTheNextTurn() {
        val forward = FakeForward.countingUp()
        val chat = Chat(generator(forward), format)
        val first = chat.send("hi", 10)
        assertEquals("bcde", first.text) // ":" -> b, c, d, e, then the stop token
        assertArrayEquals(codec.encode("u:hi\na:bcde"), forward.cache.toIntArray())
        forward.calls.clear()

        val second = chat.send("ok", 10)
        val newText = "\nu:ok\na:"
        // Fed: the new prompt text, then one decode step per answer token (the stop token is never fed).
        assertEquals(newText.length + second.tokenIds.size, forward.fedIds)
        assertEquals(codec.encode(newText).toList(), forward.calls[0].ids)
        assertEquals(codec.encode("u:hi\na:bcde").size, forward.calls[0].startPos)
        assertEquals(newText.length, second.stats.prefillTokens)
        assertEquals(codec.encode("u:hi\na:bcde").size, second.stats.cachedTokens)
        // What the cache holds is exactly the whole conversation, as a fresh render would encode it.
        val whole = format.render(chat.messages.dropLast(1)) + second.text
        assertEquals(codec.encode(whole).toList(), forward.cache.subList(0, codec.encode(whole).size))
        assertEquals(listOf("user", "assistant", "user", "assistant"), chat.messages.map { it.role })
    }

    @Test
    fun chatWithATokenizerThatSpacesEachPieceEncodesTheWholeConversation() {
        // Encoded alone, the next turn's text would gain the leading space this codec gives each piece.
        val spaced = SpacedLetterCodec()
        val forward = FakeForward.countingUp()
        val chat = Chat(Generator(forward, spaced, listOf(Letters.END)), format)
        chat.send("hi", 10)
        val second = chat.send("ok", 10)
        val whole = spaced.encode(format.render(chat.messages.dropLast(1)))
        assertEquals(whole.toList(), forward.cache.subList(0, whole.size))
        assertEquals(whole.size, second.stats.promptTokens)
        assertEquals(spaced.encode("u:hi\na:bcde").size, second.stats.cachedTokens)  // the first turn still reused
    }

    @Test
    fun chatAfterACutAnswerReencodesAndStillReusesThePrefix() {
        val forward = FakeForward.countingUp()
        val chat = Chat(generator(forward), format, system = "x")
        val first = chat.send("hi", 10, stop = listOf("d"))
        assertEquals("bc", first.text) // the stop string cut the answer: the history differs from the tokens
        forward.calls.clear()
        val second = chat.send("ok", 10)
        val prompt = codec.encode(format.render(chat.messages.dropLast(1)))
        assertEquals(prompt.size, second.stats.promptTokens)
        // Cached: the first prompt and "bc" (the "d" was sampled, never fed).
        assertEquals(codec.encode("s:x\nu:hi\na:bc").size, second.stats.cachedTokens)
        assertEquals(prompt.size - second.stats.cachedTokens, forward.calls[0].ids.size)
    }

    @Test
    fun aFailedTurnLeavesNoTraceInTheHistory() {
        val forward = FakeForward.countingUp(maxContext = 12)
        val chat = Chat(generator(forward), format)
        chat.send("hi", 10)
        try {
            chat.send("abcdefghij", 10)
            fail("a turn past the context was accepted")
        } catch (e: ContextOverflowException) {
            assertTrue(e.message!!.contains("--max-context"))
        }
        assertEquals(listOf("user", "assistant"), chat.messages.map { it.role })
    }

    @Test
    fun benchJsonHasRoundResultKeys() {
        val result = generator(FakeForward.endless()).generate(codec.encode("abc"), 4)
        val json = result.stats.toBenchJson()
        assertEquals(3, json.getInt("prompt_tokens"))
        assertEquals(4, json.getInt("new_tokens"))
        assertTrue(json.getDouble("ttft_s") >= 0 && json.getDouble("decode_s") >= 0)
    }

    @Test
    fun benchPromptsRepeatTheProse() {
        assertArrayEquals(intArrayOf(1, 2, 3, 1, 2), Bench.repeatToLength(intArrayOf(1, 2, 3), 5))
        assertArrayEquals(intArrayOf(1, 2), Bench.repeatToLength(intArrayOf(1, 2, 3), 2))
    }

    @Test
    fun benchRoundsRunForwardThenBackward() {
        val order = (0 until 4).flatMap { Bench.roundOrder(listOf(0, 8), it) }
        assertEquals(listOf(0, 8, 8, 0, 0, 8, 8, 0), order)
    }

    @Test
    fun everyBenchLineCarriesTheHostsRunId() {
        val stats = generator(FakeForward.endless()).generate(codec.encode("abc"), 4).stats
        val info = JSONObject().put("bundle", "/data/local/tmp/nomoat/b").put("threads", 4)
        val round = JSONObject(Bench.roundLine("run7", stats, 2, 1000L, 8, info))
        assertEquals("run7", round.getString(Bench.RUN))
        assertEquals(2, round.getInt("round"))
        assertEquals(8, round.getInt("prompt_lookup"))
        assertEquals(4, round.getInt("threads"))
        assertEquals(4, round.getInt("new_tokens"))
        assertEquals("run7", JSONObject(Bench.doneLine("run7")).getString(Bench.RUN))
        assertTrue(JSONObject(Bench.doneLine("run7")).getBoolean("done"))
        val error = JSONObject(Bench.errorLine("run7", "no bundle"))
        assertEquals("run7" to "no bundle", error.getString(Bench.RUN) to error.getString("error"))
        // A plain round has no prompt_lookup key; a run started without the extra, no run id.
        val plain = JSONObject(Bench.roundLine(null, stats, 0, 1000L, 0, info))
        assertFalse(plain.has("prompt_lookup") || plain.has(Bench.RUN))
    }
}
