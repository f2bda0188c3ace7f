package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject
import java.io.File

/**
 * For the host cross-check of Generator and Chat against runtime/model.py (tests/test_android_core.py):
 * the same scripted model on both sides, the bundle's real tokenizer, stop tokens and chat format.
 *
 *     GenerateCli bundle-dir    stdin: a JSON object a line:
 *         {"max_context": n, "next": {"id": id, ...}, "fallback": id, "max_new": n,
 *          "prompt": [ids] | "chat": ["user message", ...], "stop": [...], "prompt_lookup": n}
 *     stdout a line each: {"text", "ids", "finish", "deltas", "fed"} for a prompt, or
 *         {"turns": [{"text", "ids", "finish"} | {"error"}], "history": [{"role", "content"}], "fed"}
 *
 * The scripted model's next token after a pass is next[the pass's last id] (else fallback), as a
 * one-hot row of logits; "fed" lists every pass as [startPos, ids], the KV cache's story.
 */
object GenerateCli {
    @JvmStatic
    fun main(args: Array<String>) {
        require(args.size == 1) { "usage: GenerateCli bundle-dir < requests" }
        val bundle = Bundle.open(File(args[0]), verify = false)
        val tokenizer = Tokenizer.fromFile(bundle.tokenizerFile)
        val out = StringBuilder()
        System.`in`.bufferedReader(Charsets.UTF_8).forEachLine { line ->
            if (line.isBlank()) return@forEachLine
            out.append(run(bundle, tokenizer, JSONObject(line)).toString()).append('\n')
        }
        print(out)
    }

    private class ScriptForward(override val maxContext: Int, val vocab: Int, val next: Map<Int, Int>, val fallback: Int) : Forward {
        val fed = JSONArray()

        override fun run(ids: IntArray, startPos: Int): FloatArray = runAll(ids, startPos).last()

        override fun runAll(ids: IntArray, startPos: Int): Array<FloatArray> {
            fed.put(JSONArray().put(startPos).put(JSONArray(ids.toList())))
            return Array(ids.size) { i -> FloatArray(vocab).also { it[next[ids[i]] ?: fallback] = 10f } }
        }
    }

    private fun run(bundle: Bundle, tokenizer: Tokenizer, request: JSONObject): JSONObject {
        val nextJson = request.getJSONObject("next")
        val next = nextJson.keys().asSequence().associate { it.toInt() to nextJson.getInt(it) }
        val forward = ScriptForward(request.getInt("max_context"), bundle.manifest.model.vocabSize, next,
            request.getInt("fallback"))
        val generator = Generator.forBundle(bundle.manifest, forward, tokenizer)
        val stop = request.optJSONArray("stop")?.let { a -> List(a.length()) { a.getString(it) } } ?: emptyList()
        val maxNew = request.getInt("max_new")
        val lookup = request.optInt("prompt_lookup", 0)
        val deltas = JSONArray()
        fun describe(g: Generation) = JSONObject().put("text", g.text).put("ids", JSONArray(g.tokenIds.toList()))
            .put("finish", g.finishReason)
        val out = if (request.has("chat")) {
            val chat = Chat(generator, ChatFormat.fromManifest(bundle.manifest))
            val users = request.getJSONArray("chat")
            val turns = JSONArray()
            for (i in 0 until users.length()) {
                turns.put(try {
                    describe(chat.send(users.getString(i), maxNew, stop = stop, promptLookup = lookup) { deltas.put(it) })
                } catch (e: ContextOverflowException) {
                    JSONObject().put("error", e.message)
                })
            }
            JSONObject().put("turns", turns)
                .put("history", JSONArray(chat.messages.map { JSONObject().put("role", it.role).put("content", it.content) }))
        } else {
            val a = request.getJSONArray("prompt")
            describe(generator.generate(IntArray(a.length()) { a.getInt(it) }, maxNew, stop = stop, promptLookup = lookup) {
                deltas.put(it)
            })
        }
        return out.put("deltas", deltas).put("fed", forward.fed)
    }
}
