package dev.nomoat.core

/**
 * Whether the KV cache fits the app's Java heap. On Android, ByteBuffer.allocateDirect is not native
 * memory: ART backs a direct buffer with a non-movable byte array on the managed heap (libcore's
 * DirectByteBuffer.MemoryRef), so the cache (float32, every layer, every position: ~94 MB for
 * SmolLM2 at 2,048) counts against the heap limit, even with largeHeap. Checked before allocating,
 * so a cache too big for the phone is an error that says what to convert instead of an
 * OutOfMemoryError halfway through the layers.
 */
object HeapBudget {
    /** Bytes of the float32 cache: keys and values of every layer for maxContext positions. */
    fun kvCacheBytes(layers: Int, kvHeads: Int, headDim: Int, maxContext: Int): Long =
        2L * layers * kvHeads * headDim * maxContext * 4

    /**
     * Null when [needed] bytes fit in what the heap has left ([maxHeap] is Runtime.maxMemory(), [used]
     * what is allocated now); otherwise the error to show.
     */
    fun shortfall(needed: Long, maxHeap: Long, used: Long, maxContext: Int): String? {
        val free = maxHeap - used
        if (needed <= free) return null
        val fits = (maxContext.toLong() * free / needed / 256 * 256).toInt()
        val hint = if (fits >= 256) "re-convert with --max-context $fits or less" else "this phone cannot hold this model's cache"
        return "the KV cache needs ${mb(needed)} MB of the app's Java heap, which has ${mb(free)} MB left of " +
            "${mb(maxHeap)} MB: $hint."
    }

    private fun mb(bytes: Long): Long = bytes / (1024 * 1024)
}
