package dev.nomoat.core

import org.json.JSONObject

/**
 * The benchmark's prompt, as runtime/bench.py builds it, so phone and host numbers measure the same ids;
 * and the lines the app's benchmark mode logs for the host (converter/deploy_bench.py reads them).
 */
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

    /** The intent extra with the host's id for this run, and the key under which every line of the run
     *  repeats it: the host reads only its own run's lines, whatever the log still holds of earlier runs
     *  (it cannot clear the log: `logcat -c` fails while another reader, such as Android Studio, streams it). */
    const val RUN = "bench_run"

    /** A round's line: GenerationStats.toBenchJson's keys, then round and peak RSS, prompt_lookup on a
     *  lookup round, then [info] (the bundle, its load timings, threads, the bandwidth probe's reading). */
    fun roundLine(run: String?, stats: GenerationStats, round: Int, peakRssBytes: Any, lookup: Int,
                  info: JSONObject): String {
        val line = stats.toBenchJson().put("round", round).put("peak_rss_bytes", peakRssBytes)
        if (lookup > 0) line.put("prompt_lookup", lookup)
        for (key in info.keys()) line.put(key, info.get(key))
        return tagged(run, line)
    }

    /** The last line of a run that measured every round. */
    fun doneLine(run: String?): String = tagged(run, JSONObject().put("done", true))

    /** The last line of a run that failed, with what went wrong. */
    fun errorLine(run: String?, message: String): String = tagged(run, JSONObject().put("error", message))

    /** No run id (the bench started by hand without the extra): the line as it is. */
    private fun tagged(run: String?, line: JSONObject): String = (if (run != null) line.put(RUN, run) else line).toString()
}
