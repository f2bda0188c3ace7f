package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject
import java.time.LocalDateTime
import java.time.format.TextStyle
import java.util.Locale

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
 *     next_turn               [text, "assistant", text, "user", text]   (appended after the turns so far)
 *
 * Even positions are literal text, odd positions name the message whose content goes there. A
 * template's default system message (the one it inserts when the conversation has none) is part of
 * first_turn's literal text. first_turn_with_system is null when the template's system message is not
 * fixed text (Llama 2, Mistral, Gemma): a system message is then refused (the chat screen sends none).
 * Three optional keys: `generation_prompt` (text that ends every prompt but not an answered turn:
 * DeepSeek-R1-Distill's "<think>\n"), `content` ([contentOps]: what the template does to a
 * role's content first, e.g. Llama 3 trims every message, DeepSeek-R1 drops an earlier answer's
 * reasoning) and `dates` (strftime formats of the dates the template puts in, e.g. Llama 3.2's
 * "Today Date"; the literal text holds [DATE_MARK] in their places, filled from [clock]). The
 * converter checked that these pieces render exactly what the Jinja template renders; a template
 * that could not be written this way has no chat_format at all.
 */
class ChatFormat(
    val firstTurn: List<String>,
    val firstTurnWithSystem: List<String>?,
    val nextTurn: List<String>,
    val contentOps: Map<String, List<String>> = emptyMap(),
    val dates: List<String> = emptyList(),
    val generationPrompt: String = "",
    private val clock: () -> LocalDateTime = { LocalDateTime.now() }
) {
    init {
        check("first_turn", firstTurn, listOf("user"))
        if (firstTurnWithSystem != null) check("first_turn_with_system", firstTurnWithSystem, listOf("system", "user"))
        check("next_turn", nextTurn, listOf("assistant", "user"))
        for ((role, ops) in contentOps) {
            val unknown = ops.filter { it !in CONTENT_OPS }
            if (role !in ROLES || unknown.isNotEmpty()) {
                throw BundleException("manifest.json chat_format.content.$role asks for $ops, which this app " +
                    "cannot do${if (unknown.isEmpty()) " (not a chat role)" else " ($unknown)"}; update the app, " +
                    "or re-convert the model with the nomoat this app came with.")
            }
        }
        for (format in dates) {
            val codes = Regex("%(.)").findAll(format).map { it.groupValues[1][0] }.toSet()
            if (!DATE_CODES.containsAll(codes)) {
                throw BundleException("manifest.json chat_format.dates has the format '$format', whose codes " +
                    "${codes - DATE_CODES} this app cannot fill; update the app.")
            }
        }
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
        require(!hasSystem || firstTurnWithSystem != null) { NO_SYSTEM }
        val head = messages.take(if (hasSystem) 2 else 1)
        val out = StringBuilder(fill(if (hasSystem) firstTurnWithSystem!! else firstTurn, head))
        val rest = messages.drop(head.size)
        for (i in rest.indices step 2) out.append(fill(nextTurn, rest.subList(i, i + 2)))
        out.append(generationPrompt)
        if (dates.isEmpty()) return out.toString()
        val now = clock()
        return DATE_MARK_RE.replace(out) { strftime(dates[it.groupValues[1].toInt()], now) }
    }

    private fun fill(pieces: List<String>, messages: List<Message>): String {
        val out = StringBuilder()
        for ((i, piece) in pieces.withIndex()) out.append(if (i % 2 == 0) piece else content(messages[i / 2]))
        return out.toString()
    }

    private fun content(m: Message): String =
        (contentOps[m.role] ?: emptyList()).fold(m.content) { text, op -> CONTENT_OPS.getValue(op)(text) }

    companion object {
        private val ROLES = setOf("system", "user", "assistant")

        /** converter/chat_format.py CONTENT_OPS, by name. */
        val CONTENT_OPS: Map<String, (String) -> String> = mapOf<String, (String) -> String>(
            "strip" to { s: String -> pythonStrip(s) },  // Jinja's trim
            "after_think" to { s: String -> s.substringAfterLast("</think>") },
            "after_think_lstrip" to { s: String ->
                if ("</think>" in s) s.substringAfterLast("</think>").trimStart('\n') else s
            }
        )

        /** Where the literal text holds the i-th date (converter/chat_format.py DATE_MARK). */
        fun dateMark(i: Int): String = "\u2063nomoatdate$i\u2063"
        private val DATE_MARK_RE = Regex("\u2063nomoatdate(\\d+)\u2063")
        private val DATE_CODES = "dmyYbBaAHMSjp%".toSet()

        /** Python's str.strip(): its whitespace is not Kotlin's (U+001C..U+001F and U+0085 are, U+200B... not). */
        fun pythonStrip(s: String): String = s.trim { isPythonSpace(it) }

        private fun isPythonSpace(c: Char): Boolean = c in "\t\n\u000b\u000c\r\u001c\u001d\u001e\u001f \u0085\u00a0" +
            "\u1680\u2028\u2029\u202f\u205f\u3000" || c in '\u2000'..'\u200a'

        /** Python's datetime.strftime for [DATE_CODES], with the C locale's English names. */
        fun strftime(format: String, t: LocalDateTime): String {
            val out = StringBuilder()
            var i = 0
            while (i < format.length) {
                val c = format[i]
                if (c != '%' || i + 1 == format.length) { out.append(c); i++; continue }
                out.append(when (val code = format[i + 1]) {
                    'd' -> pad(t.dayOfMonth, 2)
                    'm' -> pad(t.monthValue, 2)
                    'y' -> pad(t.year % 100, 2)
                    'Y' -> t.year.toString()
                    'b' -> t.month.getDisplayName(TextStyle.SHORT, Locale.ENGLISH)
                    'B' -> t.month.getDisplayName(TextStyle.FULL, Locale.ENGLISH)
                    'a' -> t.dayOfWeek.getDisplayName(TextStyle.SHORT, Locale.ENGLISH)
                    'A' -> t.dayOfWeek.getDisplayName(TextStyle.FULL, Locale.ENGLISH)
                    'H' -> pad(t.hour, 2)
                    'M' -> pad(t.minute, 2)
                    'S' -> pad(t.second, 2)
                    'j' -> pad(t.dayOfYear, 3)
                    'p' -> if (t.hour < 12) "AM" else "PM"
                    '%' -> "%"
                    else -> "%$code"
                })
                i += 2
            }
            return out.toString()
        }

        // ASCII digits whatever the phone's locale ("%02d".format would use its digits)
        private fun pad(n: Int, width: Int): String = n.toString().padStart(width, '0')

        /** converter/chat_format.py NO_SYSTEM: a system message for a format without a system turn. */
        const val NO_SYSTEM = "this chat_format has no system turn (the model's chat template does not take a " +
            "system message as fixed text): leave out the system message"

        const val MISSING = "this bundle has no chat_format (an older nomoat converted it, or its chat template is " +
            "not fixed text around each message); re-convert it with a newer nomoat, or use raw prompts"

        /** The bundle's chat format, or null when it has none (raw prompts only). */
        fun fromManifestOrNull(manifest: Manifest, clock: () -> LocalDateTime = { LocalDateTime.now() }): ChatFormat? =
            manifest.chatFormat?.let { fromJson(it, clock) }

        /** The bundle's chat format; a [BundleException] saying what to do when it has none. */
        fun fromManifest(manifest: Manifest, clock: () -> LocalDateTime = { LocalDateTime.now() }): ChatFormat =
            fromManifestOrNull(manifest, clock) ?: throw BundleException(MISSING)

        fun fromJson(d: JSONObject, clock: () -> LocalDateTime = { LocalDateTime.now() }): ChatFormat {
            fun strings(a: JSONArray, key: String): List<String> = (0 until a.length()).map {
                a.opt(it) as? String
                    ?: throw BundleException("manifest.json chat_format.$key[$it] is not a string; re-convert the model.")
            }
            fun pieces(key: String): List<String> = strings(d.optJSONArray(key)
                ?: throw BundleException("manifest.json chat_format has no \"$key\" list; re-convert the model."), key)
            // null (or absent) when the template takes no system message as fixed text
            val withSystem = if (d.isNull("first_turn_with_system")) null else pieces("first_turn_with_system")
            val generationPrompt = if (!d.has("generation_prompt")) "" else d.opt("generation_prompt") as? String
                ?: throw BundleException("manifest.json chat_format.generation_prompt is not a string; re-convert the model.")
            val content = d.optJSONObject("content")?.let { c ->
                c.keys().asSequence().associateWith { role ->
                    strings(c.optJSONArray(role) ?: throw BundleException(
                        "manifest.json chat_format.content.$role is not a list; re-convert the model."), "content.$role")
                }
            } ?: emptyMap()
            val dates = d.optJSONArray("dates")?.let { strings(it, "dates") } ?: emptyList()
            return ChatFormat(pieces("first_turn"), withSystem, pieces("next_turn"), content, dates, generationPrompt,
                clock)
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
