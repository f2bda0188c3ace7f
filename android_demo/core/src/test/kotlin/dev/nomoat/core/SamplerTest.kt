package dev.nomoat.core

import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNotEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.util.Random

class SamplerTest {
    private fun logitsOf(vararg probs: Double) = FloatArray(probs.size) { Math.log(probs[it]).toFloat() }

    private fun kept(logits: FloatArray, params: SamplingParams, history: IntArray = IntArray(0)): Set<Int> =
        Sampler.distribution(logits, history, params).ids.toSet()

    private fun softmax(values: DoubleArray): DoubleArray {
        val top = values.max()!!
        val e = values.map { Math.exp(it - top) }
        return e.map { it / e.sum() }.toDoubleArray()
    }

    @Test
    fun greedyIsTheFirstArgmax() {
        val logits = floatArrayOf(0.5f, 3f, -1f, 3f, 2.9f)
        assertEquals(1, Sampler(SamplingParams()).sample(logits))
        assertEquals(setOf(1), kept(logits, SamplingParams()))
        assertEquals(1, Sampler(SamplingParams(topK = 1, topP = 0.1)).sample(logits)) // filters do not apply
    }

    @Test
    fun topKKeepsTheKLargestAndTies() {
        val logits = floatArrayOf(1f, 5f, 3f, 5f, 2f, 3f)
        assertEquals(setOf(1, 3), kept(logits, SamplingParams(temperature = 1.0, topK = 2)))
        assertEquals(setOf(1, 3, 2, 5), kept(logits, SamplingParams(temperature = 1.0, topK = 3))) // 3 tied with the 3rd
        assertEquals(setOf(1, 3), kept(logits, SamplingParams(temperature = 1.0, topK = 1))) // tied for first
        assertEquals(logits.indices.toSet(), kept(logits, SamplingParams(temperature = 1.0, topK = 6)))
        assertEquals(logits.indices.toSet(), kept(logits, SamplingParams(temperature = 1.0, topK = 60)))
    }

    @Test
    fun kthLargestAgreesWithSorting() {
        val rnd = Random(3)
        repeat(200) {
            val values = FloatArray(1 + rnd.nextInt(300)) { (rnd.nextInt(40) - 20) / 4f }
            val k = 1 + rnd.nextInt(values.size)
            assertEquals(values.sortedDescending()[k - 1], Sampler.kthLargest(values, k))
        }
    }

    @Test
    fun topPKeepsTheSmallestSetReachingTheMass() {
        val logits = logitsOf(0.05, 0.5, 0.15, 0.3)
        assertEquals(setOf(1), kept(logits, SamplingParams(temperature = 1.0, topP = 0.4)))
        assertEquals(setOf(1, 3), kept(logits, SamplingParams(temperature = 1.0, topP = 0.75)))
        assertEquals(setOf(1, 3, 2), kept(logits, SamplingParams(temperature = 1.0, topP = 0.85)))
        assertEquals(setOf(1, 3, 2, 0), kept(logits, SamplingParams(temperature = 1.0, topP = 0.99)))
        // The most likely token always stays, however small top_p is.
        assertEquals(setOf(1), kept(logits, SamplingParams(temperature = 1.0, topP = 1e-9)))
        // 0 (OpenAI's and transformers' way to ask for the top token): that token, the first of equals.
        assertEquals(setOf(1), kept(logits, SamplingParams(temperature = 1.0, topP = 0.0)))
        assertEquals(setOf(0), kept(logitsOf(0.25, 0.25, 0.25, 0.25), SamplingParams(temperature = 1.0, topP = 0.0)))
    }

    @Test
    fun minPDropsTokensBelowAFractionOfTheTop() {
        val logits = logitsOf(0.05, 0.5, 0.15, 0.3)
        assertEquals(setOf(1, 2, 3), kept(logits, SamplingParams(temperature = 1.0, minP = 0.2)))
        assertEquals(setOf(1, 3), kept(logits, SamplingParams(temperature = 1.0, minP = 0.5)))
        assertEquals(setOf(1), kept(logits, SamplingParams(temperature = 1.0, minP = 1.0)))
    }

    @Test
    fun filtersApplyInPythonsOrder() {
        // top-k 3 leaves {1,3,2}; top-p 0.6 of those (renormalized 0.53, 0.32, 0.16) keeps {1,3}; min-p 0.7 keeps {1}.
        val logits = logitsOf(0.05, 0.5, 0.15, 0.3)
        assertEquals(setOf(1, 3), kept(logits, SamplingParams(temperature = 1.0, topK = 3, topP = 0.6)))
        assertEquals(setOf(1), kept(logits, SamplingParams(temperature = 1.0, topK = 3, topP = 0.6, minP = 0.7)))
    }

    @Test
    fun repetitionPenaltyDividesPositiveAndMultipliesNegativeLogits() {
        val logits = floatArrayOf(2f, -2f, 1f, 0.5f)
        val d = Sampler.distribution(logits, intArrayOf(0, 1, 1), SamplingParams(temperature = 1.0, repetitionPenalty = 2.0))
        val expected = softmax(doubleArrayOf(1.0, -4.0, 1.0, 0.5)) // 2/2, -2*2 (once, though seen twice)
        for ((i, id) in d.ids.withIndex()) assertEquals(expected[id], d.probs[i], 1e-6)
        assertEquals(1, Sampler(SamplingParams(repetitionPenalty = 2.0)).sample(floatArrayOf(2f, 1.5f), intArrayOf(0)))
        assertEquals(0, Sampler(SamplingParams(repetitionPenalty = 2.0)).sample(floatArrayOf(2f, 1.5f), intArrayOf()))
        // The caller's logits are untouched.
        assertArrayEquals(floatArrayOf(2f, -2f, 1f, 0.5f), logits, 0f)
    }

    @Test
    fun temperatureScalesTheDistribution() {
        val logits = floatArrayOf(1f, 2f, 0f, -1f)
        for (t in listOf(0.5, 1.0, 2.0)) {
            val d = Sampler.distribution(logits, IntArray(0), SamplingParams(temperature = t)).toMap()
            val expected = softmax(logits.map { it / t }.toDoubleArray())
            for (id in logits.indices) assertEquals(expected[id], d.getValue(id), 1e-6)
        }
    }

    @Test
    fun aTinyTemperatureIsGreedyNotAnError() {
        // 1/T overflowed float below ~3e-39 and the top logit's 0 * inf was NaN: "no candidate token".
        val rng = Random(2)
        for (t in doubleArrayOf(1e-20, 1e-39, 1e-45, 1e-300, java.lang.Double.MIN_VALUE)) {
            for ((k, p) in listOf(0 to 1.0, 40 to 1.0, 0 to 0.9)) {
                val sampler = Sampler(SamplingParams(temperature = t, topK = k, topP = p, seed = 5))
                repeat(20) {
                    val logits = FloatArray(5000) { rng.nextGaussian().toFloat() }
                    assertEquals(Sampler.argmax(logits), sampler.sample(logits))
                }
            }
            val ties = floatArrayOf(1f, 3f, 3f, Float.NEGATIVE_INFINITY) // exact ties stay a fair choice
            val sampler = Sampler(SamplingParams(temperature = t, seed = 0))
            assertEquals(setOf(1, 2), (0 until 200).map { sampler.sample(ties) }.toSet())
        }
    }

    @Test
    fun seededRunsRepeatAndDrawFromTheDistribution() {
        val logits = floatArrayOf(1f, 2f, 0f, -1f, 1.5f)
        val params = SamplingParams(temperature = 1.0, topK = 3, seed = 7)
        val a = Sampler(params).let { s -> List(200) { s.sample(logits) } }
        val b = Sampler(params).let { s -> List(200) { s.sample(logits) } }
        assertEquals(a, b)
        assertNotEquals(a, Sampler(params.copy(seed = 8)).let { s -> List(200) { s.sample(logits) } })
        val s = Sampler(params)
        val counts = IntArray(logits.size)
        repeat(20000) { counts[s.sample(logits)]++ }
        val d = Sampler.distribution(logits, IntArray(0), params).toMap()
        assertEquals(setOf(0, 1, 4), counts.indices.filter { counts[it] > 0 }.toSet())
        for ((id, p) in d) assertEquals(p, counts[id] / 20000.0, 0.015)
    }

    @Test
    fun refusesWhatPythonRefuses() {
        val bad: List<Pair<() -> Any, String>> = listOf(
            { SamplingParams(temperature = -1.0) } to "temperature must be >= 0",
            { SamplingParams(topK = -1) } to "top_k must be >= 0",
            { SamplingParams(topP = -0.5) } to "top_p must be in [0, 1]",
            { SamplingParams(minP = 1.5) } to "min_p must be in [0, 1]",
            { SamplingParams(repetitionPenalty = 0.0) } to "repetition_penalty must be > 0",
            { SamplingParams(temperature = Double.NaN) } to "temperature must be a finite number",
            { SamplingParams(seed = -1) } to "seed must be a non-negative integer",
            { SamplingParams.fromJson(JSONObject().put("topk", 3)) } to "unknown sampling parameter(s) ['topk']",
            { SamplingParams.fromJson(JSONObject().put("top_k", 2.5)) } to "top_k must be an integer",
            { SamplingParams.fromJson(JSONObject().put("temperature", true)) } to "temperature must be a finite number",
            { Sampler(SamplingParams(temperature = 1.0)).sample(floatArrayOf(1f, Float.NaN)) } to "cannot sample",
            { Sampler(SamplingParams(temperature = 1.0)).sample(floatArrayOf(1f, Float.POSITIVE_INFINITY)) } to "cannot sample",
            { Sampler().sample(FloatArray(0)) } to "one row of logits",
            { Sampler().sample(floatArrayOf(1f, Float.NaN, 2f)) } to "cannot decode: the model computed NaN logits",
            { Sampler.argmax(floatArrayOf(Float.NaN, 1f)) } to "cannot decode: the model computed NaN logits",
            { Sampler(SamplingParams(repetitionPenalty = 1.2)).sample(floatArrayOf(1f), intArrayOf(5)) } to "outside the vocabulary"
        )
        for ((make, expected) in bad) {
            try {
                make()
                fail("accepted: $expected")
            } catch (e: IllegalArgumentException) {
                assertTrue("${e.message} lacks $expected", e.message!!.contains(expected))
            }
        }
    }

    @Test
    fun fromJsonIgnoresNullsAndKeepsDefaults() {
        val p = SamplingParams.fromJson(JSONObject("{\"temperature\": 0.8, \"top_k\": null, \"seed\": 3}"))
        assertEquals(SamplingParams(temperature = 0.8, seed = 3), p)
        val defaults = SamplingParams.fromJson(JSONObject("{\"max_new_tokens\": 9, \"top_p\": 0.5}"), ignoreUnknown = true)
        assertEquals(SamplingParams(topP = 0.5), defaults)
    }
}
