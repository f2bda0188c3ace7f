package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

/** The tokenizer on a hand-written tokenizer.json (the cross-check with `tokenizers` is in Python). */
class TokenizerTest {
    // Byte-level characters: "Ġ" is a space; é is C3 A9 = "Ã©"; 😀 is F0 9F 98 80 = "ðŁĺĢ".
    private val vocab = listOf("a", "b", "c", "Ġ", "ab", "bc", "abc", "Ã", "©", "Ã©", "ð", "Ł", "ĺ", "Ģ", "ðŁ", "ĺĢ")
    private val added = listOf("<|im_end|>" to 16, "<x>" to 17, "<x>y" to 18)
    /** An added token that is not special: text like any other, also when streamed. */
    private val plainAdded = "<p>" to 19

    private fun tokenizerJson(
        merges: List<String> = listOf("b c", "a b", "ab c", "Ã ©", "ð Ł", "ĺ Ģ"),
        model: JSONObject.() -> Unit = {},
        root: JSONObject.() -> Unit = {}
    ): String {
        val byteLevel = JSONObject().put("type", "ByteLevel").put("add_prefix_space", false).put("use_regex", true)
        val bpe = JSONObject().put("type", "BPE").put("dropout", JSONObject.NULL)
            .put("vocab", JSONObject().also { v -> vocab.forEachIndexed { i, t -> v.put(t, i) } })
            .put("merges", JSONArray(merges))
            .apply(model)
        return JSONObject()
            .put("added_tokens", JSONArray((added + plainAdded).map { (content, id) ->
                JSONObject().put("id", id).put("content", content).put("special", id != plainAdded.second)
                    .put("normalized", false)
            }))
            .put("normalizer", JSONObject.NULL)
            .put("pre_tokenizer", byteLevel)
            .put("decoder", byteLevel)
            .put("model", bpe)
            .apply(root)
            .toString()
    }

    private val tokenizer = Tokenizer.fromJson(tokenizerJson())

    private fun ids(vararg tokens: String) = tokens.map { vocab.indexOf(it) }.toIntArray()

    @Test
    fun aSuffixEncodesAloneUnlessEachPieceGainsALeadingSpace() {
        assertTrue(tokenizer.encodesAlone("abc"))  // no add_prefix_space: any suffix
        val spaced = Tokenizer.fromJson(tokenizerJson(root = {
            put("pre_tokenizer", JSONObject().put("type", "ByteLevel").put("add_prefix_space", true).put("use_regex", true))
        }))
        // Alone, "bc" gains the space it does not have after "a": the rule says so, and the encodings show it.
        assertArrayEquals(ids("Ġ", "bc"), spaced.encode("bc"))
        assertFalse(spaced.encodesAlone("bc"))
        assertFalse((spaced.encode("a") + spaced.encode("bc")).contentEquals(spaced.encode("abc")))
        // After an added token a piece starts anew either way.
        assertTrue(spaced.encodesAlone("<|im_end|>bc"))
        assertArrayEquals(spaced.encode("a") + spaced.encode("<|im_end|>bc"), spaced.encode("a<|im_end|>bc"))
        assertTrue(spaced.encodesAlone(""))
    }

    @Test
    fun lowerRankedMergesApplyFirst() {
        assertArrayEquals(ids("a", "bc"), tokenizer.encode("abc"))  // "b c" ranks before "a b"
        val abFirst = Tokenizer.fromJson(tokenizerJson(merges = listOf("a b", "b c", "ab c")))
        assertArrayEquals(ids("abc"), abFirst.encode("abc"))
        assertArrayEquals(ids("ab", "ab", "a"), abFirst.encode("ababa"))
    }

    @Test
    fun mergesMayBePairs() {
        val pairs = JSONArray(listOf(JSONArray(listOf("a", "b")), JSONArray(listOf("b", "c"))))
        val t = Tokenizer.fromJson(tokenizerJson(model = { put("merges", pairs) }))
        assertArrayEquals(ids("ab", "c"), t.encode("abc"))
    }

    @Test
    fun ignoreMergesTakesAWholeWordFromTheVocabulary() {
        // Without merges "abc" stays in pieces, unless ignore_merges looks the whole word up first.
        assertArrayEquals(ids("a", "b", "c"), Tokenizer.fromJson(tokenizerJson(merges = listOf())).encode("abc"))
        val t = Tokenizer.fromJson(tokenizerJson(merges = listOf(), model = { put("ignore_merges", true) }))
        assertArrayEquals(ids("abc"), t.encode("abc"))
    }

    @Test
    fun spacesAndNonAsciiGoThroughTheByteMap() {
        assertArrayEquals(ids("a", "Ġ", "Ã©", "Ġ", "ðŁ", "ĺĢ"), tokenizer.encode("a é 😀"))
        assertEquals("a é 😀", tokenizer.decode(tokenizer.encode("a é 😀")))
    }

    @Test
    fun addedTokensAreMatchedFirstAndLongestFirst() {
        assertArrayEquals(intArrayOf(4, 16, 2), tokenizer.encode("ab<|im_end|>c"))
        assertArrayEquals(intArrayOf(18), tokenizer.encode("<x>y"))
        assertArrayEquals(intArrayOf(17, 0), tokenizer.encode("<x>a"))
        assertEquals("ab<|im_end|>c<x>y", tokenizer.decode(intArrayOf(4, 16, 2, 18)))
        assertEquals(16, tokenizer.tokenToId("<|im_end|>"))
    }

    @Test
    fun anEmptyTextHasNoTokens() {
        assertArrayEquals(intArrayOf(), tokenizer.encode(""))
    }

    @Test
    fun theStreamDecoderEmitsASplitEmojiOnceWhole() {
        val stream = tokenizer.streamDecoder()
        assertEquals("a", stream.push(0))
        assertEquals("", stream.push(10))  // F0
        assertEquals("", stream.push(11))  // 9F
        assertEquals("😀", stream.push(15))  // 98 80
        assertEquals("", stream.flush())
    }

    @Test
    fun theStreamDecoderShowsNoSpecialTokensAsPythonStreams() {
        // runtime/detokenizer.py decodes with skip_special_tokens=True; decode() keeps them (what the model saw).
        fun streamed(vararg ids: Int): String {
            val stream = tokenizer.streamDecoder()
            return ids.joinToString("") { stream.push(it) } + stream.flush()
        }
        assertEquals("ab", streamed(0, 16, 1))
        assertEquals("a<|im_end|>b", tokenizer.decode(intArrayOf(0, 16, 1)))
        assertEquals("a<p>b", streamed(0, 19, 1))  // not special: shown
        assertEquals("😀", streamed(14, 16, 15))  // the bytes on both sides of it still make one character
    }

    @Test
    fun specialTokenIdIsTheIdOfOneSpecialToken() {
        assertEquals(16, tokenizer.specialTokenId("<|im_end|>"))
        assertEquals(17, tokenizer.specialTokenId("<x>"))
        assertNull(tokenizer.specialTokenId("<p>"))  // an added token, but shown as text
        assertNull(tokenizer.specialTokenId("ab"))  // a token, not special
        assertNull(tokenizer.specialTokenId("<|im_end|>a"))
    }

    @Test
    fun unfinishedBytesBecomeOneReplacementCharacter() {
        val stream = tokenizer.streamDecoder()
        assertEquals("", stream.push(14))  // F0 9F, the first half of 😀
        assertEquals("\uFFFD", stream.flush())
        assertEquals("\uFFFD", tokenizer.decode(intArrayOf(14)))
        // A byte that cannot continue the character ends it at once, as a whole decode would.
        val again = tokenizer.streamDecoder()
        assertEquals("", again.push(7))  // C3
        assertEquals("\uFFFDa", again.push(0))
        assertEquals("\uFFFDa", tokenizer.decode(intArrayOf(7, 0)))
    }

    @Test
    fun malformedBytesAreReplacedLikeRustsFromUtf8Lossy() {
        fun bytes(vararg b: Int) = ByteArray(b.size) { b[it].toByte() }
        // One U+FFFD per maximal well-formed prefix: ED B7 is two (java.lang.String gives one).
        assertEquals("\uFFFD\uFFFD5", Utf8.decode(bytes(0xED, 0xB7, 0x35), 0, 3))
        assertEquals("\uFFFD\uFFFD", Utf8.decode(bytes(0xE0, 0x80), 0, 2))
        assertEquals("\uFFFDx", Utf8.decode(bytes(0xF0, 0x9F, 0x98, 0x78), 0, 4))
        assertEquals("é😀", Utf8.decode(bytes(0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80), 0, 6))
        assertEquals(3, Utf8.incompleteTail(bytes(0x61, 0xF0, 0x9F, 0x98)))
        assertEquals(0, Utf8.incompleteTail(bytes(0x61, 0xED, 0xB7)))  // never completable: emit now
    }

    @Test
    fun otherModelTypesAreRefusedByName() {
        val e = refused(tokenizerJson(model = { put("type", "WordPiece") }))
        assertTrue(e, e.contains("WordPiece") && e.contains("byte-level BPE"))
    }

    @Test
    fun dropoutIsRefused() {
        val e = refused(tokenizerJson(model = { put("dropout", 0.1) }))
        assertTrue(e, e.contains("dropout") && e.contains("byte-level BPE"))
    }

    @Test
    fun sentencePieceStylePreTokenizersAreRefused() {
        val metaspace = JSONObject().put("type", "Metaspace").put("replacement", "▁")
        val e = refused(tokenizerJson(root = { put("pre_tokenizer", metaspace) }))
        assertTrue(e, e.contains("Metaspace") && e.contains("byte-level BPE"))
    }

    private fun refused(json: String): String {
        try {
            Tokenizer.fromJson(json)
        } catch (e: IllegalArgumentException) {
            return e.message ?: ""
        }
        fail("the tokenizer was accepted")
        throw AssertionError()
    }

    @Test
    fun textWithHalfASurrogatePairIsRefusedNotChangedToAQuestionMark() {
        assertArrayEquals(intArrayOf(14, 15), tokenizer.encode("\uD83D\uDE00"))  // 😀, a whole pair: "ðŁ", "ĺĢ"
        for ((text, said) in listOf("a\uD800b" to "U+D800 at character 2", "😀\uDE00" to "U+DE00 at character 2",
            "ab\uD83D" to "U+D83D at character 3")) {
            try {
                tokenizer.encode(text)
                fail("encoded $text")
            } catch (e: IllegalArgumentException) {
                assertTrue(e.message!!, e.message!!.contains("lone surrogate $said") && e.message!!.contains("remove it"))
            }
        }
    }
}
