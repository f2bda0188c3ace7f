package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject

/**
 * For the host cross-check against runtime/lookup.py (tests/test_android_core.py).
 *
 *     LookupCli     stdin: a JSON object a line: {"tokens": [...], "start": k, "max_draft": m, "cost": c}
 *                   stdout a line each: {"drafts": [[...], ...]}
 *
 * Replays a generation that produced tokens[start:] one position at a time: at each position the
 * drafter proposes from what came before (at most what is left), the true continuation decides how
 * many drafts are accepted, and the drafter learns from it.
 */
object LookupCli {
    @JvmStatic
    fun main(args: Array<String>) {
        val out = StringBuilder()
        System.`in`.bufferedReader(Charsets.UTF_8).forEachLine { line ->
            if (line.isBlank()) return@forEachLine
            out.append(replay(JSONObject(line)).toString()).append('\n')
        }
        print(out)
    }

    private fun replay(request: JSONObject): JSONObject {
        val a = request.getJSONArray("tokens")
        val tokens = IntArray(a.length()) { a.getInt(it) }
        val drafter = Drafter(request.getInt("max_draft"), request.getDouble("cost"))
        val drafts = JSONArray()
        for (at in request.getInt("start") until tokens.size) {
            val draft = drafter.propose(tokens, at, tokens.size - at)
            val truth = tokens.copyOfRange(at, at + draft.size)
            drafter.update(draft.size, Lookup.acceptedPrefix(draft, truth))
            drafts.put(JSONArray(draft.toList()))
        }
        return JSONObject().put("drafts", drafts)
    }
}
