package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject

/**
 * For the host cross-check against runtime/sampling.py (tests/test_android_core.py).
 *
 *     SamplerCli     stdin: a JSON object a line: {"logits": [...], "history": [...], "prompt_length": n,
 *                    "params": {...}, "draws": n}
 *                    stdout a line each: {"ids": [...], "probs": [...], "draws": [...]} or {"error": "..."}
 *
 * "params" uses the Python names (temperature, top_k, ...); "draws" (optional) samples that many ids
 * with one seeded sampler. Output is ASCII.
 */
object SamplerCli {
    @JvmStatic
    fun main(args: Array<String>) {
        val out = StringBuilder()
        System.`in`.bufferedReader(Charsets.UTF_8).forEachLine { line ->
            if (line.isBlank()) return@forEachLine
            out.append(answer(JSONObject(line)).toString()).append('\n')
        }
        print(out)
    }

    private fun answer(request: JSONObject): JSONObject = try {
        val params = SamplingParams.fromJson(request.optJSONObject("params") ?: JSONObject())
        val logits = floats(request.getJSONArray("logits"))
        val history = request.optJSONArray("history")?.let { a -> IntArray(a.length()) { a.getInt(it) } } ?: IntArray(0)
        val promptLength = request.optInt("prompt_length", 0)
        val dist = Sampler.distribution(logits, history, params, promptLength)
        val result = JSONObject().put("ids", JSONArray(dist.ids.toList())).put("probs", JSONArray(dist.probs.toList()))
        val draws = request.optInt("draws", 0)
        if (draws > 0) {
            val sampler = Sampler(params)
            result.put("draws", JSONArray((0 until draws).map { sampler.sample(logits, history, promptLength) }))
        }
        result
    } catch (e: IllegalArgumentException) {
        JSONObject().put("error", e.message)
    }

    private fun floats(a: JSONArray): FloatArray = FloatArray(a.length()) { a.getDouble(it).toFloat() }
}
