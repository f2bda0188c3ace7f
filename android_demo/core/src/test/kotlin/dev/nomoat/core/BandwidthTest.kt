package dev.nomoat.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class BandwidthTest {
    @Test
    fun theFastestKernelSetsTheCeiling() {
        // Fakes with known sleeps: a kernel bound by its own work must not set the ceiling, whether it runs
        // first or last. A sleep never ends early, so no pass beats the fast kernel's 10 ms; a busy machine
        // stretches sleeps, so the fast kernel's best of 5 passes only has to come in under 50 ms, which
        // neither the slow kernel's 100 ms nor the mean of the two kernels (55 ms) does.
        val slow: (LongArray, Int, Int) -> Long = { _, _, _ -> Thread.sleep(100); 0L }
        val fast: (LongArray, Int, Int) -> Long = { _, _, _ -> Thread.sleep(10); 0L }
        val bytes = 8.0 * (1 shl 20)
        for (kernels in listOf(listOf(slow, fast), listOf(fast, slow))) {
            val rate = Bandwidth.readBytesPerSecond(1, megabytes = 8, passes = 5, kernels = kernels)
            assertTrue("$rate", rate > bytes / 0.05 && rate <= bytes / 0.01)
        }
    }

    @Test
    fun everyThreadReducesItsOwnSliceOfTheWholeBuffer() {
        val seen = java.util.Collections.synchronizedList(mutableListOf<Pair<Int, Int>>())
        val record: (LongArray, Int, Int) -> Long = { data, from, to -> seen.add(from to to); data.size.toLong() }
        Bandwidth.readBytesPerSecond(3, megabytes = 1, passes = 1, kernels = listOf(record))
        val words = (1 shl 20) / 8
        assertEquals(listOf(0 to words / 3, words / 3 to 2 * words / 3, 2 * words / 3 to words), seen.sortedBy { it.first })
    }

    @Test
    fun theRealKernelsReduceCorrectlyAndGiveAPlausibleRate() {
        val data = LongArray(1000) { it.toLong() }
        assertEquals((0 until 10).sum().toLong(), Bandwidth.SUM(data, 0, 10))
        assertEquals(999L, Bandwidth.MAX(data, 0, 1000))
        assertEquals(7L, Bandwidth.OR(data, 4, 8))
        val rate = Bandwidth.readBytesPerSecond(2, megabytes = 16)
        assertTrue("$rate", rate > 1e8 && rate < 1e12) // 0.1 GB/s to 1 TB/s
    }

    @Test
    fun noThreadsIsRefused() {
        try {
            Bandwidth.readBytesPerSecond(0)
            fail("0 threads accepted")
        } catch (e: IllegalArgumentException) {
            assertTrue(e.message!!.contains("threads"))
        }
    }
}
