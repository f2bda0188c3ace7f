package dev.nomoat.app

// NEVER BUILT INTO AN APK OR RUN: this machine has no Android SDK and no ONNX Runtime for Java. Written
// against the ONNX Runtime Java API (1.16+, for pinned outputs) and only type-checked: kotlinc compiles it
// on the host against hand-written declarations of the members it calls, taken from ONNX Runtime's Java
// sources (android_demo/apicheck, tests/test_android_shell.py), not against the real AAR. It mirrors
// runtime/onnx_session.py, which is what the host tests exercise.

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OnnxValue
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import android.system.ErrnoException
import android.system.Os
import android.util.Log
import dev.nomoat.core.Bundle
import dev.nomoat.core.BundleException
import dev.nomoat.core.ContextOverflowException
import dev.nomoat.core.Forward
import dev.nomoat.core.HeapBudget
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.FloatBuffer
import java.nio.IntBuffer
import java.nio.LongBuffer

/**
 * One ONNX Runtime session over the bundle's decoder graph with a static KV cache (runtime/onnx_session.py).
 *
 * The cache of every layer is one preallocated direct buffer of max_context positions, passed as the
 * `past_*` input AND pinned as the matching `present_*` output of every run: GroupQueryAttention then
 * writes the new positions in place and no step copies the cache (the Python runtime does the same
 * with IOBinding). The cache is indexed by position, so rewinding is just a smaller startPos.
 *
 * Inputs per run (converter/onnx_graph.py): input_ids int64 [1, n]; seqlens_k int32 [1] = total - 1;
 * total_sequence_length int32 scalar = total; logits_index int64 [1] = n - 1 (only the last position's
 * logits are computed). Output logits float32 [1, 1, vocab] goes into one reused pinned buffer.
 * [runAll] (prompt lookup's check of its drafts) asks for every position instead: logits_index
 * 0 until n, logits [1, n, vocab] into a pinned buffer kept per pass length n (at most 1 + the
 * drafts a pass, ~0.2 MB a position for SmolLM2), so a lookup pass allocates no native memory.
 *
 * Unverified assumptions, to check on a device first: that OrtSession.run(inputs, pinnedOutputs)
 * accepts one OnnxTensor as both an input and a pinned output (the C API's Run does; IOBinding in
 * Python relies on it), and that tensors over direct native-order buffers are used without a copy
 * (documented for OnnxTensor.createTensor with a direct buffer). If the first fails, the fallback is
 * copying each present_* output back into the past buffer: correct, but ~2 x 94 MB of copies per
 * token for SmolLM2 at 2,048 positions -- unusable, so say so rather than ship it.
 */
class OrtForward(bundle: Bundle, threads: Int? = null) : Forward, AutoCloseable {
    private val manifest = bundle.manifest
    private val onnx = bundle.onnx
    override val maxContext: Int = manifest.maxContext
    private val vocab = manifest.model.vocabSize

    private val env: OrtEnvironment = keepTelemetryOff().let { OrtEnvironment.getEnvironment() }
    private val options = OrtSession.SessionOptions() // native; closed after the session that uses it
    private val session: OrtSession

    private val kv = ArrayList<OnnxTensor>() // keep them alive as long as the session uses them
    private val pastInputs = LinkedHashMap<String, OnnxTensor>()
    private val pinned = LinkedHashMap<String, OnnxValue>()
    private val logitsBuffer: FloatBuffer
    private val logits: OnnxTensor

    // Small per-step inputs, rewritten in place for each run (decode steps allocate nothing new but input_ids).
    private val seqlens: IntBuffer = direct(4).asIntBuffer()
    private val total: IntBuffer = direct(4).asIntBuffer()
    private val lastIndex: LongBuffer = direct(8).asLongBuffer()
    private val seqlensTensor: OnnxTensor
    private val allLogits = HashMap<Int, AllLogits>() // runAll's index and output, by pass length
    private val totalTensor: OnnxTensor
    private val lastIndexTensor: OnnxTensor

    init {
        if (onnx.kvDtype != "float32") {
            throw BundleException("this app keeps the KV cache in float32; the bundle's is ${onnx.kvDtype}: " +
                "re-convert with --kv-dtype float32.")
        }
        with(options) {
            setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT)
            setExecutionMode(OrtSession.SessionOptions.ExecutionMode.SEQUENTIAL)
            setInterOpNumThreads(1)
            // As the Python runtime: no memory pattern (less peak memory at the same speed), spinning threads.
            setMemoryPatternOptimization(false)
            (threads ?: manifest.targetThreads)?.let { setIntraOpNumThreads(it) }
            addConfigEntry("session.intra_op.allow_spinning", "1")
        }
        val m = manifest.model
        val shape = longArrayOf(1, m.numKvHeads.toLong(), maxContext.toLong(), m.headDim.toLong())
        val floats = m.numKvHeads * maxContext * m.headDim
        // allocateDirect zero-fills, so the whole cache is resident from the start (~94 MB for SmolLM2 at
        // 2,048 positions); the Python runtime's cache pages arrive only as they are written. To measure.
        // On ART those buffers are Java heap (see HeapBudget): checked first, with the context that would
        // fit, before the session's native weights exist to be leaked by the refusal.
        val heap = Runtime.getRuntime()
        HeapBudget.shortfall(HeapBudget.kvCacheBytes(m.numLayers, m.numKvHeads, m.headDim, maxContext),
            heap.maxMemory(), heap.totalMemory() - heap.freeMemory(), maxContext)?.let {
            options.close()
            throw BundleException(it)
        }
        var created: OrtSession? = null
        try {
            // Before ONNX Runtime sees the graph: an older release fails deep inside, or computes nonsense.
            onnx.checkOnnxRuntime(BuildConfig.ONNXRUNTIME_VERSION)
            // The weights file (model.onnx.data) is found next to model.onnx.
            created = env.createSession(bundle.modelFile.absolutePath, options)
            session = created
            for (layer in 0 until m.numLayers) {
                for ((past, present) in listOf("past_key" to "present_key", "past_value" to "present_value")) {
                    val tensor = OnnxTensor.createTensor(env, direct(4 * floats).asFloatBuffer(), shape)
                    kv.add(tensor)
                    pastInputs[onnx.ioName(past, layer)] = tensor
                    pinned[onnx.ioName(present, layer)] = tensor
                }
            }
            logitsBuffer = direct(4 * vocab).asFloatBuffer()
            logits = OnnxTensor.createTensor(env, logitsBuffer, longArrayOf(1, 1, vocab.toLong()))
            pinned[onnx.ioName("logits")] = logits
            seqlensTensor = OnnxTensor.createTensor(env, seqlens, longArrayOf(1))
            totalTensor = OnnxTensor.createTensor(env, total, longArrayOf()) // a scalar
            lastIndexTensor = OnnxTensor.createTensor(env, lastIndex, longArrayOf(1))
        } catch (t: Throwable) {
            // A refusal or an OutOfMemoryError half-way: nobody holds this object to close() it, so what
            // exists is closed here (the session's native weights above all) before the error goes on.
            for (value in pinned.values) value.close() // the cache tensors and the logits
            created?.close()
            options.close()
            throw t
        }
    }

    override fun run(ids: IntArray, startPos: Int): FloatArray {
        lastIndex.put(0, (ids.size - 1).toLong())
        runPass(ids, startPos, lastIndexTensor, pinned)
        val out = FloatArray(vocab)
        logitsBuffer.rewind()
        logitsBuffer.get(out)
        return out
    }

    override fun runAll(ids: IntArray, startPos: Int): Array<FloatArray> {
        val n = ids.size
        val pass = allLogits.getOrPut(n) { AllLogits(n) }
        runPass(ids, startPos, pass.index, pass.outputs)
        pass.rows.rewind()
        return Array(n) { FloatArray(vocab).also { row -> pass.rows.get(row) } }
    }

    /** logits_index = 0 until [n] and a pinned [1, n, vocab] logits buffer, with the other outputs pinned as for [run]. */
    private inner class AllLogits(n: Int) {
        val index: OnnxTensor
        val rows: FloatBuffer = direct(4 * n * vocab).asFloatBuffer()
        val rowsTensor: OnnxTensor = OnnxTensor.createTensor(env, rows, longArrayOf(1, n.toLong(), vocab.toLong()))
        val outputs = LinkedHashMap<String, OnnxValue>(pinned)

        init {
            val positions = direct(8 * n).asLongBuffer()
            for (i in 0 until n) positions.put(i.toLong())
            positions.rewind()
            index = OnnxTensor.createTensor(env, positions, longArrayOf(n.toLong()))
            outputs[onnx.ioName("logits")] = rowsTensor
        }

        fun close() {
            index.close()
            rowsTensor.close()
        }
    }

    /** One session run feeding [ids] at [startPos], with the logits rows [logitsIndex] names into [outputs]. */
    private fun runPass(ids: IntArray, startPos: Int, logitsIndex: OnnxTensor, outputs: Map<String, OnnxValue>) {
        val n = ids.size
        require(n > 0) { "forward needs at least one token" }
        val end = startPos + n
        if (end > maxContext) {
            throw ContextOverflowException("$end tokens do not fit in the bundle's context of $maxContext; shorten " +
                "the prompt, start a new conversation, or convert with a larger --max-context.")
        }
        val idBuffer = direct(8 * n).asLongBuffer()
        for (id in ids) idBuffer.put(id.toLong())
        idBuffer.rewind()
        seqlens.put(0, end - 1)
        total.put(0, end)
        val inputIds = OnnxTensor.createTensor(env, idBuffer, longArrayOf(1, n.toLong()))
        try {
            val inputs = LinkedHashMap<String, OnnxTensor>(pastInputs)
            inputs[onnx.ioName("input_ids")] = inputIds
            inputs[onnx.ioName("seqlens_k")] = seqlensTensor
            inputs[onnx.ioName("total_sequence_length")] = totalTensor
            inputs[onnx.ioName("logits_index")] = logitsIndex
            // Every output is pinned, so the Result owns no value (ORT allocated no new output, and
            // Result.close() leaves pinned outputs open): dropping it unclosed leaks nothing.
            session.run(inputs, outputs)
        } finally {
            inputIds.close()
        }
    }

    override fun close() {
        session.close()
        options.close()
        for (t in kv) t.close()
        logits.close()
        seqlensTensor.close()
        totalTensor.close()
        lastIndexTensor.close()
        for (pass in allLogits.values) pass.close()
    }

    private companion object {
        fun direct(bytes: Int): ByteBuffer = ByteBuffer.allocateDirect(bytes).order(ByteOrder.nativeOrder())
    }
}

/**
 * ONNX Runtime's Linux builds (1.32) write a device id and queue a telemetry event when the first
 * session is made, unless ORT_DISABLE_TELEMETRY is set before that (the Python runtime sets it in
 * nomoat/__init__.py). Whether the Android AAR carries the same telemetry was not checked (no phone
 * here); the variable costs nothing where it does not. An explicit setting is left alone.
 */
private fun keepTelemetryOff() {
    try {
        Os.setenv("ORT_DISABLE_TELEMETRY", "1", false)
    } catch (e: ErrnoException) {
        Log.w("nomoat", "could not set ORT_DISABLE_TELEMETRY: $e")
    }
}
