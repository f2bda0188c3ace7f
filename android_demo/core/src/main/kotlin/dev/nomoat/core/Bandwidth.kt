package dev.nomoat.core

import java.util.concurrent.Callable
import java.util.concurrent.Executors

/**
 * Memory read bandwidth, for the benchmark's decode-against-ceiling column: runtime/bandwidth.py's
 * method on the JVM. [threads] threads each reduce their own slice of a buffer far past any cache;
 * the best of several passes of several reductions is the ceiling, not a typical value (a reduction
 * bound by its own arithmetic would understate the memory).
 */
object Bandwidth {
    /** runtime/bandwidth.py's buffer, for the host-JVM cross-check; the app passes 64 MB, which is
     * still far past a phone's caches and fits an app's Java heap. */
    const val DEFAULT_MEGABYTES = 256

    /** One reduction over data[from until to]; its result is kept so the JIT cannot drop the loop. */
    val SUM: (LongArray, Int, Int) -> Long = { data, from, to ->
        var acc = 0L
        for (i in from until to) acc += data[i]
        acc
    }
    val OR: (LongArray, Int, Int) -> Long = { data, from, to ->
        var acc = 0L
        for (i in from until to) acc = acc or data[i]
        acc
    }
    val MAX: (LongArray, Int, Int) -> Long = { data, from, to ->
        var acc = Long.MIN_VALUE
        for (i in from until to) if (data[i] > acc) acc = data[i]
        acc
    }
    val KERNELS = listOf(SUM, OR, MAX)

    /** The last pass's reductions, kept where the JIT must assume someone reads them. */
    @Volatile
    var lastResult = 0L
        private set

    /** Bytes per second that [threads] threads read, the best of [passes] passes of each kernel. */
    fun readBytesPerSecond(
        threads: Int,
        megabytes: Int = DEFAULT_MEGABYTES,
        passes: Int = 5,
        kernels: List<(LongArray, Int, Int) -> Long> = KERNELS
    ): Double {
        require(threads >= 1) { "threads must be >= 1, got $threads" }
        require(megabytes >= 1 && passes >= 1) { "megabytes and passes must be >= 1" }
        val data = LongArray(megabytes * (1 shl 20) / 8) { 1L } // written once, so the pages are real
        val pool = Executors.newFixedThreadPool(threads)
        try {
            var best = Long.MAX_VALUE
            var sink = 0L
            for (kernel in kernels) {
                repeat(passes) {
                    val start = System.nanoTime()
                    val parts = (0 until threads).map { t ->
                        val from = (data.size.toLong() * t / threads).toInt()
                        val to = (data.size.toLong() * (t + 1) / threads).toInt()
                        pool.submit(Callable { kernel(data, from, to) })
                    }
                    for (part in parts) sink = sink xor part.get()
                    best = minOf(best, System.nanoTime() - start)
                }
            }
            lastResult = sink
            return data.size * 8.0 / (best / 1e9)
        } finally {
            pool.shutdown()
        }
    }
}
