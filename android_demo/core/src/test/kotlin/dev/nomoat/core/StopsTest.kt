package dev.nomoat.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class StopsTest {
    @Test
    fun aStopStringSplitAcrossDeltasIsHeldBackThenCut() {
        val m = StopMatcher(listOf("<|im_end|>"))
        assertEquals(StopMatcher.Fed("Hello ", false), m.feed("Hello <|im"))
        assertEquals(StopMatcher.Fed("", false), m.feed("_en"))
        assertEquals(StopMatcher.Fed("", true), m.feed("d|> and more"))
        assertEquals("<|im_end|>", m.matched)
        assertEquals(StopMatcher.Fed("", true), m.feed("after the stop"))
        assertEquals("", m.flush())
    }

    @Test
    fun theDocstringExample() {
        val m = StopMatcher(listOf("\n\nUser:"))
        assertEquals(StopMatcher.Fed("Hi!", false), m.feed("Hi!\n"))
        assertEquals(StopMatcher.Fed("", true), m.feed("\nUser: more"))
    }

    @Test
    fun textBeforeTheStopInTheSameDeltaIsShown() {
        val m = StopMatcher(listOf("END"))
        assertEquals(StopMatcher.Fed("abc ", true), m.feed("abc END def"))
    }

    @Test
    fun aFalseAlarmIsReleased() {
        val m = StopMatcher(listOf("<|im_end|>"))
        assertEquals(StopMatcher.Fed("a ", false), m.feed("a <|i"))
        assertEquals(StopMatcher.Fed("<|ix", false), m.feed("x"))
        assertEquals(StopMatcher.Fed("", false), m.feed("<"))
        assertEquals("<", m.flush())
        assertFalse(m.stopped)
        assertNull(m.matched)
    }

    @Test
    fun theEarliestOfOverlappingStopsWins() {
        val m = StopMatcher(listOf("cd", "bcx", "b"))
        assertEquals(StopMatcher.Fed("a", true), m.feed("abcd"))
        assertEquals("b", m.matched)
    }

    @Test
    fun theLongestPossibleStartIsHeld() {
        val m = StopMatcher(listOf("abab"))
        assertEquals(StopMatcher.Fed("x", false), m.feed("xaba"))
        assertEquals(StopMatcher.Fed("", true), m.feed("b"))
    }

    @Test
    fun noStopsPassesEverythingThrough() {
        val m = StopMatcher()
        assertEquals(StopMatcher.Fed("<|im", false), m.feed("<|im"))
        assertEquals("", m.flush())
    }

    @Test
    fun refusesAnEmptyStopString() {
        try {
            StopMatcher(listOf("ok", ""))
            fail("an empty stop string was accepted")
        } catch (e: IllegalArgumentException) {
            assertTrue(e.message!!.contains("non-empty"))
        }
    }
}
