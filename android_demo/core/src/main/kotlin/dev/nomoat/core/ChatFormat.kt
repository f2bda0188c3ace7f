package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject

/** One chat message: role "system", "user" or "assistant". */
data class Message(val role: String, val content: String)

/**
 * The chat template as fixed text pieces (manifest `chat_format`, written by converter/chat_format.py):
 * the app has no Jinja. Three piece lists describe every conversation a chat screen renders (an
 * optional system message, a user turn, then (assistant reply, user turn) pairs, always with the
 * generation prompt):
 *
 *     first_turn              [text, "user", text]
 *     first_turn_with_system  [text, "system", text, "user", text]
 *     next_turn               [text, "assistant", text, "user", text]   (appended after the prompt so far)
 *
 * Even positions are literal text, odd positions name the message whose content goes there. A
 * template's default system message (the one it inserts when the conversation has none) is part of
 * first_turn's literal text. The converter checked that these pieces render exactly what the Jinja
 * template renders; a template that could not be written this way has no chat_format at all.
 */
class ChatFormat(
    val firstTurn: List<String>,
    val firstTurnWithSystem: List<String>,
    val nextTurn: List<String>
) {
    init {
        check("first_turn", firstTurn, listOf("user"))
        check("first_turn_with_system", firstTurnWithSystem, listOf("system", "user"))
        check("next_turn", nextTurn, listOf("assistant", "user"))
    }

    /**
     * The prompt for [messages] (converter/chat_format.py render_pieces): [system], user, (assistant, user)*,
     * ending with the assistant's turn opened, ready for generation. Other shapes are refused: the pieces
     * were only checked against the template for these.
     */
    fun render(messages: List<Message>): String {
        val roles = messages.map { it.role }
        val hasSystem = roles.firstOrNull() == "system"
        val turns = if (hasSystem) roles.drop(1) else roles
        val alternating = turns.isNotEmpty() && turns.size % 2 == 1 &&
            turns.withIndex().all { (i, role) -> role == if (i % 2 == 0) "user" else "assistant" }
        require(alternating) {
            "a chat_format prompt is an optional system message, then user and assistant turns in " +
                "alternation ending with a user turn; got roles $roles"
        }
        val head = messages.take(if (hasSystem) 2 else 1)
        val out = StringBuilder(fill(if (hasSystem) firstTurnWithSystem else firstTurn, head))
        val rest = messages.drop(head.size)
        for (i in rest.indices step 2) out.append(fill(nextTurn, rest.subList(i, i + 2)))
        return out.toString()
    }

    private fun fill(pieces: List<String>, messages: List<Message>): String {
        val out = StringBuilder()
        for ((i, piece) in pieces.withIndex()) out.append(if (i % 2 == 0) piece else messages[i / 2].content)
        return out.toString()
    }

    companion object {
        const val MISSING = "this bundle has no chat_format (an older nomoat converted it, or its chat template is " +
            "not fixed text around each message); re-convert it with a newer nomoat, or use raw prompts"

        /** The bundle's chat format, or null when it has none (raw prompts only). */
        fun fromManifestOrNull(manifest: Manifest): ChatFormat? = manifest.chatFormat?.let { fromJson(it) }

        /** The bundle's chat format; a [BundleException] saying what to do when it has none. */
        fun fromManifest(manifest: Manifest): ChatFormat = fromManifestOrNull(manifest) ?: throw BundleException(MISSING)

        fun fromJson(d: JSONObject): ChatFormat {
            fun pieces(key: String): List<String> {
                val a: JSONArray = d.optJSONArray(key)
                    ?: throw BundleException("manifest.json chat_format has no \"$key\" list; re-convert the model.")
                return (0 until a.length()).map {
                    a.opt(it) as? String
                        ?: throw BundleException("manifest.json chat_format.$key[$it] is not a string; re-convert the model.")
                }
            }
            return ChatFormat(pieces("first_turn"), pieces("first_turn_with_system"), pieces("next_turn"))
        }

        private fun check(key: String, pieces: List<String>, roles: List<String>) {
            val found = pieces.filterIndexed { i, _ -> i % 2 == 1 }
            if (pieces.size != 2 * roles.size + 1 || found != roles) {
                throw BundleException("manifest.json chat_format.$key should be text pieces around the contents of " +
                    "$roles, got the roles $found; re-convert the model.")
            }
        }
    }
}
