package dev.nomoat.core

/**
 * Text from tokens arriving one at a time. A token may end in the middle of a UTF-8 character
 * (an emoji is often 2-3 byte-level tokens), so bytes are held back while they are the start of a
 * character that could still be completed, and everything before them is emitted.
 *
 * The concatenation of all [push] results and [flush] equals [Utf8.decode] of all the bytes at
 * once: held bytes start at a lead byte, which no earlier sequence can extend over, so cutting
 * there does not change how the rest decodes.
 */
class Utf8StreamDecoder(private val bytesOf: (Int) -> ByteArray) : TokenStreamDecoder {
    private var pending = ByteArray(0)

    override fun push(id: Int): String {
        val bytes = pending + bytesOf(id)
        val keep = Utf8.incompleteTail(bytes)
        pending = bytes.copyOfRange(bytes.size - keep, bytes.size)
        return Utf8.decode(bytes, 0, bytes.size - keep)
    }

    override fun flush(): String = Utf8.decode(pending, 0, pending.size).also { pending = ByteArray(0) }
}

/**
 * UTF-8 decoding that replaces malformed bytes the way Rust's `String::from_utf8_lossy` (so
 * `tokenizers`) does: one U+FFFD per "maximal subpart" (Unicode's recommended practice).
 * java.lang.String's decoder differs on some inputs (ED B7 gives one U+FFFD, Rust two), and
 * Android's may differ again, so the app does not rely on either.
 */
internal object Utf8 {
    fun decode(bytes: ByteArray, from: Int, to: Int): String {
        val out = StringBuilder(to - from)
        var i = from
        while (i < to) {
            val lead = bytes[i].toInt() and 0xFF
            if (lead < 0x80) { out.append(lead.toChar()); i++; continue }
            val length = sequenceLength(lead)
            var k = 1  // bytes of this sequence that are well-formed so far
            while (k < length && i + k < to && (bytes[i + k].toInt() and 0xFF) in allowed(lead, k)) k++
            if (k == length && length > 1) {
                var cp = lead and (0xFF shr (length + 1))
                for (j in 1 until length) cp = (cp shl 6) or (bytes[i + j].toInt() and 0x3F)
                out.appendCodePoint(cp)
            } else {
                out.append('\uFFFD')
            }
            i += k
        }
        return out.toString()
    }

    /** How many bytes at the end of [bytes] are a well-formed but unfinished character. */
    fun incompleteTail(bytes: ByteArray): Int {
        var start = bytes.size - 1
        while (start >= 0 && bytes.size - start <= 3 && (bytes[start].toInt() and 0xC0) == 0x80) start--
        if (start < 0) return 0
        val lead = bytes[start].toInt() and 0xFF
        val have = bytes.size - start
        if (have >= sequenceLength(lead)) return 0  // complete, ASCII, or never valid (length 0)
        for (k in 1 until have) if ((bytes[start + k].toInt() and 0xFF) !in allowed(lead, k)) return 0
        return have
    }

    /** The length of the sequence a lead byte starts; 0 for bytes that cannot start one. */
    private fun sequenceLength(lead: Int): Int = when (lead) {
        in 0x00..0x7F -> 1
        in 0xC2..0xDF -> 2
        in 0xE0..0xEF -> 3
        in 0xF0..0xF4 -> 4
        else -> 0
    }

    /** Unicode's table 3-7: the second byte's range depends on the lead (no overlongs, surrogates or > U+10FFFF). */
    private fun allowed(lead: Int, position: Int): IntRange = if (position > 1) 0x80..0xBF else when (lead) {
        0xE0 -> 0xA0..0xBF
        0xED -> 0x80..0x9F
        0xF0 -> 0x90..0xBF
        0xF4 -> 0x80..0x8F
        else -> 0x80..0xBF
    }
}
