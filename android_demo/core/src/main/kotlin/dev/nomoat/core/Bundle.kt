package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject
import org.json.JSONTokener
import java.io.File
import java.io.FileInputStream
import java.security.MessageDigest

/**
 * manifest.json, the contract between the converter and every runtime (mirrors runtime/manifest.py).
 *
 * The app refuses what it cannot run with a message that says what to do: an unknown
 * format_version, a missing field, a file whose sha256 does not match, a bundle without ONNX.
 * Bad manifests are refused as the Python runtime refuses them, in its order and words (without its
 * "ValueError: "; cross-checked in tests/test_android_core.py): not UTF-8, not strict JSON, not an object,
 * field types and ranges, onnx.io's names, file names outside the bundle folder, sha256s, and (when
 * verifying) an opened file that `files` does not list. Fields no app code reads and that Python checks
 * only for their type are left unchecked (see [Manifest.fromJson]).
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
        return if (layer == null) name else formatLayer(name, layer)
            ?: throw BundleException("$MANIFEST_NAME is malformed (onnx.io.$key ${pythonRepr(name)} is not a name with " +
                "a {layer} placeholder); re-convert the model.")
    }
}

/** The graph inputs and outputs the app binds (runtime/manifest.py GRAPH_IO); the KV names hold a {layer} placeholder. */
val GRAPH_IO = listOf("input_ids", "seqlens_k", "total_sequence_length", "logits_index", "logits",
    "past_key", "past_value", "present_key", "present_value")
val KV_IO = listOf("past_key", "past_value", "present_key", "present_value")

/**
 * [pattern] with its `{layer}` fields filled in as Python's `pattern.format(layer=layer)` fills them
 * (`{{` and `}}` are literal braces), or null when it holds any other field (`{0}`, `{x}`, `{layer:02d}`)
 * or a lone brace: those the app refuses rather than bind a name the Python runtime would not.
 */
fun formatLayer(pattern: String, layer: Int): String? {
    val out = StringBuilder(pattern.length)
    var i = 0
    while (i < pattern.length) {
        val c = pattern[i]
        when {
            c == '{' && pattern.startsWith("{{", i) -> { out.append('{'); i += 2 }
            c == '}' && pattern.startsWith("}}", i) -> { out.append('}'); i += 2 }
            c == '{' && pattern.startsWith("{layer}", i) -> { out.append(layer); i += 7 }
            c == '{' || c == '}' -> return null
            else -> { out.append(c); i++ }
        }
    }
    return out.toString()
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

    /** Every bundle file the app or the Python runtime opens besides manifest.json (Manifest.runtime_files):
     *  the graph, its weights, the tokenizer and the chat template. Each must be listed in [files]. */
    val runtimeFiles: List<String>
        get() = listOfNotNull(onnx?.modelFile, onnx?.dataFile, tokenizer.tokenizerFile, tokenizer.chatTemplateFile)

    /** Refuse a manifest whose files leave out one that is opened: its sha256 would never be checked
     *  (a truncated weight file would reach ONNX Runtime); check_runtime_files_listed. */
    fun checkRuntimeFilesListed() {
        val unlisted = runtimeFiles.filter { it !in files }
        if (unlisted.isNotEmpty()) {
            throw BundleException("$MANIFEST_NAME is malformed (files has no sha256 for ${unlisted.joinToString(", ")}, " +
                "which the runtime loads); re-convert the model.")
        }
    }

    /** generation_defaults.max_new_tokens, or [fallback] (the Python runtime's 256). */
    fun defaultMaxNewTokens(fallback: Int = 256): Int = generationDefaults.optInt("max_new_tokens", fallback)

    companion object {
        /** manifest.json's bytes, as read_manifest reads them: UTF-8, strict JSON (org.json alone would take
         *  comments, single quotes and trailing text), an object. */
        fun parse(bytes: ByteArray): Manifest {
            utf8Error(bytes)?.let {
                throw BundleException("$MANIFEST_NAME is malformed (not UTF-8 text: 'utf-8' codec can't decode $it); " +
                    "re-convert the model.")
            }
            return parse(String(bytes, Charsets.UTF_8))
        }

        fun parse(text: String): Manifest {
            val notJson = StrictJson.error(text)
            val root = try {
                if (notJson != null) throw JSONException(notJson)
                JSONTokener(text).nextValue()
            } catch (e: JSONException) {
                throw BundleException("$MANIFEST_NAME is not valid JSON (${e.message}); the bundle is damaged, " +
                    "re-convert or re-copy it.", e)
            }
            if (root !is JSONObject) {
                throw BundleException("$MANIFEST_NAME is malformed (a JSON ${pythonTypeName(root)}, not an object); " +
                    "re-convert the model.")
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
                // Checked in Manifest.from_dict's order, so a manifest wrong twice names the same field.
                val m = typed(d, "model")
                val model = ModelSpec(
                    // architecture, num_heads, hidden_size, rope_theta and parameters: no app code reads them (the
                    // graph holds the attention and RoPE), so they are read as before, not checked as Python does;
                    // model.rope_scaling is not read at all.
                    architecture = str(m, "architecture"),
                    numLayers = count(m, "num_layers", "model.num_layers"),
                    numHeads = int(m, "num_heads"),
                    numKvHeads = count(m, "num_kv_heads", "model.num_kv_heads"),
                    headDim = count(m, "head_dim", "model.head_dim"),
                    hiddenSize = int(m, "hidden_size"),
                    vocabSize = count(m, "vocab_size", "model.vocab_size"),
                    ropeTheta = num(m, "rope_theta").toDouble(),
                    parameters = if (m.has("parameters")) num(m, "parameters").toLong() else 0L
                )
                // Objects when present (Python: d.get(name, {}) must be a dict; null is refused). quantization and
                // source the app never reads: not checked.
                val generationDefaults = optTyped(d, "generation_defaults") ?: JSONObject()
                val target = optTyped(d, "target") ?: JSONObject()
                val chatFormat = if (d.isNull("chat_format")) null else optTyped(d, "chat_format", orNull = true)
                // Python: `if d.get("onnx")` -- absent, null, {} (and false, 0, "", []) mean "no ONNX graph".
                val onnxValue = d.opt("onnx")
                val onnx = if (!truthy(onnxValue)) null else typed(d, "onnx").let {
                    // Checked in OnnxBackend.from_dict's order, so a manifest wrong twice names the same field.
                    val floor = optStr(it, "min_onnxruntime")?.also { v ->
                        if (versionParts(v) == null) throw Malformed("onnx.min_onnxruntime '$v' is not a version like 1.23.0")
                    }
                    checkWeightBytesPerToken(it)
                    val kvDtype = kvDtype(it)
                    val modelFile = fileName(it, "model_file", "onnx.model_file")
                    val dataFile = if (it.isNull("data_file")) null else fileName(it, "data_file", "onnx.data_file")
                    OnnxSection(
                        modelFile = modelFile,
                        dataFile = dataFile,
                        io = graphIo(it),
                        kvDtype = kvDtype,
                        minOnnxRuntime = floor
                    )
                }
                val t = typed(d, "tokenizer")
                val bos = if (t.isNull("bos_token_id")) null else count(t, "bos_token_id", "tokenizer.bos_token_id", minimum = 0)
                // special_tokens: no app code reads them (the tokenizer's own added tokens decide), so not checked.
                val special = t.optJSONObject("special_tokens") ?: JSONObject()
                val tokenizerFile = fileName(t, "tokenizer_file", "tokenizer.tokenizer_file")
                // The app never opens the chat template (it renders chat_format), but its name and its sha256 are
                // checked as the Python runtime checks every file it opens, so both refuse the same bundles.
                val template = if (t.isNull("chat_template_file")) null
                    else fileName(t, "chat_template_file", "tokenizer.chat_template_file")
                val tokenizer = TokenizerSection(
                    tokenizerFile = tokenizerFile,
                    chatTemplateFile = template,
                    bosTokenId = bos,
                    addBosToken = t.optBoolean("add_bos_token", false),
                    specialTokens = special.keys().asSequence().associateWith { k -> str(special, k) }
                )
                val maxContext = count(d, "max_context", "max_context")
                val stopTokenIds = tokenIds(d, "stop_token_ids", model.vocabSize)
                checkGenerationDefaults(generationDefaults)
                if (!target.isNull("threads")) count(target, "threads", "target.threads")
                val files = fileHashes(d)
                return Manifest(
                    formatVersion = FORMAT_VERSION,
                    model = model,
                    onnx = onnx,
                    tokenizer = tokenizer,
                    maxContext = maxContext,
                    stopTokenIds = stopTokenIds,
                    generationDefaults = generationDefaults,
                    quantization = d.optJSONObject("quantization") ?: JSONObject(),
                    target = target,
                    // Android's JSONObject keeps the file's key order, so the first bad file is Python's too.
                    files = files,
                    chatFormat = chatFormat,
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

        /** Python's truth of a JSON value (`if d.get("onnx")`). */
        private fun truthy(v: Any?): Boolean = when (v) {
            null, JSONObject.NULL -> false
            is Boolean -> v
            is Number -> v.toDouble() != 0.0
            is String -> v.isNotEmpty()
            is JSONArray -> v.length() > 0
            is JSONObject -> v.length() > 0
            else -> true
        }

        /** d[key] as an object ([name] in the message; absent is `missing`, null and other types are named). */
        private fun typed(d: JSONObject, key: String, name: String = key): JSONObject {
            if (!d.has(key)) throw Malformed("missing \"$key\"")
            return d.opt(key) as? JSONObject ?: throw Malformed("$name is ${pythonRepr(d.opt(key))}, not an object")
        }

        /** d.get(key, {}) as an object: null when absent; a JSON null or another type is refused (unless [orNull]). */
        private fun optTyped(d: JSONObject, key: String, orNull: Boolean = false): JSONObject? {
            if (!d.has(key)) return null
            return d.opt(key) as? JSONObject
                ?: throw Malformed("$key is ${pythonRepr(d.opt(key))}, not an object${if (orNull) " or null" else ""}")
        }

        /** A JSON integer (not 2.0, "2" nor true) of at least [minimum] (_check_count). */
        private fun count(d: JSONObject, key: String, name: String, minimum: Int = 1): Int {
            if (!d.has(key)) throw Malformed("missing \"$key\"")
            val v = d.opt(key)
            if ((v !is Int && v !is Long) || (v as Number).toLong() < minimum) {
                throw Malformed("$name is ${pythonRepr(v)}, not an integer >= $minimum")
            }
            if (v.toLong() > Int.MAX_VALUE) throw Malformed("$name is $v, more than this app can hold (${Int.MAX_VALUE})")
            return v.toInt()
        }

        /** A file name in the bundle folder itself, never a path that leads elsewhere (_bundle_file_name). */
        private fun fileName(d: JSONObject, key: String, name: String): String {
            if (!d.has(key)) throw Malformed("missing \"$key\"")
            val v = d.opt(key) as? String ?: throw Malformed("$name is ${pythonRepr(d.opt(key))}, not a string")
            checkFileName(name, v)
            return v
        }

        private fun checkFileName(name: String, v: String) {
            if (v == "" || v == "." || v == ".." || v.contains('/') || v.contains('\\') || v.contains('\u0000')) {
                throw Malformed("$name ${pythonRepr(v)} is not the name of a file in the bundle folder")
            }
        }

        /** onnx.io: a name for every input and output the app binds; the KV names with a {layer} placeholder. */
        private fun graphIo(o: JSONObject): Map<String, String> {
            val io = typed(o, "io", "onnx.io")
            val missing = GRAPH_IO.filter { !io.has(it) }
            if (missing.isNotEmpty()) throw Malformed("onnx.io has no name for ${missing.joinToString(", ")}")
            for (key in GRAPH_IO) {
                if (io.opt(key) !is String) throw Malformed("onnx.io.$key is ${pythonRepr(io.opt(key))}, not a string")
            }
            for (key in KV_IO) {
                val pattern = io.getString(key)
                val first = formatLayer(pattern, 0)
                if (first == null || first == formatLayer(pattern, 1)) {
                    throw Malformed("onnx.io.$key ${pythonRepr(pattern)} is not a name with a {layer} placeholder")
                }
            }
            // Other names the graph may list are kept (as Python keeps them) when they are names.
            return io.keys().asSequence().filter { io.opt(it) is String }.associateWith { io.getString(it) }
        }

        /** stop_token_ids: a list of ids of the vocabulary (_token_ids). */
        private fun tokenIds(d: JSONObject, key: String, vocabSize: Int): List<Int> {
            if (!d.has(key)) throw Malformed("missing \"$key\"")
            val a = d.opt(key) as? JSONArray ?: throw Malformed("$key is ${pythonRepr(d.opt(key))}, not a list")
            return (0 until a.length()).map { i ->
                val v = a.opt(i)
                if ((v !is Int && v !is Long) || (v as Number).toLong() !in 0 until vocabSize.toLong()) {
                    throw Malformed("$key holds ${pythonRepr(v)}, not a token id of the vocabulary (0 to ${vocabSize - 1})")
                }
                v.toInt()
            }
        }

        /**
         * The sampling defaults, checked when the bundle is read as the Python runtime checks them
         * (_generation_defaults: SamplingParams.__post_init__'s checks in its order and words, then
         * max_new_tokens), rather than at the first answer.
         */
        private fun checkGenerationDefaults(g: JSONObject) {
            fun given(k: String): Any? = if (g.isNull(k)) null else g.opt(k)
            fun bad(message: String): Nothing = throw Malformed("generation_defaults: $message")
            fun real(k: String, inRange: (Double) -> Boolean, range: String) {
                val v = given(k) ?: return
                if (v !is Number || v.toDouble().isNaN() || v.toDouble().isInfinite()) {
                    bad("$k must be a finite number, got ${pythonRepr(v)}")
                }
                if (!inRange(v.toDouble())) bad("$k must be $range, got ${pythonRepr(v)}")
            }
            fun integer(k: String, minimum: Long, range: String) {
                val v = given(k) ?: return
                if (v !is Int && v !is Long) bad("$k must be an integer, got ${pythonRepr(v)}")
                if ((v as Number).toLong() < minimum) bad("$k must be $range, got ${pythonRepr(v)}")
            }
            real("temperature", { it >= 0.0 }, ">= 0 (0 means greedy)")
            integer("top_k", 0, ">= 0 (0 turns it off)")
            real("top_p", { it in 0.0..1.0 }, "in [0, 1] (1 turns it off)")
            real("min_p", { it in 0.0..1.0 }, "in [0, 1] (0 turns it off)")
            real("repetition_penalty", { it > 0.0 }, "> 0 (1 turns it off)")
            integer("repeat_last_n", -1, ">= -1 (-1 = the whole history, 0 = none)")
            real("frequency_penalty", { true }, "a finite number")
            real("presence_penalty", { true }, "a finite number")
            integer("seed", 0, "a non-negative integer or None")
            if (!g.isNull("max_new_tokens")) count(g, "max_new_tokens", "generation_defaults.max_new_tokens")
        }

        private val SHA256 = Regex("[0-9a-f]{64}")

        /** files: file name -> sha256, each a file name in the bundle folder and 64 lowercase hex digits. */
        private fun fileHashes(d: JSONObject): Map<String, String> {
            val files = typed(d, "files")
            return files.keys().asSequence().associateWith<String, String> { name ->
                checkFileName("files key", name)
                val digest = files.opt(name)
                if (digest !is String || !SHA256.matches(digest)) {
                    throw Malformed("files[${pythonRepr(name)}] ${pythonRepr(digest)} is not a sha256 (64 hex digits)")
                }
                digest
            }
        }

        // Field readers that name what is wrong (org.json's own messages do not say where).
        private class Malformed(message: String) : Exception(message)

        private fun missing(d: JSONObject, key: String, what: String): Nothing =
            if (!d.has(key) || d.isNull(key)) throw Malformed("missing \"$key\"")
            else throw Malformed("\"$key\" is not $what: ${d.get(key)}")

        private fun str(d: JSONObject, key: String): String = (d.opt(key) as? String) ?: missing(d, key, "a string")
        private fun optStr(d: JSONObject, key: String): String? =
            if (!d.has(key) || d.isNull(key)) null else str(d, key)
        private fun num(d: JSONObject, key: String): Number = (d.opt(key) as? Number) ?: missing(d, key, "a number")

        private fun int(d: JSONObject, key: String): Int {
            val n = num(d, key)
            if (n.toDouble() != n.toInt().toDouble()) throw Malformed("\"$key\" is not an integer: $n")
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
            val manifest = Manifest.parse(path.readBytes())
            if (verify) manifest.checkRuntimeFilesListed()  // read_manifest's order: before Model.load's ONNX check
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
                if (sha256(f) != expected) {
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


/** A JSON value as Python's repr shows it, for messages worded as the Python runtime's. */
internal fun pythonRepr(v: Any?): String = when (v) {
    null, JSONObject.NULL -> "None"
    is String -> pythonStringRepr(v)
    is Boolean -> if (v) "True" else "False"
    is Double -> pythonFloatRepr(v)
    is Float -> pythonFloatRepr(v.toDouble())
    is JSONArray -> (0 until v.length()).joinToString(", ", "[", "]") { pythonRepr(v.opt(it)) }
    is JSONObject -> v.keys().asSequence().joinToString(", ", "{", "}") { "${pythonStringRepr(it)}: ${pythonRepr(v.opt(it))}" }
    else -> v.toString()
}

/** The Python type json.loads gives a JSON value ("a JSON list, not an object"). */
internal fun pythonTypeName(v: Any?): String = when (v) {
    null, JSONObject.NULL -> "NoneType"
    is String -> "str"
    is Boolean -> "bool"
    is Int, is Long -> "int"
    is Number -> "float"
    is JSONArray -> "list"
    is JSONObject -> "dict"
    else -> v.javaClass.simpleName
}

/** repr(str): single quotes unless the text holds ' and no ", with Python's escapes. */
private fun pythonStringRepr(s: String): String {
    val quote = if (s.contains('\'') && !s.contains('"')) '"' else '\''
    val out = StringBuilder(s.length + 2).append(quote)
    for (c in s) {
        when {
            c == quote || c == '\\' -> out.append('\\').append(c)
            c == '\n' -> out.append("\\n")
            c == '\r' -> out.append("\\r")
            c == '\t' -> out.append("\\t")
            c.toInt() < 0x20 || c.toInt() in 0x7f..0xa0 || c.toInt() == 0xad -> out.append(String.format("\\x%02x", c.toInt()))
            else -> out.append(c)
        }
    }
    return out.append(quote).toString()
}

/** repr(float): the shortest digits, fixed from 1e-4 up to 1e16, else 1e+16 / 1.5e-05. */
private fun pythonFloatRepr(d: Double): String {
    if (d.isNaN()) return "nan"
    if (d.isInfinite()) return if (d > 0) "inf" else "-inf"
    if (d == 0.0) return if (1.0 / d < 0) "-0.0" else "0.0"
    val exact = java.math.BigDecimal(d.toString()).stripTrailingZeros()
    val digits = exact.unscaledValue().abs().toString()
    val exponent = digits.length - 1 - exact.scale()
    val sign = if (d < 0) "-" else ""
    if (exponent in -4..15) {
        val plain = exact.abs().toPlainString()
        return sign + if (plain.contains('.')) plain else "$plain.0"
    }
    val mantissa = if (digits.length == 1) digits else digits[0] + "." + digits.substring(1)
    return sign + mantissa + "e" + (if (exponent < 0) "-" else "+") + String.format("%02d", Math.abs(exponent))
}

/**
 * Where [bytes] stop being UTF-8, in the words of Python's decoder after "'utf-8' codec can't decode "
 * ("byte 0xe9 in position 12: invalid continuation byte"), or null when they are UTF-8.
 */
internal fun utf8Error(bytes: ByteArray): String? {
    fun at(start: Int, end: Int, reason: String): String =
        if (end - start == 1) String.format("byte 0x%02x in position %d: %s", bytes[start].toInt() and 0xff, start, reason)
        else "bytes in position $start-${end - 1}: $reason"
    var i = 0
    while (i < bytes.size) {
        val b = bytes[i].toInt() and 0xff
        if (b < 0x80) { i++; continue }
        // Sequence length and the range of the first continuation byte (no overlongs, surrogates, > U+10FFFF).
        val (length, low, high) = when (b) {
            in 0xc2..0xdf -> Triple(2, 0x80, 0xbf)
            0xe0 -> Triple(3, 0xa0, 0xbf)
            0xed -> Triple(3, 0x80, 0x9f)
            in 0xe1..0xef -> Triple(3, 0x80, 0xbf)
            0xf0 -> Triple(4, 0x90, 0xbf)
            in 0xf1..0xf3 -> Triple(4, 0x80, 0xbf)
            0xf4 -> Triple(4, 0x80, 0x8f)
            else -> return at(i, i + 1, "invalid start byte")
        }
        for (k in 1 until length) {
            if (i + k >= bytes.size) return at(i, bytes.size, "unexpected end of data")
            val c = bytes[i + k].toInt() and 0xff
            if (if (k == 1) c !in low..high else c !in 0x80..0xbf) return at(i, i + k, "invalid continuation byte")
        }
        i += length
    }
    return null
}

/**
 * JSON as Python's json.loads reads it (RFC 8259, plus its NaN and Infinity), for what org.json's lenient
 * reader would take: comments, single quotes, unquoted names, trailing text. [error] gives Python's
 * message ("Expecting value: line 1 column 5 (char 4)") or null.
 *
 * Both this parser and org.json's recurse per bracket: 200,000 '[' overflowed the thread's stack (a
 * StackOverflowError, not an exception the app catches). Past [MAX_DEPTH] nested objects and arrays the text
 * is refused as json.loads refuses it past Python's recursion limit (~1000), in its words.
 */
internal object StrictJson {
    const val MAX_DEPTH = 512  // a manifest nests 4 deep; org.json then recurses no deeper than this either

    /** [pos] null: a failure with no position to show (Python's recursion error has none). */
    private class Fail(val reason: String, val pos: Int?) : Exception(reason)

    fun error(text: String): String? {
        val p = Parser(text)
        return try {
            if (text.startsWith("\uFEFF")) throw Fail("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0)
            var i = p.ws(0)
            i = p.value(i)
            i = p.ws(i)
            if (i != text.length) throw Fail("Extra data", i)
            null
        } catch (e: Fail) {
            val pos = e.pos ?: return e.reason
            val line = text.substring(0, pos).count { it == '\n' } + 1
            val lineStart = text.lastIndexOf('\n', pos - 1) + 1
            val char = text.codePointCount(0, pos)
            "${e.reason}: line $line column ${text.codePointCount(lineStart, pos) + 1} (char $char)"
        }
    }

    private class Parser(val s: String) {
        private var depth = 0

        fun ws(from: Int): Int {
            var i = from
            while (i < s.length && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++
            return i
        }

        private val number = java.util.regex.Pattern.compile("-?(?:0|[1-9]\\d*)(?:\\.\\d+)?(?:[eE][-+]?\\d+)?")

        /** The end of the value at [i] (Python's scan_once). */
        fun value(i: Int): Int {
            if (i >= s.length) throw Fail("Expecting value", i)
            return when {
                s[i] == '"' -> string(i)
                s[i] == '{' || s[i] == '[' -> nested(s[i] == '{', i + 1)
                s.startsWith("null", i) -> i + 4
                s.startsWith("true", i) -> i + 4
                s.startsWith("false", i) -> i + 5
                s.startsWith("NaN", i) -> i + 3
                s.startsWith("Infinity", i) -> i + 8
                s.startsWith("-Infinity", i) -> i + 9
                else -> number.matcher(s).region(i, s.length).takeIf { it.lookingAt() }?.end()
                    ?: throw Fail("Expecting value", i)
            }
        }

        private fun nested(isObject: Boolean, from: Int): Int {
            if (++depth > MAX_DEPTH) {
                throw Fail("maximum recursion depth exceeded while decoding a JSON ${if (isObject) "object" else "array"} " +
                    "from a unicode string", null)
            }
            val end = if (isObject) obj(from) else array(from)
            depth--
            return end
        }

        fun string(start: Int): Int {
            var i = start + 1
            while (true) {
                if (i >= s.length) throw Fail("Unterminated string starting at", start)
                val c = s[i]
                when {
                    c == '"' -> return i + 1
                    c == '\\' -> {
                        if (i + 1 >= s.length) throw Fail("Unterminated string starting at", start)
                        val e = s[i + 1]
                        if (e == 'u') {
                            val hex = s.substring(i + 2, minOf(i + 6, s.length))
                            if (hex.length < 4 || !hex.all { it in '0'..'9' || it in 'a'..'f' || it in 'A'..'F' }) {
                                throw Fail("Invalid \\uXXXX escape", i + 1)
                            }
                            i += 6
                        } else {
                            if (e !in "\"\\/bfnrt") throw Fail("Invalid \\escape", i)
                            i += 2
                        }
                    }
                    c < ' ' -> throw Fail("Invalid control character at", i)
                    else -> i++
                }
            }
        }

        fun obj(from: Int): Int {
            var i = ws(from)
            if (i < s.length && s[i] == '}') return i + 1
            while (true) {
                if (i >= s.length || s[i] != '"') throw Fail("Expecting property name enclosed in double quotes", i)
                i = ws(string(i))
                if (i >= s.length || s[i] != ':') throw Fail("Expecting ':' delimiter", i)
                i = ws(value(ws(i + 1)))
                if (i < s.length && s[i] == '}') return i + 1
                if (i >= s.length || s[i] != ',') throw Fail("Expecting ',' delimiter", i)
                i = ws(i + 1)
            }
        }

        fun array(from: Int): Int {
            var i = ws(from)
            if (i < s.length && s[i] == ']') return i + 1
            while (true) {
                i = ws(value(i))
                if (i < s.length && s[i] == ']') return i + 1
                if (i >= s.length || s[i] != ',') throw Fail("Expecting ',' delimiter", i)
                i = ws(i + 1)
            }
        }
    }
}
