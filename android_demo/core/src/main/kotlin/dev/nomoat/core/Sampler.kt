package dev.nomoat.core

import org.json.JSONObject
import java.util.Random

/**
 * Next-token sampling over one row of logits, with the order and semantics of runtime/sampling.py:
 *
 *     penalties -> (greedy: argmax) | temperature -> top-k -> top-p -> min-p -> draw
 *
 * (the repetition penalty over the prompt and the answer, then OpenAI's frequency and presence
 * penalties over the answer alone, the ids of [history] past promptLength)
 *
 * so a bundle behaves on the phone as it does in the Python runtime (and as Hugging Face
 * `generate`, which that order follows). The arithmetic is float32 where numpy's is (the penalty,
 * the softmax weights, the min-p threshold) and float64 where numpy sums; the filtered distribution
 * ([distribution]) is compared with the Python sampler's in tests/test_android_core.py.
 * The random draws themselves differ from numpy's generator: a seed repeats on the same side only.
 */
data class SamplingParams(
    /** 0 means greedy (argmax); otherwise logits are divided by it. */
    val temperature: Double = 0.0,
    /** Keep the k most likely tokens, and any tied with the k-th (0 = off). */
    val topK: Int = 0,
    /** Keep the smallest set of most likely tokens whose mass reaches top_p (1 = off, 0 = the top token). */
    val topP: Double = 1.0,
    /** Drop tokens whose probability is below min_p * the top probability (0 = off). */
    val minP: Double = 0.0,
    /** CTRL-style penalty on every id in the history (1 = off, > 1 discourages repeats). */
    val repetitionPenalty: Double = 1.0,
    /** How many of the last history ids the penalty looks at (-1 = all, 0 = none; llama.cpp's repeat_last_n). */
    val repeatLastN: Int = -1,
    /** OpenAI's: subtract this x (times an id occurs in the answer, in the window) from its logit (0 = off). */
    val frequencyPenalty: Double = 0.0,
    /** OpenAI's: subtract this once from the logit of every id in the answer, in the window (0 = off). */
    val presencePenalty: Double = 0.0,
    /** Seed of the random generator; null draws a fresh seed. */
    val seed: Long? = null
) {
    // The same checks and messages as SamplingParams.__post_init__.
    init {
        finite("temperature", temperature)
        require(temperature >= 0.0) { "temperature must be >= 0 (0 means greedy), got $temperature" }
        require(topK >= 0) { "top_k must be >= 0 (0 turns it off), got $topK" }
        finite("top_p", topP)
        require(topP >= 0.0 && topP <= 1.0) { "top_p must be in [0, 1] (1 turns it off), got $topP" }
        finite("min_p", minP)
        require(minP in 0.0..1.0) { "min_p must be in [0, 1] (0 turns it off), got $minP" }
        finite("repetition_penalty", repetitionPenalty)
        // > 0 in float32, where it divides (a smaller one would make 0 / 0 a NaN), as in Python.
        require(repetitionPenalty.toFloat() > 0f) { "repetition_penalty must be > 0 (1 turns it off), got $repetitionPenalty" }
        require(repeatLastN >= -1) { "repeat_last_n must be >= -1 (-1 = the whole history, 0 = none), got $repeatLastN" }
        finite("frequency_penalty", frequencyPenalty)
        finite("presence_penalty", presencePenalty)
        require(seed == null || seed >= 0) { "seed must be a non-negative integer or None, got $seed" }
    }

    val greedy: Boolean get() = temperature == 0.0

    /** Whether a penalty changes anything (so the caller must pass the history). */
    val penalized: Boolean
        get() = repeatLastN != 0 && (repetitionPenalty != 1.0 || frequencyPenalty != 0.0 || presencePenalty != 0.0)

    companion object {
        private val KNOWN = listOf("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "repeat_last_n",
                                   "frequency_penalty", "presence_penalty", "seed")

        private fun finite(name: String, value: Double) =
            require(!value.isNaN() && !value.isInfinite()) { "$name must be a finite number, got $value" }

        /**
         * From a JSON request or the manifest's generation_defaults (SamplingParams.from_dict): null values
         * fall back to the default; an unknown key is an error (a typo like `topk`) unless [ignoreUnknown]
         * (generation_defaults also holds max_new_tokens; Model.sampling_params filters the same way).
         */
        fun fromJson(values: JSONObject, ignoreUnknown: Boolean = false, base: SamplingParams = SamplingParams()): SamplingParams {
            val unknown = values.keys().asSequence().filter { it !in KNOWN }.sorted().toList()
            require(ignoreUnknown || unknown.isEmpty()) {
                // Python's list repr, so both runtimes say it the same way.
                fun repr(names: List<String>) = names.joinToString(", ", "[", "]") { "'$it'" }
                "unknown sampling parameter(s) ${repr(unknown)}; expected some of ${repr(KNOWN.sorted())}"
            }
            fun given(key: String): Any? = if (values.isNull(key)) null else values.get(key)
            fun real(key: String, default: Double): Double {
                val v = given(key) ?: return default
                require(v is Number) { "$key must be a finite number, got $v" }
                return v.toDouble()
            }
            fun integer(key: String): Long? {
                val v = given(key) ?: return null
                require(v is Int || v is Long) {
                    "$key must be an integer, got $v"
                }
                return (v as Number).toLong()
            }
            // Above Int.MAX_VALUE both mean what Int.MAX_VALUE means (more than any vocabulary or
            // history), and Python takes them: clamped rather than refused.
            val topK = integer("top_k")?.coerceAtMost(Int.MAX_VALUE.toLong())
            require(topK == null || topK >= 0) { "top_k must be >= 0 (0 turns it off), got $topK" }
            val lastN = integer("repeat_last_n")?.coerceAtMost(Int.MAX_VALUE.toLong())
            require(lastN == null || lastN >= -1) {
                "repeat_last_n must be >= -1 (-1 = the whole history, 0 = none), got $lastN"
            }
            return SamplingParams(
                temperature = real("temperature", base.temperature),
                topK = topK?.toInt() ?: base.topK,
                topP = real("top_p", base.topP),
                minP = real("min_p", base.minP),
                repetitionPenalty = real("repetition_penalty", base.repetitionPenalty),
                repeatLastN = lastN?.toInt() ?: base.repeatLastN,
                frequencyPenalty = real("frequency_penalty", base.frequencyPenalty),
                presencePenalty = real("presence_penalty", base.presencePenalty),
                seed = integer("seed") ?: base.seed
            )
        }

        /** The bundle's defaults (Model.sampling_params without overrides). */
        fun fromManifest(manifest: Manifest): SamplingParams = fromJson(manifest.generationDefaults, ignoreUnknown = true)
    }
}

/** A filtered distribution: [ids] with probabilities [probs] (summing to 1), in the sampler's candidate order. */
class TokenDistribution(val ids: IntArray, val probs: DoubleArray) {
    fun toMap(): Map<Int, Double> = ids.indices.associate { ids[it] to probs[it] }
}

/**
 * Stateful sampler: owns the random generator (a seed gives a repeatable sequence of draws) and
 * vocabulary-sized scratch buffers reused across calls. One per generation; not thread-safe.
 */
class Sampler(val params: SamplingParams = SamplingParams()) {
    private val random: Random = params.seed?.let { Random(it) } ?: Random()
    private var penalized = FloatArray(0)
    private var weights = FloatArray(0)
    private var allIds = IntArray(0)

    /**
     * The next token id. [history] is the sequence so far, oldest first, its first [promptLength] ids the
     * prompt; the penalties read its last repeat_last_n ids (frequency and presence only the answer's).
     */
    fun sample(logits: FloatArray, history: IntArray = IntArray(0), promptLength: Int = 0): Int {
        val row = penalize(logits, history, promptLength)
        if (params.greedy) return argmax(row)
        val (ids, w) = filtered(row)
        return ids[draw(w, w.size)]
    }

    /** The distribution [sample] draws from (one-hot at the argmax when greedy): for tests and cross-checks. */
    fun distribution(logits: FloatArray, history: IntArray = IntArray(0), promptLength: Int = 0): TokenDistribution {
        val row = penalize(logits, history, promptLength)
        if (params.greedy) return TokenDistribution(intArrayOf(argmax(row)), doubleArrayOf(1.0))
        val (ids, w) = filtered(row)
        var total = 0.0
        for (x in w) total += x.toDouble()
        return TokenDistribution(ids.copyOf(), DoubleArray(ids.size) { w[it] / total })
    }

    private fun checkRow(logits: FloatArray) =
        require(logits.isNotEmpty()) { "expected one row of logits (vocab entries), got an empty array" }

    /** CTRL penalty as in HF (apply_repetition_penalty): seen ids' positive logits / penalty, negative ones * penalty. */
    private fun penalize(logits: FloatArray, history: IntArray, promptLength: Int): FloatArray {
        checkRow(logits)
        if (!params.penalized || history.isEmpty()) return logits
        if (penalized.size != logits.size) penalized = FloatArray(logits.size)
        System.arraycopy(logits, 0, penalized, 0, logits.size)
        val p = params.repetitionPenalty.toFloat() // numpy: float32 row op Python float stays float32
        val from = if (params.repeatLastN > 0) maxOf(0, history.size - params.repeatLastN) else 0
        for (i in from until history.size) {
            val id = history[i]
            require(id in logits.indices) { "history id $id is outside the vocabulary of ${logits.size}" }
            val seen = logits[id] // from the original row: a repeated id is penalized once
            // An extreme penalty passes float32's range: kept at the largest finite value (as numpy's clip).
            penalized[id] = (if (seen < 0f) seen * p else seen / p).coerceIn(-Float.MAX_VALUE, Float.MAX_VALUE)
        }
        val answerFrom = maxOf(from, promptLength)
        if ((params.frequencyPenalty != 0.0 || params.presencePenalty != 0.0) && answerFrom < history.size) {
            // Sorted, each id's occurrences are one run: its count without a map of boxed ids.
            val answer = history.copyOfRange(answerFrom, history.size).also { it.sort() }
            var i = 0
            while (i < answer.size) {
                var j = i
                while (j < answer.size && answer[j] == answer[i]) j++
                // As numpy computes it: the amount in float64, cast to float32, then subtracted in float32.
                val amount = ((j - i) * params.frequencyPenalty + params.presencePenalty).toFloat()
                penalized[answer[i]] = (penalized[answer[i]] - amount).coerceIn(-Float.MAX_VALUE, Float.MAX_VALUE)
                i = j
            }
        }
        return penalized
    }

    /** Candidates after temperature, top-k, top-p and min-p: ids and unnormalized weights. */
    private fun filtered(row: FloatArray): Pair<IntArray, FloatArray> {
        var ids: IntArray
        var w: FloatArray
        val k = params.topK
        if (k > 0 && k < row.size) {
            ids = topKIds(row, k)
            w = softmaxWeights(FloatArray(ids.size) { row[ids[it]] }, null)
        } else {
            if (allIds.size != row.size) {
                allIds = IntArray(row.size) { it }
                weights = FloatArray(row.size)
            }
            ids = allIds
            w = softmaxWeights(row, weights)
        }
        if (params.topP < 1.0) {
            val kept = topP(w, params.topP)
            ids = IntArray(kept.size) { ids[kept[it]] }
            w = FloatArray(kept.size) { w[kept[it]] }
        }
        if (params.minP > 0.0) {
            var top = 0f
            for (x in w) if (x > top) top = x
            val threshold = params.minP.toFloat() * top
            var n = 0
            for (x in w) if (x >= threshold) n++
            val keptIds = IntArray(n)
            val keptW = FloatArray(n)
            n = 0
            for (i in w.indices) if (w[i] >= threshold) { keptIds[n] = ids[i]; keptW[n] = w[i]; n++ }
            ids = keptIds
            w = keptW
        }
        return Pair(ids, w)
    }

    /** exp((v - max) / T) in float32, as _softmax_weights: the filters and the draw only need ratios. */
    private fun softmaxWeights(values: FloatArray, out: FloatArray?): FloatArray {
        var top = Float.NEGATIVE_INFINITY
        for (v in values) {
            if (v.isNaN()) { top = v; break }
            if (v > top) top = v
        }
        if (top.isNaN() || top.isInfinite()) {
            throw IllegalArgumentException("cannot sample: the largest logit is $top (NaN or infinite logits)")
        }
        val w = out ?: FloatArray(values.size)
        val scale = (1.0 / params.temperature).toFloat()
        if (scale.isFinite()) { // float, as runtime/sampling.py computes the weights
            for (i in values.indices) w[i] = Math.exp(((values[i] - top) * scale).toDouble()).toFloat()
            return w
        }
        // 1/T of a tiny T (1e-45) passes float's range, and the top logit's 0 * inf would be NaN. In
        // double, with a gap of 0 weighed 1 outright (1/T is infinite in double too at T = 5e-324): a
        // tiny T is greedy, ties shared (runtime/sampling.py has the same guard).
        val wide = 1.0 / params.temperature
        for (i in values.indices) {
            val gap = (values[i] - top).toDouble()
            w[i] = if (gap == 0.0) 1f else Math.exp(gap * wide).toFloat()
        }
        return w
    }

    private fun draw(w: FloatArray, n: Int): Int = search(w, n, random.nextDouble())

    companion object {
        /** [Sampler.distribution] with a fresh sampler. */
        fun distribution(logits: FloatArray, history: IntArray, params: SamplingParams,
                         promptLength: Int = 0): TokenDistribution =
            Sampler(params).distribution(logits, history, promptLength)

        /** The first index of the largest value (np.argmax; NaN never wins here). */
        /** The first index of the largest logit. A NaN is an error, as in runtime/sampling.py's greedy_token:
         *  comparisons with NaN are false, so it would be skipped here (and taken by numpy's argmax). */
        fun argmax(row: FloatArray): Int {
            var best = 0
            for (i in row.indices) {
                val v = row[i]
                require(!v.isNaN()) { NAN_LOGITS }
                if (v > row[best]) best = i
            }
            return best
        }

        internal const val NAN_LOGITS = "cannot decode: the model computed NaN logits (a broken export or a " +
            "numeric overflow in this build; convert the model again, or try another --quant)"

        /** Ids (ascending) of the k largest logits plus any tied with the k-th, as _top_k_ids / HF's `scores < kth`. */
        internal fun topKIds(row: FloatArray, k: Int): IntArray {
            for (v in row) require(!v.isNaN()) { "cannot sample: the logits contain NaN" }
            val kth = kthLargest(row, k)
            var n = 0
            for (v in row) if (v >= kth) n++
            val ids = IntArray(n)
            n = 0
            for (i in row.indices) if (row[i] >= kth) ids[n++] = i
            return ids
        }

        /** Quickselect (Hoare partition) on a copy: O(vocab), no sort of the vocabulary per token. */
        internal fun kthLargest(values: FloatArray, k: Int): Float {
            val a = values.copyOf()
            val target = a.size - k // its index in ascending order
            var lo = 0
            var hi = a.size - 1
            while (lo < hi) {
                val pivot = a[(lo + hi) ushr 1]
                var i = lo
                var j = hi
                while (i <= j) {
                    while (a[i] < pivot) i++
                    while (a[j] > pivot) j--
                    if (i <= j) {
                        val t = a[i]; a[i] = a[j]; a[j] = t
                        i++; j--
                    }
                }
                when {
                    target <= j -> hi = j
                    target >= i -> lo = i
                    else -> return a[target] // between j and i everything equals the pivot
                }
            }
            return a[target]
        }

        /**
         * Nucleus filter, _top_p_filter's rule: keep a token iff the mass ranked above it is < top_p
         * (the most likely token always stays). Only weights above total * (1 - top_p) / n can be in
         * the nucleus, so only those are sorted. Returns indices into [w], most likely first, ties by index.
         */
        internal fun topP(w: FloatArray, topP: Double): IntArray {
            if (topP <= 0.0) { // the most likely token alone, the first of equals (as the sort below ranks them)
                var top = 0
                for (i in w.indices) if (w[i] > w[top]) top = i
                return intArrayOf(top)
            }
            var total = 0.0
            for (x in w) total += x.toDouble()
            val bound = total * (1.0 - topP) / w.size
            // Every weight tied at the bound (1 - topP rounds to 1): the top one alone, as below.
            if (w.none { it > bound }) return topP(w, 0.0)
            val maybe = w.indices.filter { w[it] > bound }
                .sortedWith(Comparator { a, b -> if (w[a] != w[b]) w[b].compareTo(w[a]) else a.compareTo(b) })
            // mass above = cumsum - own weight, spelled as numpy does so the boundary rounds alike.
            var cumulative = 0.0
            var keep = 0
            val limit = topP * total
            for ((rank, i) in maybe.withIndex()) {
                cumulative += w[i].toDouble()
                val above = if (rank == 0) 0.0 else cumulative - w[i].toDouble()
                if (above < limit) keep = rank + 1 else break
            }
            return maybe.take(maxOf(1, keep)).toIntArray()
        }

        /** Inverse-CDF draw from unnormalized weights (_search): the i with cdf[i-1] <= u * total < cdf[i]. */
        internal fun search(w: FloatArray, n: Int, u: Double): Int {
            var total = 0.0
            for (i in 0 until n) total += w[i].toDouble()
            if (!(total > 0.0 && !total.isInfinite())) {
                throw IllegalArgumentException("cannot sample: no candidate token has a positive, finite probability")
            }
            val target = u * total
            var cdf = 0.0
            var lastPositive = -1
            for (i in 0 until n) {
                cdf += w[i].toDouble()
                if (w[i] > 0f) lastPositive = i
                if (cdf > target) return i // zero weights never pass: cdf does not grow on them
            }
            return lastPositive // u < 1, so only rounding gets here
        }
    }
}
