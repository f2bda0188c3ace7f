package dev.nomoat.core

import org.json.JSONObject

/**
 * The generation loop (runtime/model.py Model.generate_tokens / stream_ids / Chat) over a [Forward]:
 * prefill the prompt tokens the KV cache does not already hold (in chunks), then one forward per
 * token; stop at a stop token id, a stop string, max new tokens or a full context.
 */

/**
 * What one request cost (GenerationStats in runtime/model.py); prefill counts only tokens actually
 * run, not cache hits. Times are nanoseconds from the request's start.
 */
class GenerationStats {
    var promptTokens = 0
    var cachedTokens = 0
    var prefillTokens = 0
    var generatedTokens = 0
    var prefillNanos = 0L
    /** When the first generated token was ready (prefill + its sampling): the bench's time to first token. */
    var firstTokenNanos = 0L
    /** When the last generated token was ready. */
    var lastTokenNanos = 0L
    /** Prompt lookup: tokens drafted and checked, and how many of them the model confirmed. */
    var draftedTokens = 0
    var acceptedTokens = 0
    /** The answer ended at a stop token (finish reason "stop"), not at max new tokens or a full context. */
    var stopToken = false
    /** The KV cache was full when the answer ended (with finish reason "length", the answer was cut
     * off there): nothing can follow it, so in a chat no next message fits until it starts over. */
    var contextFull = false

    val prefillSeconds: Double get() = prefillNanos / 1e9
    val timeToFirstTokenSeconds: Double get() = firstTokenNanos / 1e9
    /** From the first token to the last (the first comes out of prefill, so decode counts the rest). */
    val decodeSeconds: Double get() = (lastTokenNanos - firstTokenNanos) / 1e9

    val prefillTokensPerSecond: Double get() = if (prefillNanos > 0) prefillTokens / prefillSeconds else 0.0
    val decodeTokensPerSecond: Double
        get() = if (generatedTokens > 1 && decodeSeconds > 0) (generatedTokens - 1) / decodeSeconds else 0.0

    /**
     * One benchmark round with runtime/bench.py RoundResult's keys (RoundResult.from_dict reads it):
     * prefill tok/s = prompt tokens / time to first token, decode tok/s = (new tokens - 1) / decode time.
     */
    fun toBenchJson(): JSONObject {
        val ttft = timeToFirstTokenSeconds
        return JSONObject()
            .put("prompt_tokens", promptTokens)
            .put("cached_tokens", cachedTokens)
            .put("new_tokens", generatedTokens)
            .put("ttft_s", ttft)
            .put("decode_s", decodeSeconds)
            .put("ttft_ms", ttft * 1000.0)
            .put("prefill_tps", if (ttft > 0) promptTokens / ttft else JSONObject.NULL)
            .put("decode_tps", if (generatedTokens > 1 && decodeSeconds > 0) decodeTokensPerSecond else JSONObject.NULL)
            .put("drafted_tokens", draftedTokens)
            .put("accepted_tokens", acceptedTokens)
    }
}

/** A finished request: the text shown, the generated ids (stop token excluded), why it ended, what it cost. */
class Generation(val text: String, val tokenIds: IntArray, val finishReason: String, val stats: GenerationStats) {
    companion object {
        const val STOP = "stop" // a stop token or a stop string
        const val LENGTH = "length" // max new tokens reached, or the context filled up (as OpenAI's API says)
    }
}

/**
 * Runs requests over one [Forward] and remembers which tokens its KV cache holds, position by
 * position, so a request sharing a prefix with the previous one only prefills what is new.
 * Not thread-safe: one request at a time.
 */
class Generator(
    val forward: Forward,
    val codec: TextCodec,
    stopTokenIds: Collection<Int>,
    private val bosTokenId: Int? = null,
    private val addBosToken: Boolean = false,
    /** Prompt tokens per forward; ONNX Runtime's attention scratch grows with it (model.py PREFILL_CHUNK). */
    val prefillChunk: Int = PREFILL_CHUNK,
    private val clock: () -> Long = System::nanoTime,
    /** The embedding's rows (the manifest's vocab_size); prompt ids outside it are refused. null: unchecked. */
    private val vocabSize: Int? = null
) {
    private val stopIds: Set<Int> = stopTokenIds.toHashSet()
    private val cache = IntArray(forward.maxContext)
    private var length = 0

    init {
        require(prefillChunk >= 1) { "prefillChunk must be at least 1 token, got $prefillChunk" }
    }

    val maxContext: Int get() = forward.maxContext

    /** The tokens the KV cache holds. */
    val cachedTokens: IntArray get() = cache.copyOf(length)

    /** The stats of the last request (also when it failed part-way). */
    var lastStats = GenerationStats()
        private set

    /** Forget the cache (the next request prefills from position 0). */
    fun reset() {
        length = 0
    }

    /** Token ids of [text] (special tokens written in it become their ids), with BOS when the bundle asks (Model.encode). */
    fun encode(text: String, addBos: Boolean = addBosToken): IntArray {
        val ids = codec.encode(text)
        val bos = bosTokenId
        if (addBos && bos != null && (ids.isEmpty() || ids[0] != bos)) return intArrayOf(bos) + ids
        return ids
    }

    /**
     * Generate up to [maxNewTokens] tokens after [promptIds]; [onDelta] gets the text as it becomes
     * complete and safe to show (never part of a character or of a possible stop string; special
     * tokens show no text). Mirrors Model.stream_ids: finish reason "stop" on a stop token or string
     * (not shown), "length" at max new tokens or a full context. A stop string that is one special
     * token (`<|im_start|>`) stops at that token, which is then not in the answer's ids: the streamed
     * text never holds it to match. With [ignoreEos] stop tokens are generated like any other (benchmarks).
     * [promptLookup] > 0 drafts up to that many tokens a pass from the context (greedy without a
     * repetition penalty only; see [generateTokens]).
     */
    fun generate(
        promptIds: IntArray,
        maxNewTokens: Int,
        params: SamplingParams = SamplingParams(),
        stop: List<String> = emptyList(),
        ignoreEos: Boolean = false,
        promptLookup: Int = 0,
        onDelta: (String) -> Unit = {}
    ): Generation {
        val stats = GenerationStats()
        lastStats = stats
        val detok = codec.streamDecoder()
        val stops = StopMatcher(stop)
        val specialStops = stop.mapNotNull { codec.specialTokenId(it) }.toSet()
        val text = StringBuilder()
        val ids = ArrayList<Int>()
        fun emit(s: String) {
            if (s.isEmpty()) return
            text.append(s)
            onDelta(s)
        }
        generateTokens(promptIds, maxNewTokens, params, ignoreEos, stats, promptLookup, specialStops) { token ->
            ids.add(token)
            val fed = stops.feed(detok.push(token))
            emit(fed.text)
            !fed.stopped
        }
        val reason = if (stops.stopped) {
            Generation.STOP
        } else {
            val fed = stops.feed(detok.flush())
            emit(fed.text + if (fed.stopped) "" else stops.flush())
            if (fed.stopped || stats.stopToken) Generation.STOP else Generation.LENGTH
        }
        return Generation(text.toString(), ids.toIntArray(), reason, stats)
    }

    /**
     * The token loop (Model.generate_tokens): [onToken] gets each generated id and returns false to
     * stop. The stop token itself (the bundle's, or one of [extraStopIds]) is not passed on. Stops at
     * [maxNewTokens] or when the context is full (then [GenerationStats.contextFull]).
     *
     * With [promptLookup] > 0 and plain greedy parameters it decodes with prompt lookup
     * (Model.generate_tokens_lookahead): greedy's tokens up to near-ties (a pass over several
     * positions can round differently from a one-token step), in fewer passes when the answer repeats
     * its context. Sampled or penalized requests run plain: drafts checked by argmax would change them.
     */
    fun generateTokens(
        promptIds: IntArray,
        maxNewTokens: Int,
        params: SamplingParams,
        ignoreEos: Boolean,
        stats: GenerationStats,
        promptLookup: Int = 0,
        extraStopIds: Set<Int> = emptySet(),
        onToken: (Int) -> Boolean
    ) {
        require(promptIds.isNotEmpty()) { "the prompt is empty: give at least one token" }
        require(maxNewTokens >= 1) { "maxNewTokens must be at least 1, got $maxNewTokens" }
        require(promptLookup >= 0) { "promptLookup must be >= 0 drafted tokens, got $promptLookup" }
        vocabSize?.let { checkTokenIds(promptIds, it) }
        if (promptIds.size >= maxContext) {
            throw ContextOverflowException(
                "the prompt has ${promptIds.size} tokens and the bundle's context holds $maxContext, with " +
                    "room needed for at least one answer token (at most ${maxContext - 1} prompt tokens); " +
                    "shorten the prompt, reset the conversation, or convert with a larger --max-context.")
        }
        val stops = if (ignoreEos) emptySet() else stopIds + extraStopIds
        val start = clock()
        val logits = prefill(promptIds, stats)
        stats.prefillNanos = clock() - start
        if (promptLookup > 0 && params.greedy && !params.penalized) {
            decodeWithLookup(promptIds, logits, maxNewTokens, promptLookup, stops, stats, start, onToken)
        } else {
            decode(promptIds, logits, maxNewTokens, params, stops, stats, start, onToken)
        }
        stats.contextFull = length >= maxContext
    }

    private fun decode(
        promptIds: IntArray,
        prefillLogits: FloatArray,
        maxNewTokens: Int,
        params: SamplingParams,
        stops: Set<Int>,
        stats: GenerationStats,
        start: Long,
        onToken: (Int) -> Boolean
    ) {
        val sampler = Sampler(params)
        var logits = prefillLogits
        // The penalty looks at the prompt too; the history grows only when a penalty reads it.
        val penalized = params.penalized
        val room = answerRoom(promptIds.size, maxNewTokens)
        val history = if (penalized) promptIds.copyOf(promptIds.size + room) else promptIds
        var n = promptIds.size
        var generated = 0
        while (true) {
            val token = sampler.sample(logits, if (penalized) history.copyOf(n) else promptIds, promptIds.size)
            if (token in stops) {
                stats.stopToken = true
                break
            }
            if (penalized) history[n++] = token
            generated++
            stats.generatedTokens = generated
            stats.lastTokenNanos = clock() - start
            if (generated == 1) stats.firstTokenNanos = stats.lastTokenNanos
            if (!onToken(token)) return
            if (generated >= maxNewTokens || length >= maxContext) break
            logits = step(intArrayOf(token))
        }
    }

    /**
     * Tokens an answer to a prompt of [promptSize] can have: [maxNewTokens], or fewer when the context
     * ends first (every token but the last is fed). Arrays sized by it, not by [maxNewTokens]: a
     * bundle's max_new_tokens may be up to Int.MAX_VALUE, which would overflow or exhaust the heap.
     */
    private fun answerRoom(promptSize: Int, maxNewTokens: Int): Int =
        minOf(maxNewTokens.toLong(), maxContext.toLong() - promptSize + 1).toInt()

    /**
     * Each pass feeds the last token plus up to [maxDraft] drafted ones, keeps the drafts the model's
     * argmax confirms and one token more of its own, and forgets the rejected positions (the cache is
     * indexed by position: the next pass overwrites them). How many it drafts follows how well drafts
     * have done so far ([Drafter]), so on text that does not repeat it drafts little.
     */
    private fun decodeWithLookup(
        promptIds: IntArray,
        prefillLogits: FloatArray,
        maxNewTokens: Int,
        maxDraft: Int,
        stops: Set<Int>,
        stats: GenerationStats,
        start: Long,
        onToken: (Int) -> Boolean
    ) {
        val context = promptIds.copyOf(promptIds.size + answerRoom(promptIds.size, maxNewTokens))
        var size = promptIds.size
        val drafter = Drafter(maxDraft)
        var next = Sampler.argmax(prefillLogits)
        var generated = 0
        // Hands one token on; false when the answer ends with it (a stop token is not passed on).
        // A confirmed draft is counted as accepted only as it reaches the answer: a pass can confirm
        // drafts past where the answer ends (Model.generate_tokens_lookahead).
        fun produce(token: Int, at: Long, drafted: Boolean = false): Boolean {
            if (token in stops) {
                stats.stopToken = true
                return false
            }
            if (drafted) stats.acceptedTokens++
            context[size++] = token
            generated++
            stats.generatedTokens = generated
            stats.lastTokenNanos = at
            if (generated == 1) stats.firstTokenNanos = at
            return onToken(token)
        }
        if (!produce(next, clock() - start)) return
        while (generated < maxNewTokens) {
            // Positions left for drafts once `next` is in the cache; with none left `next` still runs
            // alone, as plain decoding's last step does.
            val room = maxContext - length - 1
            if (room < 0) return
            val draft = drafter.propose(context, size, minOf(room, maxNewTokens - generated))
            val rows = stepAll(intArrayOf(next) + draft)
            val predicted = IntArray(rows.size) { Sampler.argmax(rows[it]) }
            val ok = Lookup.acceptedPrefix(draft, predicted)
            drafter.update(draft.size, ok)
            stats.draftedTokens += draft.size
            length -= draft.size - ok
            val confirmed = clock() - start // the accepted drafts are ready when their pass is
            for (i in 0 until ok) {
                if (!produce(draft[i], confirmed, drafted = true)) return
            }
            if (generated >= maxNewTokens) return
            next = predicted[ok]
            if (!produce(next, clock() - start)) return
        }
    }

    /** Run the part of the prompt the cache does not already hold (Model._prefill); the last logits. */
    private fun prefill(promptIds: IntArray, stats: GenerationStats): FloatArray {
        var common = 0
        while (common < length && common < promptIds.size && cache[common] == promptIds[common]) common++
        // At least one token must run to produce the next-token logits.
        common = minOf(common, promptIds.size - 1)
        length = common
        stats.promptTokens = promptIds.size
        stats.cachedTokens = common
        stats.prefillTokens = promptIds.size - common
        var logits: FloatArray? = null
        var at = common
        while (at < promptIds.size) {
            val end = minOf(at + prefillChunk, promptIds.size)
            logits = step(promptIds.copyOfRange(at, end))
            at = end
        }
        return logits ?: throw IllegalStateException("prefill ran no token") // cannot happen: common < size
    }

    /** One forward appending [ids] to the cache (DecoderSession.forward); the last position's logits. */
    private fun step(ids: IntArray): FloatArray = append(ids) { forward.run(ids, length) }

    /** As [step], with the logits of every new position. */
    private fun stepAll(ids: IntArray): Array<FloatArray> = append(ids) { forward.runAll(ids, length) }

    private inline fun <T> append(ids: IntArray, run: () -> T): T {
        val total = length + ids.size
        if (total > maxContext) {
            throw ContextOverflowException(
                "$total tokens do not fit in the bundle's context of $maxContext; shorten the prompt, " +
                    "start a new conversation, or convert with a larger --max-context.")
        }
        val out = run()
        System.arraycopy(ids, 0, cache, length, ids.size) // only once the run succeeded
        length = total
        return out
    }

    /** Model._check_token_ids: the graph's Gather would read a negative id from the end of the embedding
     *  without a word, and fail inside ONNX Runtime on one past it. */
    private fun checkTokenIds(ids: IntArray, vocab: Int) {
        val at = ids.indexOfFirst { it < 0 || it >= vocab }
        require(at < 0) {
            "token id ${ids[at]} at position $at is not in the vocabulary (0 to ${vocab - 1}); give ids from " +
                "this bundle's tokenizer (encode)"
        }
    }

    companion object {
        /** Prompt tokens per forward: as fast as longer chunks, less peak memory (runtime/model.py). */
        const val PREFILL_CHUNK = 64

        /** A generator with the bundle's stop tokens and BOS rule. */
        fun forBundle(manifest: Manifest, forward: Forward, codec: TextCodec, prefillChunk: Int = PREFILL_CHUNK) =
            Generator(forward, codec, manifest.stopTokenIds, manifest.tokenizer.bosTokenId,
                manifest.tokenizer.addBosToken, prefillChunk, vocabSize = manifest.model.vocabSize)
    }
}

/**
 * A conversation that keeps its KV cache: each turn prefills only its new tokens (runtime/model.py Chat).
 *
 * The next prompt is built from the tokens the model actually saw and generated, plus the tokenized
 * text the chat format adds after them: re-tokenizing the whole conversation could split an earlier
 * answer differently and force a re-prefill from that point. When the rendered text does not extend
 * the previous one (a stop string cut the answer), the whole prompt is encoded and the generator's
 * prefix cache still reuses what matches.
 */
class Chat(val generator: Generator, val format: ChatFormat, system: String? = null) {
    private val history = ArrayList<Message>()
    private var text = "" // the conversation as the model saw it, as text ...
    private var ids = IntArray(0) // ... and as tokens

    init {
        reset(system)
    }

    val messages: List<Message> get() = history.toList()

    fun reset(system: String? = null) {
        history.clear()
        // An empty system message is a system turn, as in Python's Chat: only null leaves it out.
        if (system != null) history.add(Message("system", system))
        text = ""
        ids = IntArray(0)
    }

    private fun promptIds(rendered: String): IntArray {
        if (ids.isNotEmpty() && rendered.startsWith(text)) {
            val suffix = rendered.substring(text.length)
            if (generator.codec.encodesAlone(suffix)) return ids + generator.encode(suffix, addBos = false)
        }
        // The whole conversation: the generator's prefix cache still reuses what matches.
        return generator.encode(rendered)
    }

    /** One turn: the answer to [userText], streamed through [onDelta]. A failed turn leaves no trace in the history. */
    fun send(
        userText: String,
        maxNewTokens: Int,
        params: SamplingParams = SamplingParams(),
        stop: List<String> = emptyList(),
        promptLookup: Int = 0,
        onDelta: (String) -> Unit = {}
    ): Generation {
        history.add(Message("user", userText))
        val rendered: String
        val prompt: IntArray
        val result: Generation
        try {
            rendered = format.render(history)
            prompt = promptIds(rendered)
            result = generator.generate(prompt, maxNewTokens, params, stop, promptLookup = promptLookup, onDelta = onDelta)
        } catch (e: Throwable) {
            history.removeAt(history.size - 1)
            throw e
        }
        history.add(Message("assistant", result.text))
        if (shownText(result.tokenIds) == result.text) {
            ids = prompt + result.tokenIds
            text = rendered + generator.codec.decode(result.tokenIds)
        } else {
            // Cut by a stop string (Python's Chat._keep_turn): the tokens hold text the history does
            // not, which the next rendering may begin with ("<" before "<|im_end|>") and would then
            // leave as plain text. The next prompt starts from this turn's; the cache reuses the rest.
            ids = prompt
            text = rendered
        }
        return result
    }

    /** The text [tokenIds] stream as (special tokens give none), as the answer's text is made. */
    private fun shownText(tokenIds: IntArray): String {
        val decoder = generator.codec.streamDecoder()
        val out = StringBuilder()
        for (id in tokenIds) out.append(decoder.push(id))
        return out.append(decoder.flush()).toString()
    }
}
