package dev.nomoat.core

/**
 * Test doubles for the generator: a codec over a tiny fixed vocabulary and a Forward whose logits
 * make a chosen token follow the last one, recording every call (what the KV cache was fed).
 */
object Letters {
    /** ids 0..25 = "a".."z", then a stop token and a few punctuation marks. */
    val VOCAB: List<String> = ('a'..'z').map { it.toString() } + listOf("<|end|>", " ", ":", "\n")
    const val END = 26
    fun id(piece: String): Int = VOCAB.indexOf(piece).also { require(it >= 0) { "not in the test vocabulary: $piece" } }
}

class LetterCodec : TextCodec {
    override fun encode(text: String): IntArray {
        val ids = ArrayList<Int>()
        var i = 0
        while (i < text.length) {
            val special = "<|end|>"
            if (text.startsWith(special, i)) {
                ids.add(Letters.END); i += special.length
            } else {
                ids.add(Letters.id(text[i].toString())); i++
            }
        }
        return ids.toIntArray()
    }

    override fun decode(ids: IntArray): String = ids.joinToString("") { Letters.VOCAB[it] }

    /** "<|end|>" is a special token, as in a real tokenizer: streamed as no text. */
    override fun streamDecoder(): TokenStreamDecoder = object : TokenStreamDecoder {
        override fun push(id: Int): String = if (id == Letters.END) "" else Letters.VOCAB[id]
        override fun flush(): String = ""
    }

    override fun specialTokenId(text: String): Int? = if (text == Letters.VOCAB[Letters.END]) Letters.END else null
}

/** LetterCodec with a space before each piece of text between "<|end|>" tokens, as a tokenizer with
 * ByteLevel's add_prefix_space gives it (Tokenizer.encodesAlone). */
class SpacedLetterCodec(private val letters: LetterCodec = LetterCodec()) : TextCodec by letters {
    override fun encode(text: String): IntArray {
        val end = Letters.VOCAB[Letters.END]
        val out = ArrayList<Int>()
        text.split(end).forEachIndexed { i, piece ->
            if (i > 0) out.add(Letters.END)
            if (piece.isNotEmpty()) out.addAll((if (piece.startsWith(" ")) piece else " $piece").let { letters.encode(it).toList() })
        }
        return out.toIntArray()
    }

    override fun encodesAlone(suffix: String): Boolean = suffix.isEmpty() || suffix.startsWith(Letters.VOCAB[Letters.END])
}

/** next(last id) gets logit 10, everything else 0; the KV "cache" is a list checked like a real one. */
class FakeForward(override val maxContext: Int, private val next: (Int) -> Int) : Forward {
    class Call(val ids: List<Int>, val startPos: Int)

    val calls = ArrayList<Call>()
    val cache = ArrayList<Int>() // what the model has seen, by position

    val fedIds: Int get() = calls.sumBy { it.ids.size }

    override fun run(ids: IntArray, startPos: Int): FloatArray {
        record(ids, startPos)
        return logitsAfter(ids.last())
    }

    /** One pass over every id (as a real multi-position forward), not the interface's token-by-token default. */
    override fun runAll(ids: IntArray, startPos: Int): Array<FloatArray> {
        record(ids, startPos)
        return Array(ids.size) { logitsAfter(ids[it]) }
    }

    private fun record(ids: IntArray, startPos: Int) {
        // A real KV cache can be rewound but not skipped ahead, and cannot grow past its capacity.
        if (startPos > cache.size) throw AssertionError("startPos $startPos skips cached positions (${cache.size})")
        if (startPos + ids.size > maxContext) throw AssertionError("run past the context: ${startPos + ids.size}")
        calls.add(Call(ids.toList(), startPos))
        while (cache.size > startPos) cache.removeAt(cache.size - 1)
        cache.addAll(ids.toList())
    }

    private fun logitsAfter(id: Int): FloatArray {
        val logits = FloatArray(Letters.VOCAB.size)
        logits[next(id)] = 10f
        return logits
    }

    companion object {
        /** Letters count up ("a" -> "b"), "e" and "z" end the answer, anything else is followed by "b". */
        fun countingUp(maxContext: Int = 64) = FakeForward(maxContext) { last ->
            when (last) {
                4, 25 -> Letters.END
                in 0..24 -> last + 1
                else -> 1
            }
        }

        /** Letters count up and wrap around; never a stop token. */
        fun endless(maxContext: Int = 64) = FakeForward(maxContext) { last -> if (last in 0..25) (last + 1) % 26 else 0 }
    }
}
