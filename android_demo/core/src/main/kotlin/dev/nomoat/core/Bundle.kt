package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject
import java.io.File
import java.io.FileInputStream
import java.security.MessageDigest

/**
 * manifest.json, the contract between the converter and every runtime (mirrors runtime/manifest.py).
 *
 * The app refuses what it cannot run with a message that says what to do: an unknown
 * format_version, a missing field, a file whose sha256 does not match, a bundle without ONNX.
 */

/** The bundle is missing, from an unknown format version, malformed, or its files do not match. */
class BundleException(message: String, cause: Throwable? = null) : Exception(message, cause)

/** The prompt (or the conversation so far) does not fit in the bundle's context. */
class ContextOverflowException(message: String) : Exception(message)

const val FORMAT_VERSION = 1
const val MANIFEST_NAME = "manifest.json"

/** The decoder's shape (ModelInfo in runtime/manifest.py). */
data class ModelSpec(
    val architecture: String,
    val numLayers: Int,
    val numHeads: Int,
    val numKvHeads: Int,
    val headDim: Int,
    val hiddenSize: Int,
    val vocabSize: Int,
    val ropeTheta: Double,
    val parameters: Long
)

/** Which files hold the graph and what its inputs and outputs are called (OnnxBackend). */
data class OnnxSection(
    val modelFile: String,
    val dataFile: String?,
    /** GraphIO names; the KV names carry a `{layer}` placeholder. */
    val io: Map<String, String>,
    val kvDtype: String,
    /** The oldest ONNX Runtime whose kernels run the graph (converter/ort_floor.py); null in older bundles. */
    val minOnnxRuntime: String? = null
) {
    /**
     * Refuse to run on an ONNX Runtime older than the graph needs (OnnxBackend.check_onnxruntime).
     * [installed] is the release the app was built with; an older one fails deep inside ONNX Runtime,
     * or (1.23-1.26 with the tied int4 embedding) loads the graph and computes nonsense.
     */
    fun checkOnnxRuntime(installed: String) {
        val floor = minOnnxRuntime ?: return
        if (compareVersions(installed, floor) < 0) {
            throw BundleException("this bundle's graph needs onnxruntime >= $floor, and this app has $installed " +
                "(older kernels fail on this graph or compute it wrong). Rebuild the app with onnxruntime-android >= $floor " +
                "(android_demo/app/build.gradle.kts).")
        }
    }

    /** The graph name of [key] (e.g. "input_ids", "past_key"), with `{layer}` filled in. */
    fun ioName(key: String, layer: Int? = null): String {
        val name = io[key] ?: throw BundleException(
            "manifest.json names no onnx io \"$key\"; re-convert the model with a newer `nomoat convert`.")
        return if (layer == null) name else name.replace("{layer}", layer.toString())
    }
}

/** (major, minor, patch) of "1.23.0", "1.24.0-dev", "2.0"; null when [version] is not one (version_tuple). */
fun versionParts(version: String): List<Int>? {
    val match = Regex("^(\\d+)\\.(\\d+)(?:\\.(\\d+))?").find(version.trim()) ?: return null
    return match.groupValues.drop(1).map { if (it.isEmpty()) 0 else it.toInt() }
}

/** Compares release versions by number (1.9 < 1.10); an unreadable one is an error. */
fun compareVersions(a: String, b: String): Int {
    val x = versionParts(a) ?: throw IllegalArgumentException("'$a' is not a version like 1.23.0")
    val y = versionParts(b) ?: throw IllegalArgumentException("'$b' is not a version like 1.23.0")
    for (i in 0 until 3) if (x[i] != y[i]) return x[i].compareTo(y[i])
    return 0
}

/** TokenizerFiles in runtime/manifest.py. */
data class TokenizerSection(
    val tokenizerFile: String,
    val chatTemplateFile: String?,
    val bosTokenId: Int?,
    val addBosToken: Boolean,
    val specialTokens: Map<String, String>
)

class Manifest(
    val formatVersion: Int,
    val model: ModelSpec,
    /** Null when the bundle holds no ONNX graph (e.g. only an ExecuTorch .pte); [Bundle.open] refuses it. */
    val onnx: OnnxSection?,
    val tokenizer: TokenizerSection,
    val maxContext: Int,
    val stopTokenIds: List<Int>,
    /** As written: sampling keys (temperature, top_p, ...) and max_new_tokens. */
    val generationDefaults: JSONObject,
    val quantization: JSONObject,
    val target: JSONObject,
    /** File name -> sha256 (hex), in the manifest's order. */
    val files: Map<String, String>,
    /** The chat template as text pieces, or null; read it with [ChatFormat.fromManifest]. */
    val chatFormat: JSONObject?,
    val createdBy: String
) {
    /** The target the bundle was converted for ("host", "pixel6", ...), if named. */
    val targetName: String? get() = target.optString("name", "").ifEmpty { null }

    /** Intra-op threads the converter chose for the target, if any. */
    val targetThreads: Int? get() = if (target.has("threads") && !target.isNull("threads")) target.optInt("threads") else null

    /** generation_defaults.max_new_tokens, or [fallback] (the Python runtime's 256). */
    fun defaultMaxNewTokens(fallback: Int = 256): Int = generationDefaults.optInt("max_new_tokens", fallback)

    companion object {
        fun parse(text: String): Manifest {
            val root = try {
                JSONObject(text)
            } catch (e: JSONException) {
                throw BundleException("$MANIFEST_NAME is not valid JSON (${e.message}); the bundle is damaged, " +
                    "re-convert or re-copy it.", e)
            }
            return fromJson(root)
        }

        fun fromJson(d: JSONObject): Manifest {
            val version = d.opt("format_version")
            // JSON 1 and 1.0 both read as version 1 (as Python's `version != 1` does); anything else is refused.
            if (version !is Number || version.toDouble() != FORMAT_VERSION.toDouble()) {
                val shown = pythonRepr(version)
                throw BundleException(
                    "bundle format_version $shown is not supported by this nomoat app (it reads version " +
                        "$FORMAT_VERSION). Re-convert the model with a matching `nomoat convert`, or install the " +
                        "app version that reads the bundle.")
            }
            try {
                val m = obj(d, "model")
                val model = ModelSpec(
                    architecture = str(m, "architecture"),
                    numLayers = int(m, "num_layers"),
                    numHeads = int(m, "num_heads"),
                    numKvHeads = int(m, "num_kv_heads"),
                    headDim = int(m, "head_dim"),
                    hiddenSize = int(m, "hidden_size"),
                    vocabSize = int(m, "vocab_size"),
                    ropeTheta = num(m, "rope_theta").toDouble(),
                    parameters = if (m.has("parameters")) num(m, "parameters").toLong() else 0L
                )
                // Python: `if d.get("onnx")` -- absent, null and {} all mean "no ONNX graph".
                val o = d.optJSONObject("onnx")?.takeIf { it.length() > 0 }
                val onnx = o?.let {
                    // Checked in OnnxBackend.from_dict's order, so a manifest wrong twice names the same field.
                    val floor = optStr(it, "min_onnxruntime")?.also { v ->
                        if (versionParts(v) == null) throw Malformed("onnx.min_onnxruntime '$v' is not a version like 1.23.0")
                    }
                    checkWeightBytesPerToken(it)
                    val kvDtype = kvDtype(it)
                    val io = obj(it, "io")
                    OnnxSection(
                        modelFile = str(it, "model_file"),
                        dataFile = optStr(it, "data_file"),
                        io = io.keys().asSequence().associateWith { k -> str(io, k) },
                        kvDtype = kvDtype,
                        minOnnxRuntime = floor
                    )
                }
                val t = obj(d, "tokenizer")
                val special = t.optJSONObject("special_tokens") ?: JSONObject()
                val tokenizer = TokenizerSection(
                    tokenizerFile = str(t, "tokenizer_file"),
                    chatTemplateFile = optStr(t, "chat_template_file"),
                    bosTokenId = if (t.has("bos_token_id") && !t.isNull("bos_token_id")) int(t, "bos_token_id") else null,
                    addBosToken = t.optBoolean("add_bos_token", false),
                    specialTokens = special.keys().asSequence().associateWith { k -> str(special, k) }
                )
                val stops = arr(d, "stop_token_ids")
                val files = obj(d, "files")
                return Manifest(
                    formatVersion = FORMAT_VERSION,
                    model = model,
                    onnx = onnx,
                    tokenizer = tokenizer,
                    maxContext = int(d, "max_context"),
                    stopTokenIds = (0 until stops.length()).map { i -> intAt(stops, i, "stop_token_ids") },
                    generationDefaults = d.optJSONObject("generation_defaults") ?: JSONObject(),
                    quantization = d.optJSONObject("quantization") ?: JSONObject(),
                    target = d.optJSONObject("target") ?: JSONObject(),
                    // Android's JSONObject keeps the file's key order, so the first bad file is Python's too.
                    files = files.keys().asSequence().associateWith { k -> str(files, k) },
                    chatFormat = d.optJSONObject("chat_format"),
                    createdBy = optStr(d, "created_by") ?: "nomoat"
                )
            } catch (e: Malformed) {
                throw BundleException("$MANIFEST_NAME is malformed (${e.message}); re-convert the model.", e)
            }
        }

        /** The KV cache element types a bundle may name (runtime/manifest.py KV_DTYPES); the app itself
         *  runs only float32 (OrtForward says so), but the manifest is read as the Python runtime reads it. */
        val KV_DTYPES = listOf("float32", "float16")

        /** onnx.kv_dtype, "float32" when absent; a JSON null is refused, as Python's None is. */
        private fun kvDtype(o: JSONObject): String {
            val v = if (o.has("kv_dtype")) o.opt("kv_dtype") else "float32"
            if (v !is String || v !in KV_DTYPES) {
                throw Malformed("onnx.kv_dtype ${pythonRepr(v)} is not one this runtime keeps a cache in " +
                    "(${KV_DTYPES.joinToString(", ")})")
            }
            return v
        }

        /** onnx.weight_bytes_per_token (weight bytes one decode step reads; the bench divides the bandwidth
         *  by it) is absent, null or a whole number of at least 1. */
        private fun checkWeightBytesPerToken(o: JSONObject) {
            if (!o.has("weight_bytes_per_token") || o.isNull("weight_bytes_per_token")) return
            val v = o.opt("weight_bytes_per_token")
            if ((v !is Int && v !is Long) || (v as Number).toLong() < 1) {
                throw Malformed("onnx.weight_bytes_per_token ${pythonRepr(v)} is not a positive number of bytes")
            }
        }

        /** A JSON value as Python's repr shows it, for messages worded as the Python runtime's. */
        private fun pythonRepr(v: Any?): String = when (v) {
            null, JSONObject.NULL -> "None"
            is String -> "'$v'"
            is Boolean -> if (v) "True" else "False"
            else -> v.toString()
        }

        // Field readers that name what is wrong (org.json's own messages do not say where).
        private class Malformed(message: String) : Exception(message)

        private fun missing(d: JSONObject, key: String, what: String): Nothing =
            if (!d.has(key) || d.isNull(key)) throw Malformed("missing \"$key\"")
            else throw Malformed("\"$key\" is not $what: ${d.get(key)}")

        private fun obj(d: JSONObject, key: String): JSONObject = d.optJSONObject(key) ?: missing(d, key, "an object")
        private fun arr(d: JSONObject, key: String): JSONArray = d.optJSONArray(key) ?: missing(d, key, "an array")
        private fun str(d: JSONObject, key: String): String = (d.opt(key) as? String) ?: missing(d, key, "a string")
        private fun optStr(d: JSONObject, key: String): String? =
            if (!d.has(key) || d.isNull(key)) null else str(d, key)
        private fun num(d: JSONObject, key: String): Number = (d.opt(key) as? Number) ?: missing(d, key, "a number")

        private fun int(d: JSONObject, key: String): Int {
            val n = num(d, key)
            if (n.toDouble() != n.toInt().toDouble()) throw Malformed("\"$key\" is not an integer: $n")
            return n.toInt()
        }

        private fun intAt(a: JSONArray, i: Int, key: String): Int {
            val n = a.opt(i) as? Number
            if (n == null || n.toDouble() != n.toInt().toDouble()) throw Malformed("$key[$i] is not an integer: ${a.opt(i)}")
            return n.toInt()
        }
    }
}

/** An opened bundle folder: its manifest, checked, and where its files are. */
class Bundle private constructor(val dir: File, val manifest: Manifest) {
    /** The ONNX section; [open] has checked it is there. */
    val onnx: OnnxSection get() = manifest.onnx ?: throw IllegalStateException("checked in Bundle.open")

    fun file(name: String): File = File(dir, name)
    val modelFile: File get() = file(onnx.modelFile)
    val tokenizerFile: File get() = file(manifest.tokenizer.tokenizerFile)

    companion object {
        /**
         * Read and check a bundle folder (runtime/manifest.py read_manifest, plus Model.load's ONNX check).
         * With [verify], every listed file's sha256 is computed: seconds for the ~90 MB weights on a phone,
         * the price of never running a half-copied bundle.
         */
        fun open(dir: File, verify: Boolean = true): Bundle {
            if (!dir.isDirectory) {
                throw BundleException("$dir is not a directory; pass the folder `nomoat convert --out` wrote " +
                    "(copied to the phone by `nomoat deploy --adb`).")
            }
            val path = File(dir, MANIFEST_NAME)
            if (!path.isFile) {
                throw BundleException("$dir has no $MANIFEST_NAME; it is not a nomoat bundle (run `nomoat convert`, " +
                    "then `nomoat deploy --adb`).")
            }
            val manifest = Manifest.parse(path.readText(Charsets.UTF_8))
            if (manifest.onnx == null) {
                throw BundleException("$dir holds no ONNX model (files: ${manifest.files.keys.joinToString()}); this " +
                    "app runs ONNX bundles: re-convert for a target whose formats include onnx.")
            }
            if (verify) checkFiles(dir, manifest.files)
            return Bundle(dir, manifest)
        }

        /** Every file present with its sha256; the first bad one is named. */
        fun checkFiles(dir: File, files: Map<String, String>) {
            for ((name, expected) in files) {
                val f = File(dir, name)
                if (!f.isFile) {
                    throw BundleException("bundle file $name is missing from $dir; copy the whole bundle folder again " +
                        "(`nomoat deploy --adb`).")
                }
                if (!sha256(f).equals(expected, ignoreCase = true)) {
                    throw BundleException("bundle file $name does not match its sha256 in $MANIFEST_NAME (damaged or " +
                        "partly copied); copy the bundle again (`nomoat deploy --adb`) or re-convert.")
                }
            }
        }

        /** Hex sha256 of a file, streamed in 1 MiB blocks (the weights do not fit in a phone app's heap). */
        fun sha256(file: File): String {
            val digest = MessageDigest.getInstance("SHA-256")
            val buffer = ByteArray(1 shl 20)
            FileInputStream(file).use { input ->
                while (true) {
                    val n = input.read(buffer)
                    if (n < 0) break
                    digest.update(buffer, 0, n)
                }
            }
            return digest.digest().joinToString("") { String.format("%02x", it.toInt() and 0xff) }
        }
    }
}
