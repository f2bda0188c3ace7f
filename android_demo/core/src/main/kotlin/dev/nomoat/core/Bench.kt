package dev.nomoat.core

/** The benchmark's prompt, as runtime/bench.py builds it, so phone and host numbers measure the same ids. */
object Bench {
    /** runtime/bench.py PROSE: plain prose, no markup, no special token. */
    const val PROSE =
        "The lighthouse keeper climbed the spiral stairs each evening before the sun went down. " +
            "He trimmed the wick, polished the great lens and wrote the weather in a small notebook: " +
            "the direction of the wind, the height of the waves, the ships that passed the point. " +
            "In winter the storms came from the north and the glass rattled in its frame, but the light " +
            "never failed. Children from the village sometimes walked out along the rocks to visit him, " +
            "and he told them about the currents, the seabirds and the names of the stars over the bay."

    /** Exactly [n] ids of [PROSE], repeated end to end (synthetic_prompt_ids / repeat_to_length). */
    fun promptIds(codec: TextCodec, n: Int): IntArray = repeatToLength(codec.encode(PROSE), n)

    fun repeatToLength(ids: IntArray, n: Int): IntArray {
        require(ids.isNotEmpty()) { "cannot build a prompt from an empty token list" }
        return IntArray(n) { ids[it % ids.size] }
    }

    /** The kinds in the order round [round] runs them: forward, then backward (A B B A A B ...), as
     *  runtime/bench_worker.py round_order, so that a phone slowing down as it warms favours none. */
    fun <T> roundOrder(kinds: List<T>, round: Int): List<T> = if (round % 2 == 0) kinds else kinds.asReversed()
}
