package dev.nomoat.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Test

class HeapBudgetTest {
    private val mib = 1024L * 1024

    @Test
    fun smollmCacheIsItsLayersTimesKeysAndValues() {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64, float32, 2,048 positions.
        assertEquals(2L * 30 * 3 * 64 * 2048 * 4, HeapBudget.kvCacheBytes(30, 3, 64, 2048))
        assertEquals(90 * mib, HeapBudget.kvCacheBytes(30, 3, 64, 2048))
    }

    @Test
    fun aCacheThatFitsIsNoError() {
        assertNull(HeapBudget.shortfall(90 * mib, maxHeap = 512 * mib, used = 40 * mib, maxContext = 2048))
    }

    @Test
    fun aCacheTooBigNamesTheContextThatWouldFit() {
        val message = HeapBudget.shortfall(90 * mib, maxHeap = 256 * mib, used = 206 * mib, maxContext = 2048)
        assertEquals("the KV cache needs 90 MB of the app's Java heap, which has 50 MB left of 256 MB: " +
            "re-convert with --max-context 1024 or less.", message)
    }

    @Test
    fun noContextFitsWhenTheHeapIsAlmostFull() {
        val message = HeapBudget.shortfall(90 * mib, maxHeap = 256 * mib, used = 250 * mib, maxContext = 2048)
        assertEquals("the KV cache needs 90 MB of the app's Java heap, which has 6 MB left of 256 MB: " +
            "this phone cannot hold this model's cache.", message)
    }
}
