package dev.nomoat.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNotNull
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Test

/** The chat screen's logic: /reset, and what it says once the conversation fills the context. */
class ConversationTest {
    private val codec = LetterCodec()
    private val format = ChatFormat(
        firstTurn = listOf("u:", "user", "\na:"),
        firstTurnWithSystem = listOf("s:", "system", "\nu:", "user", "\na:"),
        nextTurn = listOf("", "assistant", "\nu:", "user", "\na:")
    )

    private fun conversation(forward: FakeForward, format: ChatFormat? = this.format) =
        Conversation(Generator(forward, codec, listOf(Letters.END)), format)

    @Test
    fun resetStartsANewConversation() {
        val forward = FakeForward.countingUp()
        val conversation = conversation(forward)
        assertEquals("bcde", conversation.send("hi", 10).result!!.text)
        val reset = conversation.send("  /reset ", 10)
        assertNull(reset.result)
        assertEquals(Conversation.RESET_NOTE, reset.note)
        assertEquals(emptyList<Message>(), conversation.chat!!.messages)
        // The next message is a first turn again, its prompt only "u:ok\na:" (the shared "u:" still cached).
        val next = conversation.send("ok", 10).result!!
        assertEquals(codec.encode("u:ok\na:").size, next.stats.promptTokens)
        assertEquals(2, next.stats.cachedTokens)
        assertEquals(listOf("user", "assistant"), conversation.chat!!.messages.map { it.role })
    }

    @Test
    fun aMessageIsSentWithoutItsOuterWhitespaceAndABlankOneNotAtAll() {
        // As `nomoat chat` strips a line: a keyboard's trailing space would otherwise be a token of the prompt.
        val conversation = conversation(FakeForward.countingUp())
        val blank = conversation.send(" \n\u3000", 10)
        assertNull(blank.result)
        assertNull(blank.note)
        assertEquals(emptyList<Message>(), conversation.chat!!.messages)
        val turn = conversation.send("\u00a0 hi \n", 10).result!!
        assertEquals(codec.encode("u:hi\na:").size, turn.stats.promptTokens)
        assertEquals(Message("user", "hi"), conversation.chat!!.messages.first())
    }

    @Test
    fun anEmptySystemMessageIsASystemTurnAndNullIsNone() {
        val empty = Conversation(Generator(FakeForward.countingUp(), codec, listOf(Letters.END)), format, system = "")
        assertEquals(listOf(Message("system", "")), empty.chat!!.messages)
        assertEquals(emptyList<Message>(), conversation(FakeForward.countingUp()).chat!!.messages)
    }

    @Test
    fun anAnswerThatEndsAsUsualHasNoNote() {
        val turn = conversation(FakeForward.countingUp()).send("hi", 10)
        assertEquals(Generation.STOP, turn.result!!.finishReason)
        assertNull(turn.note)
    }

    @Test
    fun aConversationThatFillsTheContextSaysHowToStartOver() {
        val conversation = conversation(FakeForward.endless(maxContext = 16))
        // "u:hi\na:" is 7 tokens; the answer runs until the cache is full: cut off, not finished.
        val full = conversation.send("hi", 50)
        assertEquals(Generation.LENGTH, full.result!!.finishReason)
        assertTrue(full.result!!.stats.contextFull)
        assertTrue(full.note!!, full.note!!.contains("context of 16 tokens") && full.note!!.contains("cut this answer off"))
        assertTrue(full.note!!, full.note!!.contains(Conversation.START_OVER))
        // Every next message overflows; the note says how to get out rather than failing each time.
        val overflow = conversation.send("ok", 50)
        assertNull(overflow.result)
        assertTrue(overflow.note!!, overflow.note!!.contains("--max-context") && overflow.note!!.contains("/reset") &&
            overflow.note!!.contains(Conversation.NEW_CHAT))
        assertEquals(listOf("user", "assistant"), conversation.chat!!.messages.map { it.role })
        // After /reset (what New chat does) the next message is answered.
        conversation.send(Conversation.RESET, 50)
        assertNotNull(conversation.send("ok", 3).result)
    }

    @Test
    fun anAnswerCutByMaxNewTokensIsNotAFullContext() {
        val turn = conversation(FakeForward.endless(maxContext = 16)).send("hi", 3)
        assertEquals(Generation.LENGTH, turn.result!!.finishReason)
        assertEquals(false, turn.result!!.stats.contextFull)
        assertNull(turn.note)
    }

    @Test
    fun withoutAChatFormatEachMessageStandsAlone() {
        val conversation = conversation(FakeForward.endless(maxContext = 16), format = null)
        assertNull(conversation.chat)
        val full = conversation.send("abcdefgh", 50)
        assertEquals("ijklmnopq", full.result!!.text)
        assertTrue(full.note!!, full.note!!.contains("prompt and the answer filled") && !full.note!!.contains("/reset"))
        // A prompt too long by itself: starting over would not help, so the note does not say to.
        val tooLong = conversation.send("abcdefghijklmnopq", 50)
        assertTrue(tooLong.note!!, tooLong.note!!.contains("--max-context") && !tooLong.note!!.contains(Conversation.START_OVER))
        assertEquals(Conversation.RESET_NOTE, conversation.send(Conversation.RESET, 5).note)
    }

    @Test
    fun failuresAreReportedByTheirMessageOrByName() {
        assertEquals("no bundle named x", failureText(IllegalStateException("no bundle named x")))
        assertEquals("java.lang.IllegalStateException", failureText(IllegalStateException()))
        // Errors from loading a bundle: reported (not a crash), naming what happened.
        val oom = failureText(OutOfMemoryError("Failed to allocate a 98566160 byte allocation"))
        assertTrue(oom, oom.startsWith("out of memory (Failed to allocate") && oom.contains("--max-context"))
        assertEquals("java.lang.UnsatisfiedLinkError: dlopen failed: library \"libonnxruntime.so\" not found",
            failureText(UnsatisfiedLinkError("dlopen failed: library \"libonnxruntime.so\" not found")))
    }
}
