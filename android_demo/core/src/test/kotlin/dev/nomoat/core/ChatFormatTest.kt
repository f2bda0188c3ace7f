package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.time.LocalDateTime

class ChatFormatTest {
    // SmolLM2's template as converter/chat_format.py writes it (tests/test_chat_format.py checks the same pieces).
    private val smol = ChatFormat(
        firstTurn = listOf(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" +
                "<|im_start|>user\n", "user", "<|im_end|>\n<|im_start|>assistant\n"),
        firstTurnWithSystem = listOf("<|im_start|>system\n", "system", "<|im_end|>\n<|im_start|>user\n", "user",
            "<|im_end|>\n<|im_start|>assistant\n"),
        nextTurn = listOf("", "assistant", "<|im_end|>\n<|im_start|>user\n", "user", "<|im_end|>\n<|im_start|>assistant\n")
    )

    @Test
    fun theDefaultSystemMessageComesWithTheFirstTurn() {
        assertEquals(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" +
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            smol.render(listOf(Message("user", "Hi"))))
    }

    @Test
    fun rendersASystemMessageAndLaterTurns() {
        val messages = listOf(Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
            Message("user", "Bye"))
        assertEquals(
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" +
                "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
            smol.render(messages))
    }

    @Test
    fun aLaterTurnExtendsTheEarlierPrompt() {
        // What Chat relies on to feed only the new tokens.
        val one = listOf(Message("user", "Hi"))
        val two = one + listOf(Message("assistant", "Hello!"), Message("user", "Bye"))
        assertTrue(smol.render(two).startsWith(smol.render(one) + "Hello!"))
    }

    @Test
    fun refusesConversationsThePiecesWereNotCheckedFor() {
        for (roles in listOf(listOf<String>(), listOf("system"), listOf("assistant"), listOf("user", "assistant"),
            listOf("user", "user"), listOf("user", "system", "user"))) {
            try {
                smol.render(roles.map { Message(it, "x") })
                fail("rendered roles $roles")
            } catch (e: IllegalArgumentException) {
                assertTrue(e.message!!, e.message!!.contains("alternation"))
            }
        }
    }

    /** SmolLM2's pieces as the manifest holds them. */
    private fun smolSection(): JSONObject = JSONObject()
        .put("first_turn", JSONArray(smol.firstTurn))
        .put("first_turn_with_system", JSONArray(smol.firstTurnWithSystem))
        .put("next_turn", JSONArray(smol.nextTurn))

    private fun manifest(chatFormat: Any?): Manifest = Manifest.fromJson(BundleTest.manifestJson().put("chat_format", chatFormat))

    @Test
    fun readsTheManifestSection() {
        val format = ChatFormat.fromManifest(manifest(smolSection()))
        assertEquals(smol.render(listOf(Message("user", "Hi"))), format.render(listOf(Message("user", "Hi"))))
    }

    @Test
    fun aBundleWithoutChatFormatSaysWhatToDo() {
        for (absent in listOf(null, JSONObject.NULL)) {
            val m = manifest(absent)
            assertNull(ChatFormat.fromManifestOrNull(m))
            try {
                ChatFormat.fromManifest(m)
                fail("no chat_format accepted")
            } catch (e: BundleException) {
                assertTrue(e.message!!, e.message!!.contains("no chat_format") && e.message!!.contains("raw prompts"))
            }
        }
    }

    @Test
    fun refusesMalformedPieces() {
        val bad = listOf(
            JSONObject().put("first_turn", JSONArray(smol.firstTurn)), // lists missing
            JSONObject().put("first_turn", JSONArray(listOf("a", "assistant", "b")))
                .put("first_turn_with_system", JSONArray(smol.firstTurnWithSystem)).put("next_turn", JSONArray(smol.nextTurn)),
            JSONObject().put("first_turn", JSONArray(listOf("a", 3, "b")))
                .put("first_turn_with_system", JSONArray(smol.firstTurnWithSystem)).put("next_turn", JSONArray(smol.nextTurn))
        )
        for (section in bad) {
            try {
                ChatFormat.fromManifest(manifest(section))
                fail("accepted $section")
            } catch (e: BundleException) {
                assertTrue(e.message!!, e.message!!.contains("chat_format") && e.message!!.contains("re-convert"))
            }
        }
    }

    // Llama 3.2's shape as converter/chat_format.py writes it: every content trimmed, today's date in the system turn.
    private val llama32 = ChatFormat(
        firstTurn = listOf("<s>sys\nToday Date: ${ChatFormat.dateMark(0)}\n\nuser\n", "user", "\nassistant\n"),
        firstTurnWithSystem = listOf("<s>sys\nToday Date: ${ChatFormat.dateMark(0)}\n\n", "system", "\nuser\n",
            "user", "\nassistant\n"),
        nextTurn = listOf("", "assistant", "\nuser\n", "user", "\nassistant\n"),
        contentOps = mapOf("system" to listOf("strip"), "user" to listOf("strip"), "assistant" to listOf("strip")),
        dates = listOf("%d %b %Y"),
        clock = { LocalDateTime.of(2024, 3, 5, 7, 8, 9) }
    )

    @Test
    fun contentIsTrimmedAsPythonTrimsAndTheDateIsTodays() {
        assertEquals("<s>sys\nToday Date: 05 Mar 2024\n\nuser\nHi\u200b\nassistant\n",
            llama32.render(listOf(Message("user", " \u0085\u001cHi\u200b\u2003\n"))))
    }

    @Test
    fun anEarlierAnswerLosesItsReasoning() {
        val qwen3 = ChatFormat(smol.firstTurn, smol.firstTurnWithSystem, smol.nextTurn,
            contentOps = mapOf("assistant" to listOf("after_think_lstrip")))
        val messages = listOf(Message("user", "Hi"), Message("assistant", "<think>\nhm</think>\n\nHello! "),
            Message("user", "Bye"))
        assertTrue(qwen3.render(messages).contains("<|im_start|>assistant\nHello! <|im_end|>"))
        val plain = listOf(Message("user", "Hi"), Message("assistant", "\nHello"), Message("user", "Bye"))
        assertTrue(qwen3.render(plain).contains("<|im_start|>assistant\n\nHello<|im_end|>"))
    }

    @Test
    fun formatsDatesAsPythonsStrftime() {
        val t = LocalDateTime.of(2024, 9, 3, 13, 4, 5)
        assertEquals("03|09|24|2024|Sep|September|Tue|Tuesday|13|04|05|247|PM|%|%q",
            ChatFormat.strftime("%d|%m|%y|%Y|%b|%B|%a|%A|%H|%M|%S|%j|%p|%%|%q", t))
    }

    @Test
    fun refusesContentOpsAndDateCodesItCannotDo() {
        for ((key, value) in listOf("content" to JSONObject().put("user", JSONArray(listOf("upper"))),
            "content" to JSONObject().put("tool", JSONArray(listOf("strip"))), "dates" to JSONArray(listOf("%d %Z")))) {
            try {
                ChatFormat.fromManifest(manifest(smolSection().put(key, value)))
                fail("accepted $key $value")
            } catch (e: BundleException) {
                assertTrue(e.message!!, e.message!!.contains("chat_format.$key") && e.message!!.contains("update the app"))
            }
        }
    }

    @Test
    fun theGenerationPromptEndsThePromptButNotAnAnsweredTurn() {
        // DeepSeek-R1-Distill's shape: "<think>\n" opens the answer, an earlier answer renders without it.
        val section = JSONObject().put("first_turn", JSONArray(listOf("<s><U>", "user", "<A>")))
            .put("first_turn_with_system", JSONArray(listOf("<s>", "system", "<U>", "user", "<A>")))
            .put("next_turn", JSONArray(listOf("", "assistant", "<E><U>", "user", "<A>")))
            .put("generation_prompt", "<think>\n")
        val format = ChatFormat.fromManifest(manifest(section))
        assertEquals("<s><U>Hi<A><think>\n", format.render(listOf(Message("user", "Hi"))))
        assertEquals("<s><U>Hi<A>Hello<E><U>Bye<A><think>\n",
            format.render(listOf(Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye"))))
        try {
            ChatFormat.fromManifest(manifest(section.put("generation_prompt", 3)))
            fail("a generation_prompt that is not a string accepted")
        } catch (e: BundleException) {
            assertTrue(e.message!!, e.message!!.contains("chat_format.generation_prompt") && e.message!!.contains("re-convert"))
        }
    }

    @Test
    fun withoutASystemTurnASystemMessageIsRefused() {
        // Llama 2's, Mistral's, Gemma's: the template takes no system message as fixed text.
        val format = ChatFormat.fromManifest(manifest(smolSection().put("first_turn_with_system", JSONObject.NULL)))
        assertNull(format.firstTurnWithSystem)
        assertEquals(smol.render(listOf(Message("user", "Hi"))), format.render(listOf(Message("user", "Hi"))))
        try {
            format.render(listOf(Message("system", "Be brief."), Message("user", "Hi")))
            fail("a system message rendered without a system turn")
        } catch (e: IllegalArgumentException) {
            assertEquals(ChatFormat.NO_SYSTEM, e.message)
        }
    }
}
