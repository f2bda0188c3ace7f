package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

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

    private fun manifest(chatFormat: Any?): Manifest = Manifest.fromJson(BundleTest.manifestJson().put("chat_format", chatFormat))

    @Test
    fun readsTheManifestSection() {
        val section = JSONObject()
            .put("first_turn", JSONArray(smol.firstTurn))
            .put("first_turn_with_system", JSONArray(smol.firstTurnWithSystem))
            .put("next_turn", JSONArray(smol.nextTurn))
        val format = ChatFormat.fromManifest(manifest(section))
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
}
