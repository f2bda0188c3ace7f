package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Rule
import org.junit.Test
import org.junit.rules.TemporaryFolder
import java.io.File
import java.util.Random

class BundleTest {
    @get:Rule
    val tmp = TemporaryFolder()

    companion object {
        /** A manifest like the converter's (see build/bench/int4/manifest.json), without files. */
        fun manifestJson(): JSONObject = JSONObject()
            .put("format_version", 1)
            .put("model", JSONObject().put("architecture", "llama").put("num_layers", 2).put("num_heads", 4)
                .put("num_kv_heads", 2).put("head_dim", 16).put("hidden_size", 64).put("vocab_size", 400)
                .put("rope_theta", 10000.0).put("rope_scaling", JSONObject.NULL).put("parameters", 123456))
            .put("onnx", JSONObject().put("model_file", "model.onnx").put("data_file", "model.onnx.data")
                .put("io", JSONObject().put("input_ids", "input_ids").put("seqlens_k", "seqlens_k")
                    .put("total_sequence_length", "total_sequence_length").put("logits_index", "logits_index")
                    .put("logits", "logits").put("past_key", "past_key_values.{layer}.key")
                    .put("past_value", "past_key_values.{layer}.value").put("present_key", "present.{layer}.key")
                    .put("present_value", "present.{layer}.value"))
                .put("kv_dtype", "float32").put("min_onnxruntime", "1.27.0"))
            .put("tokenizer", JSONObject().put("tokenizer_file", "tokenizer.json")
                .put("chat_template_file", "chat_template.jinja").put("bos_token_id", JSONObject.NULL)
                .put("add_bos_token", false).put("special_tokens", JSONObject().put("eos", "<|im_end|>")))
            .put("max_context", 64)
            .put("stop_token_ids", JSONArray(listOf(2, 0)))
            .put("generation_defaults", JSONObject().put("temperature", 0.7).put("top_p", 0.9).put("max_new_tokens", 100))
            .put("quantization", JSONObject().put("weights", "int4"))
            .put("target", JSONObject().put("name", "pixel6").put("threads", 4))
            .put("files", JSONObject())
            .put("created_by", "nomoat")
    }

    /** A bundle folder: a 3 MiB "weights" file (several hash buffers), a model and a tokenizer file. */
    private fun writeBundle(edit: (JSONObject) -> Unit = {}): File {
        val dir = tmp.newFolder()
        val weights = ByteArray(3 * (1 shl 20) + 17).also { Random(1).nextBytes(it) }
        File(dir, "model.onnx.data").writeBytes(weights)
        File(dir, "model.onnx").writeText("graph")
        File(dir, "tokenizer.json").writeText("{}")
        File(dir, "chat_template.jinja").writeText("{{ messages }}")
        val files = JSONObject()
        for (name in listOf("model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja")) {
            files.put(name, Bundle.sha256(File(dir, name)))
        }
        val manifest = manifestJson().put("files", files)
        edit(manifest)
        File(dir, MANIFEST_NAME).writeText(manifest.toString(2))
        return dir
    }

    private fun refused(dir: File, verify: Boolean = true): String {
        try {
            Bundle.open(dir, verify)
        } catch (e: BundleException) {
            return e.message ?: ""
        }
        fail("bundle $dir was accepted")
        throw IllegalStateException()
    }

    @Test
    fun sha256IsTheStandardOne() {
        val f = tmp.newFile("abc")
        f.writeText("abc")
        assertEquals("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", Bundle.sha256(f))
    }

    @Test
    fun opensAGoodBundleAndReadsEveryField() {
        val bundle = Bundle.open(writeBundle())
        val m = bundle.manifest
        assertEquals(1, m.formatVersion)
        assertEquals(ModelSpec("llama", 2, 4, 2, 16, 64, 400, 10000.0, 123456L), m.model)
        assertEquals("present.1.value", bundle.onnx.ioName("present_value", 1))
        assertEquals("past_key_values.0.key", bundle.onnx.ioName("past_key", 0))
        assertEquals("input_ids", bundle.onnx.ioName("input_ids"))
        assertEquals("model.onnx.data", bundle.onnx.dataFile)
        assertEquals("tokenizer.json", m.tokenizer.tokenizerFile)
        assertNull(m.tokenizer.bosTokenId)
        assertEquals(mapOf("eos" to "<|im_end|>"), m.tokenizer.specialTokens)
        assertEquals(64, m.maxContext)
        assertEquals(listOf(2, 0), m.stopTokenIds)
        assertEquals("pixel6", m.targetName)
        assertEquals(4, m.targetThreads)
        assertEquals("int4", m.quantization.getString("weights"))
        assertEquals(100, m.defaultMaxNewTokens())
        assertEquals(listOf("model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja"), m.files.keys.toList())
        assertEquals(SamplingParams(temperature = 0.7, topP = 0.9), SamplingParams.fromManifest(m))
        assertNull(m.chatFormat)
    }

    @Test
    fun aFlippedByteIsRefusedNamingTheFile() {
        val dir = writeBundle()
        val data = File(dir, "model.onnx.data")
        val bytes = data.readBytes()
        bytes[2 * (1 shl 20) + 5] = (bytes[2 * (1 shl 20) + 5].toInt() xor 1).toByte() // in the third hash buffer
        data.writeBytes(bytes)
        val message = refused(dir)
        assertTrue(message, message.contains("model.onnx.data") && message.contains("sha256"))
        assertTrue(message, message.contains("nomoat deploy --adb"))
        Bundle.open(dir, verify = false) // without verification the damage goes unseen, as asked
    }

    @Test
    fun aMissingFileIsRefusedNamingIt() {
        val dir = writeBundle()
        File(dir, "tokenizer.json").delete()
        val message = refused(dir)
        assertTrue(message, message.contains("tokenizer.json is missing") && message.contains("nomoat deploy --adb"))
    }

    @Test
    fun anUnknownFormatVersionIsRefused() {
        for (version in listOf<Any?>(2, "1", null, 0.5)) {
            val message = refused(writeBundle { m -> m.put("format_version", version) })
            assertTrue(message, message.contains("format_version") && message.contains("Re-convert"))
        }
        val message = refused(writeBundle { m -> m.put("format_version", 2) })
        assertTrue(message, message.contains("format_version 2 is not supported"))
    }

    @Test
    fun aMissingFieldIsNamed() {
        val cases = mapOf<String, (JSONObject) -> Unit>(
            "missing \"max_context\"" to { m -> m.remove("max_context") },
            "missing \"vocab_size\"" to { m -> m.getJSONObject("model").remove("vocab_size") },
            "missing \"tokenizer_file\"" to { m -> m.getJSONObject("tokenizer").remove("tokenizer_file") },
            "stop_token_ids is 2, not a list" to { m -> m.put("stop_token_ids", 2) },
            "model.num_layers is 2.5, not an integer >= 1" to { m -> m.getJSONObject("model").put("num_layers", 2.5) },
            "stop_token_ids holds 'eos', not a token id of the vocabulary (0 to 399)" to
                { m -> m.put("stop_token_ids", JSONArray(listOf(2, "eos"))) }
        )
        for ((expected, edit) in cases) {
            val message = refused(writeBundle(edit))
            assertTrue(message, message.contains(expected) && message.contains("re-convert the model"))
        }
    }

    @Test
    fun aBundleWithoutOnnxIsRefusedByName() {
        val message = refused(writeBundle { m -> m.remove("onnx") })
        assertTrue(message, message.contains("holds no ONNX model") && message.contains("this app runs ONNX bundles"))
        val empty = refused(writeBundle { m -> m.put("onnx", JSONObject()) })
        assertTrue(empty, empty.contains("holds no ONNX model"))
    }

    @Test
    fun notABundleFolder() {
        assertTrue(refused(File(tmp.root, "nowhere")).contains("is not a directory"))
        assertTrue(refused(tmp.newFolder("empty")).contains("has no manifest.json"))
        val broken = tmp.newFolder("broken")
        File(broken, MANIFEST_NAME).writeText("{\"format_version\": 1,")
        assertTrue(refused(broken).contains("is not valid JSON"))
    }

    @Test
    fun jsonNestedPastTheDepthLimitIsRefusedNotAStackOverflow() {
        // 200,000 '[' overflowed the stack in StrictJson (and would have in org.json after it)
        val deep = tmp.newFolder("deep")
        File(deep, MANIFEST_NAME).writeText("[".repeat(200_000) + "]".repeat(200_000))
        val message = refused(deep)
        assertEquals("manifest.json is not valid JSON (maximum recursion depth exceeded while decoding a JSON array " +
            "from a unicode string); the bundle is damaged, re-convert or re-copy it.", message)
        val limit = 512  // StrictJson.MAX_DEPTH
        val objects = "{\"a\": ".repeat(limit + 1) + "1" + "}".repeat(limit + 1)
        assertEquals("maximum recursion depth exceeded while decoding a JSON object from a unicode string",
            StrictJson.error(objects))
        // up to the limit the text is JSON, whatever the nesting
        assertNull(StrictJson.error("[".repeat(limit) + "]".repeat(limit)))
        assertNull(StrictJson.error("[[1, {\"a\": [2]}], [3]]"))
    }

    @Test
    fun versionsCompareByNumber() {
        assertEquals(listOf(1, 24, 0), versionParts("1.24.0-dev20250601"))
        assertEquals(listOf(2, 0, 0), versionParts("2.0"))
        assertNull(versionParts("latest"))
        assertTrue(compareVersions("1.9.0", "1.10.0") < 0)
        assertTrue(compareVersions("1.27.0", "1.27") == 0)
        assertTrue(compareVersions("1.32.0", "1.27.0") > 0)
    }

    @Test
    fun theFloorIsReadAndAnOlderOnnxRuntimeIsRefused() {
        val onnx = Bundle.open(writeBundle()).onnx
        assertEquals("1.27.0", onnx.minOnnxRuntime)
        onnx.checkOnnxRuntime("1.27.0")
        onnx.checkOnnxRuntime("1.32.0")
        try {
            onnx.checkOnnxRuntime("1.26.0")
            fail("onnxruntime 1.26.0 was accepted for a bundle that needs 1.27.0")
        } catch (e: BundleException) {
            val message = e.message ?: ""
            assertTrue(message, message.contains("needs onnxruntime >= 1.27.0, and this app has 1.26.0") &&
                message.contains("onnxruntime-android >= 1.27.0"))
        }
        // Bundles from before the converter wrote a floor: no check, as in the Python runtime.
        Bundle.open(writeBundle { m -> m.getJSONObject("onnx").remove("min_onnxruntime") }).onnx.checkOnnxRuntime("1.0.0")
        val message = refused(writeBundle { m -> m.getJSONObject("onnx").put("min_onnxruntime", "soon") })
        assertTrue(message, message.contains("min_onnxruntime 'soon' is not a version") && message.contains("re-convert"))
    }
}
