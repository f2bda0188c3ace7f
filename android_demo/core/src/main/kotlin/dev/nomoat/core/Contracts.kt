package dev.nomoat.core

/**
 * The seams between the app's plain-Kotlin core and what only exists on a phone.
 *
 * Everything behind these interfaces is plain Kotlin (org.json at most) so it compiles and is
 * unit-tested on a workstation JVM; the Android shell supplies [Forward] with ONNX Runtime's
 * Java API and reads the bundle from the app's storage.
 */

/** Text to token ids and back, from the bundle's tokenizer.json. */
interface TextCodec {
    /** Token ids of [text]; special tokens written in the text (e.g. `<|im_start|>`) map to their ids; no BOS added. */
    fun encode(text: String): IntArray

    /** The text of a whole id sequence (special tokens included as their text: what the model saw). */
    fun decode(ids: IntArray): String

    /**
     * A fresh incremental decoder for one generation: the text shown to the user, so special tokens
     * (`<|im_start|>`, `<|endoftext|>`) give none, as the Python runtime streams
     * (`skip_special_tokens=True`).
     */
    fun streamDecoder(): TokenStreamDecoder

    /**
     * The id of [text] when it is exactly one special token (one that streams as no text), else null.
     * A stop string that is one could never match the streamed text, so it stops as a token instead
     * (runtime/model.py `_special_token_ids`).
     */
    fun specialTokenId(text: String): Int?

    /**
     * Whether [suffix], the text a chat turn adds, encodes on its own as it does after the text before
     * it (runtime/model.py `Model.encodes_alone`). Not when the tokenizer puts a space before each piece
     * of text between added tokens (ByteLevel's `add_prefix_space`) and the suffix starts inside one:
     * alone, it would gain that space. [Chat] then encodes the whole conversation.
     */
    fun encodesAlone(suffix: String): Boolean = true
}

/** Text deltas from tokens arriving one at a time, never splitting a UTF-8 character. */
interface TokenStreamDecoder {
    /** The text that became complete with [id] ("" while a character's bytes are incomplete). */
    fun push(id: Int): String

    /** What is left at the end (incomplete bytes become U+FFFD, as a whole decode would show them). */
    fun flush(): String
}

/** One forward pass of the model over the KV cache it keeps. */
interface Forward {
    /** The longest sequence (prompt + generated) the KV cache holds. */
    val maxContext: Int

    /** Feed [ids] at positions [startPos] until startPos + ids.size - 1; the logits of the last position. */
    fun run(ids: IntArray, startPos: Int): FloatArray

    /**
     * As [run], but the logits of every fed position, [ids].size rows (prompt lookup checks its
     * drafts with them). This default feeds one token at a time: the same logits in as many passes.
     */
    fun runAll(ids: IntArray, startPos: Int): Array<FloatArray> =
        Array(ids.size) { i -> run(intArrayOf(ids[i]), startPos + i) }
}
