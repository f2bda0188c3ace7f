package dev.nomoat.core

/**
 * Stop strings over a stream of text deltas (runtime/stops.py StopMatcher).
 *
 * A stop string can arrive split across deltas ("<|im" + "_end|>"), so text that might be the start
 * of a stop string is held back until the next delta decides it. The stop string itself is never
 * emitted (like the OpenAI API and llama.cpp's server); text after it is dropped. Stop *tokens* are
 * checked on ids by the generator; this is for strings that need not be single tokens.
 */
class StopMatcher(stopStrings: List<String> = emptyList()) {
    /** What [feed] returns: the text safe to show now, and whether a stop string hit. */
    data class Fed(val text: String, val stopped: Boolean)

    private val stops: List<String>
    private val prefixes: Set<String>
    private val longestPrefix: Int
    private var held = ""

    /** The stop string that ended the stream, if any. */
    var matched: String? = null
        private set

    init {
        for (stop in stopStrings) require(stop.isNotEmpty()) { "stop strings must be non-empty strings, got \"\"" }
        stops = stopStrings.distinct() // keeps the first of each, in order
        // Every proper prefix of every stop string: the tails worth holding back.
        prefixes = stops.flatMap { stop -> (1 until stop.length).map { stop.substring(0, it) } }.toSet()
        // Not max(): Kotlin 1.3 (the host tests' compiler) returns null for no stop strings, 1.7+ (the app's)
        // throws, so every generation without stop strings would fail in the app.
        longestPrefix = prefixes.fold(0) { longest, prefix -> maxOf(longest, prefix.length) }
    }

    val stopped: Boolean get() = matched != null

    /** After a stop, every call returns ("", true). */
    fun feed(delta: String): Fed {
        if (stopped) return Fed("", true)
        if (stops.isEmpty()) return Fed(delta, false)
        val text = held + delta
        val found = findStop(text)
        if (found != null) {
            matched = found.second
            held = ""
            return Fed(text.substring(0, found.first), true)
        }
        val keep = partialMatchLength(text)
        held = text.substring(text.length - keep)
        return Fed(text.substring(0, text.length - keep), false)
    }

    /** At the end of generation: the held-back text was not a stop string after all. */
    fun flush(): String {
        val out = held
        held = ""
        return out
    }

    /** The earliest stop string in [text] (least text emitted when stop strings overlap). */
    private fun findStop(text: String): Pair<Int, String>? {
        var best: Pair<Int, String>? = null
        for (stop in stops) {
            val at = text.indexOf(stop)
            if (at != -1 && (best == null || at < best.first)) best = Pair(at, stop)
        }
        return best
    }

    /** Length of the longest suffix of [text] that is a proper prefix of some stop string. */
    private fun partialMatchLength(text: String): Int {
        for (length in minOf(text.length, longestPrefix) downTo 1) {
            if (text.substring(text.length - length) in prefixes) return length
        }
        return 0
    }
}
