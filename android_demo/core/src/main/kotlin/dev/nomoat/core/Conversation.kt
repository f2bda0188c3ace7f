package dev.nomoat.core

/**
 * The chat screen's logic, without Android (runtime/cli_chat.py's loop): what one thing the user
 * sends does, and what to tell them. "/reset" (or the screen's New chat button, [reset]) starts a
 * new conversation; anything else is a message, answered in the bundle's chat format, or sent as a
 * prompt of its own when the bundle has none.
 *
 * A chat keeps every turn in the KV cache, so once it fills the bundle's context no message fits
 * any more and every one would fail: the notes then say how to start over.
 */
class Conversation(val generator: Generator, format: ChatFormat?, private val system: String? = null) {
    /** Null when the bundle has no chat_format: each message is then a prompt of its own. */
    val chat: Chat? = format?.let { Chat(generator, it, system) }

    /** What one send did: the answer (null for a command, or a message that did not fit) and a line
     * to show after it (or null). */
    class Turn(val result: Generation?, val note: String?)

    /** One thing the user sent; [onDelta] gets the answer's text as it comes (nothing for a command or a
     * blank message). The message is sent without its outer whitespace, as `nomoat chat` sends a line
     * (a keyboard's trailing space after a suggestion would otherwise be a token of the prompt). */
    fun send(
        text: String,
        maxNewTokens: Int,
        params: SamplingParams = SamplingParams(),
        promptLookup: Int = 0,
        onDelta: (String) -> Unit = {}
    ): Turn {
        val message = ChatFormat.pythonStrip(text)
        if (message.isEmpty()) return Turn(null, null)
        if (message == RESET) {
            reset()
            return Turn(null, RESET_NOTE)
        }
        val result = try {
            chat?.send(message, maxNewTokens, params, promptLookup = promptLookup, onDelta = onDelta)
                ?: generator.generate(generator.encode(message), maxNewTokens, params, promptLookup = promptLookup,
                    onDelta = onDelta)
        } catch (e: ContextOverflowException) {
            // In a chat it is the conversation that no longer fits: only starting over helps.
            return Turn(null, if (chat != null) "[${e.message} $START_OVER]" else "[${e.message}]")
        }
        return Turn(result, if (result.stats.contextFull) fullNote(result) else null)
    }

    /** Start a new conversation (the system message stays). The KV cache is kept: the next prompt
     * reuses whatever prefix it shares, as runtime/model.py's Chat.reset does. */
    fun reset() {
        chat?.reset(system)
    }

    private fun fullNote(result: Generation): String {
        val cut = if (result.finishReason == Generation.LENGTH) ", which cut this answer off" else ""
        val max = generator.maxContext
        return if (chat != null) {
            "[The conversation filled the bundle's context of $max tokens$cut: no next message fits. $START_OVER]"
        } else {
            "[The prompt and the answer filled the bundle's context of $max tokens$cut.]"
        }
    }

    companion object {
        /** The command that starts a new conversation, as in `nomoat chat`. */
        const val RESET = "/reset"
        /** The screen's button that does the same. */
        const val NEW_CHAT = "New chat"
        const val RESET_NOTE = "[New conversation: the earlier messages are forgotten.]"
        const val START_OVER = "Tap $NEW_CHAT (or send $RESET) to start over."
    }
}

/**
 * The line the app shows, or logs for `nomoat deploy --adb --bench`, for a failure. An exception's
 * message names the problem and the fix; an Error (loading a bundle too big for the phone, ONNX
 * Runtime's native library missing) would otherwise crash the app, and the host would wait out its
 * timeout for a line that never comes, so it is reported too, by name.
 */
fun failureText(e: Throwable): String = when (e) {
    is OutOfMemoryError -> "out of memory (${e.message ?: "no detail"}): the bundle needs more memory than the app " +
        "has; close other apps, or convert for this phone with a smaller --quant or --max-context"
    is Exception -> e.message ?: e.toString()
    else -> e.toString() // e.g. "java.lang.UnsatisfiedLinkError: dlopen failed: ..."
}
