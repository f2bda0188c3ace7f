package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject
import java.io.File
import java.time.LocalDateTime

/**
 * For the host cross-check against runtime/manifest.py and converter/chat_format.py (tests/test_android_core.py).
 *
 *     BundleCli DIR [--no-verify]    stdout: the manifest as the app read it (JSON), or {"error": "..."}
 *     BundleCli DIR --bench-prompt=N  stdout: the benchmark's N prompt ids (a JSON list), with the bundle's tokenizer
 *     BundleCli DIR --render [--now=2024-03-05T07:08:09]
 *                                    stdin: a JSON list of {"role", "content"} a line;
 *                                    stdout a line each: the chat_format rendering (a JSON string) or {"error": "..."},
 *                                    with the dates of that time (default: the clock's)
 *
 * Output is ASCII (non-ASCII as \uXXXX), so the host's locale does not matter.
 */
object BundleCli {
    @JvmStatic
    fun main(args: Array<String>) {
        require(args.size in 1..3) { "usage: BundleCli DIR [--no-verify | --render [--now=TIME] | --bench-prompt=N]" }
        val dir = File(args[0])
        val mode = args.getOrNull(1)
        if (mode != null && mode.startsWith("--bench-prompt=")) {
            val bundle = Bundle.open(dir, verify = false)
            val n = mode.removePrefix("--bench-prompt=").toInt()
            println(JSONArray(Bench.promptIds(Tokenizer.fromFile(bundle.tokenizerFile), n).toList()))
            return
        }
        if (mode == "--render") {
            val now = args.getOrNull(2)?.removePrefix("--now=")?.let { LocalDateTime.parse(it) }
            val format = ChatFormat.fromManifest(Bundle.open(dir, verify = false).manifest,
                clock = { now ?: LocalDateTime.now() })
            val out = StringBuilder()
            System.`in`.bufferedReader(Charsets.UTF_8).forEachLine { line ->
                val a = JSONArray(line)
                val messages = (0 until a.length()).map {
                    val m = a.getJSONObject(it)
                    Message(m.getString("role"), m.getString("content"))
                }
                val answer = try {
                    JSONArray().put(format.render(messages)).toString().let { it.substring(1, it.length - 1) }
                } catch (e: IllegalArgumentException) {
                    JSONObject().put("error", e.message).toString()
                }
                out.append(ascii(answer)).append('\n')
            }
            print(out)
            return
        }
        val result = try {
            describe(Bundle.open(dir, verify = mode != "--no-verify").manifest)
        } catch (e: BundleException) {
            JSONObject().put("error", e.message)
        }
        println(ascii(result.toString()))
    }

    /** The fields runtime/manifest.py reads, under its names. */
    private fun describe(m: Manifest): JSONObject {
        val model = JSONObject()
            .put("architecture", m.model.architecture).put("num_layers", m.model.numLayers)
            .put("num_heads", m.model.numHeads).put("num_kv_heads", m.model.numKvHeads)
            .put("head_dim", m.model.headDim).put("hidden_size", m.model.hiddenSize)
            .put("vocab_size", m.model.vocabSize).put("rope_theta", m.model.ropeTheta)
            .put("parameters", m.model.parameters)
        val onnx = m.onnx?.let { o ->
            JSONObject().put("model_file", o.modelFile).put("data_file", o.dataFile ?: JSONObject.NULL)
                .put("io", JSONObject(o.io)).put("kv_dtype", o.kvDtype)
                .put("min_onnxruntime", o.minOnnxRuntime ?: JSONObject.NULL)
                .put("past_key_0", o.ioName("past_key", 0)).put("present_value_1", o.ioName("present_value", 1))
        }
        val t = m.tokenizer
        val tokenizer = JSONObject().put("tokenizer_file", t.tokenizerFile)
            .put("chat_template_file", t.chatTemplateFile ?: JSONObject.NULL)
            .put("bos_token_id", t.bosTokenId ?: JSONObject.NULL).put("add_bos_token", t.addBosToken)
            .put("special_tokens", JSONObject(t.specialTokens))
        val sampling = SamplingParams.fromManifest(m)
        return JSONObject()
            .put("format_version", m.formatVersion).put("model", model).put("onnx", onnx ?: JSONObject.NULL)
            .put("tokenizer", tokenizer).put("max_context", m.maxContext)
            .put("stop_token_ids", JSONArray(m.stopTokenIds)).put("generation_defaults", m.generationDefaults)
            .put("quantization", m.quantization).put("target_name", m.targetName ?: JSONObject.NULL)
            .put("target_threads", m.targetThreads ?: JSONObject.NULL).put("files", JSONObject(m.files))
            .put("file_order", JSONArray(m.files.keys.toList()))
            .put("created_by", m.createdBy).put("has_chat_format", m.chatFormat != null)
            .put("max_new_tokens", m.defaultMaxNewTokens())
            .put("sampling", JSONObject().put("temperature", sampling.temperature).put("top_k", sampling.topK)
                .put("top_p", sampling.topP).put("min_p", sampling.minP)
                .put("repetition_penalty", sampling.repetitionPenalty).put("repeat_last_n", sampling.repeatLastN)
                .put("seed", sampling.seed ?: JSONObject.NULL))
    }

    private fun ascii(s: String): String {
        val out = StringBuilder(s.length)
        for (c in s) if (c.toInt() < 0x80) out.append(c) else out.append(String.format("\\u%04x", c.toInt()))
        return out.toString()
    }
}
