package dev.nomoat.core

import org.json.JSONArray
import org.json.JSONObject
import java.io.File
import java.text.Normalizer
import java.util.Locale
import java.util.PriorityQueue
import java.util.regex.Pattern

/**
 * A byte-level BPE tokenizer (GPT-2 / SmolLM2, Llama 3, Qwen2) read from a Hugging Face
 * tokenizer.json, giving the ids and text that the `tokenizers` library gives
 * (`encode(text, add_special_tokens=False)`, `decode(ids, skip_special_tokens=False)`); its stream
 * decoder gives what the Python runtime streams (`skip_special_tokens=True`: no special tokens).
 *
 * Encoding, as in `tokenizers`: added tokens are cut out of the text first; each piece in between
 * is normalized (nothing or NFC), split by the pre-tokenizer's regexes, mapped byte by byte to
 * GPT-2's printable characters and merged by BPE. Anything else (WordPiece, Unigram, Metaspace,
 * byte fallback, ...) is refused when loading, so a bundle never tokenizes differently in silence.
 */
class Tokenizer private constructor(
    private val vocab: Map<String, Int>,
    /** Token text by id: the model's vocabulary, overridden by added tokens (as `tokenizers` does). */
    private val tokens: Array<String?>,
    /** Merge rank by pair of ids packed into a Long ([pairKey]); [mergedIds] gives the merge's result. */
    private val ranks: HashMap<Long, Int>,
    private val mergedIds: IntArray,
    private val ignoreMerges: Boolean,
    private val unkId: Int?,
    private val fuseUnk: Boolean,
    private val nfc: Boolean,
    /** Added tokens matched in the raw text, then (after normalizing) the ones marked "normalized". */
    private val rawAdded: AddedTokens,
    private val normalizedAdded: AddedTokens,
    /** The text of the added tokens marked "special": `tokenizers` leaves a token out of
     * `decode(ids, skip_special_tokens=True)` when its text is one of these. */
    private val specialContents: Set<String>,
    private val preTokenizers: List<PreTokenizer>
) : TextCodec {

    /** BPE results by pre-token: text repeats words a lot, and merging is the costly part. */
    private val cache = object : LinkedHashMap<String, IntArray>(1024, 0.75f, true) {
        override fun removeEldestEntry(eldest: MutableMap.MutableEntry<String, IntArray>?) = size > CACHE_SIZE
    }

    override fun encode(text: String): IntArray {
        refuseLoneSurrogates(text)
        val out = IntList()
        for ((raw, rawId) in rawAdded.split(text)) {
            if (rawId >= 0) { out.add(rawId); continue }
            val normalized = if (nfc) Normalizer.normalize(raw, Normalizer.Form.NFC) else raw
            for ((piece, id) in normalizedAdded.split(normalized)) {
                if (id >= 0) out.add(id) else preTokenize(piece).forEach { out.addAll(bpe(it)) }
            }
        }
        return out.toArray()
    }

    override fun decode(ids: IntArray): String {
        val bytes = java.io.ByteArrayOutputStream()
        for (id in ids) bytes.write(tokenBytes(id))
        val all = bytes.toByteArray()
        return Utf8.decode(all, 0, all.size)
    }

    /** Special tokens give no text, as in the Python runtime's stream (runtime/detokenizer.py with
     * `skip_special_tokens=True`): a `<|endoftext|>` the model writes mid-answer is not shown. */
    override fun streamDecoder(): TokenStreamDecoder = Utf8StreamDecoder(::shownBytes)

    /** Model._special_token_ids for one string: its id when it is a single token that decodes to
     * nothing with `skip_special_tokens=True` (a special token), else null. */
    override fun specialTokenId(text: String): Int? = tokenToId(text)?.takeIf { shownBytes(it).isEmpty() }

    override fun encodesAlone(suffix: String): Boolean =
        preTokenizers.none { it.addPrefixSpace } || suffix.isEmpty() || startsWithAddedToken(suffix)

    /** A suffix that starts with an added token starts a piece of its own, alone or after other text. */
    private fun startsWithAddedToken(text: String): Boolean =
        (rawAdded.split(text).firstOrNull()?.second ?: -1) >= 0 ||
            (normalizedAdded.split(text).firstOrNull()?.second ?: -1) >= 0

    /** The id of a token's text (model vocabulary or added token), or null. */
    fun tokenToId(token: String): Int? = vocab[token] ?: rawAdded.idOf(token) ?: normalizedAdded.idOf(token)

    /** [tokenBytes], except nothing for a special token (`decode(ids, skip_special_tokens=True)`). */
    private fun shownBytes(id: Int): ByteArray =
        if (tokens.getOrNull(id) in specialContents) ByteArray(0) else tokenBytes(id)

    /** The bytes a token stands for. Like `tokenizers`' ByteLevel decoder: a token made only of
     * byte characters gives those bytes, any other (e.g. an added "<|im_end|>" with a space) its
     * UTF-8 text; an id outside the vocabulary gives nothing (`tokenizers` skips it too). */
    internal fun tokenBytes(id: Int): ByteArray {
        val token = tokens.getOrNull(id) ?: return ByteArray(0)
        val bytes = ByteArray(token.length)
        for (i in token.indices) {
            val b = BYTE_OF_CHAR.getOrNull(token[i].toInt()) ?: -1
            if (b < 0) return token.toByteArray(Charsets.UTF_8)
            bytes[i] = b.toByte()
        }
        return bytes
    }

    /** The pre-tokens of [text], each already mapped to byte characters. */
    private fun preTokenize(text: String): List<String> {
        var pieces = listOf(text)
        for (step in preTokenizers) pieces = pieces.flatMap { step.split(it) }
        return pieces.map(::byteChars)
    }

    private fun bpe(word: String): IntArray {
        // The cache is locked because a get() reorders an access-ordered LinkedHashMap.
        synchronized(cache) { cache[word] }?.let { return it }
        val ids = merge(word)
        synchronized(cache) { cache[word] = ids }
        return ids
    }

    /** `tokenizers`' merge loop: always apply the lowest-ranked adjacent pair, leftmost first. */
    private fun merge(word: String): IntArray {
        if (ignoreMerges) vocab[word]?.let { return intArrayOf(it) }
        val initial = IntList()
        for (c in word) {
            val id = vocab[c.toString()]
            when {
                id != null -> initial.add(id)
                unkId == null -> {}  // no unk token: `tokenizers` drops the character
                fuseUnk && initial.size > 0 && initial.last() == unkId -> {}
                else -> initial.add(unkId)
            }
        }
        val n = initial.size
        val ids = initial.toArray()
        // Symbols form a linked list; a merge keeps the left one (its position) and unlinks the right.
        val next = IntArray(n) { if (it + 1 < n) it + 1 else -1 }
        val prev = IntArray(n) { it - 1 }
        val alive = BooleanArray(n) { true }
        // Candidates packed as rank << 32 | position, so the smallest is the lowest rank, then leftmost.
        val queue = PriorityQueue<Long>()
        fun offer(pos: Int) {
            if (pos < 0 || next[pos] < 0) return
            val rank = ranks[pairKey(ids[pos], ids[next[pos]])] ?: return
            queue.add((rank.toLong() shl 32) or pos.toLong())
        }
        for (pos in 0 until n) offer(pos)
        while (queue.isNotEmpty()) {
            val top = queue.poll()
            val rank = (top ushr 32).toInt()
            val pos = top.toInt()
            val right = next[pos]
            // Stale candidate: one of its symbols has been merged into something else since.
            if (!alive[pos] || right < 0 || ranks[pairKey(ids[pos], ids[right])] != rank) continue
            ids[pos] = mergedIds[rank]
            alive[right] = false
            next[pos] = next[right]
            if (next[right] >= 0) prev[next[right]] = pos
            offer(prev[pos])
            offer(pos)
        }
        return IntArray(alive.count { it }).also { out ->
            var k = 0
            for (i in 0 until n) if (alive[i]) out[k++] = ids[i]
        }
    }

    companion object {
        const val SUPPORTED = "the app supports byte-level BPE tokenizers (GPT-2 / Llama 3 / Qwen2 style)"
        private const val CACHE_SIZE = 10_000

        /** GPT-2's pre-tokenizer regex, which `tokenizers`' ByteLevel uses when use_regex is true. */
        private const val GPT2_REGEX =
            """'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

        /** GPT-2's byte -> printable character table (bytes that are printable map to themselves). */
        private val CHAR_OF_BYTE: CharArray = run {
            val table = CharArray(256)
            var extra = 0
            for (b in 0 until 256) {
                val printable = b in 33..126 || b in 161..172 || b in 174..255
                table[b] = if (printable) b.toChar() else (256 + extra++).toChar()
            }
            table
        }
        private val BYTE_OF_CHAR: IntArray = IntArray(324) { -1 }.also { inv ->
            for (b in 0 until 256) inv[CHAR_OF_BYTE[b].toInt()] = b
        }

        fun fromFile(path: File): Tokenizer = fromJson(path.readText(Charsets.UTF_8))

        fun fromJson(json: String): Tokenizer {
            val root = JSONObject(json)
            val model = root.optJSONObject("model") ?: refuse("tokenizer.json has no model")
            val type = model.optString("type", "BPE")  // older files leave the type out
            if (type != "BPE") refuse("tokenizer.json model type '$type' is not supported")
            if (!model.isNull("dropout") && model.optDouble("dropout", 0.0) != 0.0) {
                refuse("BPE dropout (${model.get("dropout")}) makes tokenization random and is not supported")
            }
            if (model.optBoolean("byte_fallback", false)) refuse("BPE byte_fallback (SentencePiece style) is not supported")
            for (key in listOf("continuing_subword_prefix", "end_of_word_suffix")) {
                if (model.optString(key, "").isNotEmpty() && !model.isNull(key)) refuse("BPE $key is not supported")
            }

            val vocab = HashMap<String, Int>()
            val vocabJson = model.getJSONObject("vocab")
            for (token in vocabJson.keys()) vocab[token] = vocabJson.getInt(token)

            val merges = model.optJSONArray("merges") ?: JSONArray()
            val ranks = HashMap<Long, Int>(merges.length() * 2)
            val mergedIds = IntArray(merges.length())
            for (rank in 0 until merges.length()) {
                val (left, right) = mergePair(merges.get(rank))
                fun idOf(token: String) = vocab[token] ?: refuse("merge '$left $right' uses '$token', which is not in the vocabulary")
                mergedIds[rank] = idOf(left + right)
                ranks[pairKey(idOf(left), idOf(right))] = rank  // a repeated merge keeps its last rank, as in `tokenizers`
            }

            val unkToken = if (model.isNull("unk_token")) null else model.optString("unk_token")
            val unkId = unkToken?.let { vocab[it] ?: refuse("the unk_token '$it' is not in the vocabulary") }

            val raw = ArrayList<Pair<String, Int>>()
            val normalized = ArrayList<Pair<String, Int>>()
            val special = HashSet<String>()
            val added = root.optJSONArray("added_tokens") ?: JSONArray()
            var maxId = vocab.values.fold(-1) { a, b -> maxOf(a, b) }
            for (i in 0 until added.length()) {
                val t = added.getJSONObject(i)
                val content = t.getString("content")
                val id = t.getInt("id")
                if (t.optBoolean("single_word", false)) refuse("the added token '$content' is single_word, which is not supported")
                if (t.optBoolean("lstrip", false) || t.optBoolean("rstrip", false)) {
                    refuse("the added token '$content' strips spaces (lstrip/rstrip), which is not supported")
                }
                // `tokenizers` defaults "normalized" to true for non-special tokens only.
                val isNormalized = t.optBoolean("normalized", !t.optBoolean("special", false))
                (if (isNormalized) normalized else raw).add(content to id)
                if (t.optBoolean("special", false)) special.add(content)
                maxId = maxOf(maxId, id)
            }
            val tokens = arrayOfNulls<String>(maxId + 1)
            for ((token, id) in vocab) tokens[id] = token
            for ((content, id) in raw + normalized) tokens[id] = content

            return Tokenizer(
                vocab, tokens, ranks, mergedIds,
                ignoreMerges = model.optBoolean("ignore_merges", false),
                unkId = unkId,
                fuseUnk = model.optBoolean("fuse_unk", false),
                nfc = readNormalizer(root.opt("normalizer")),
                rawAdded = AddedTokens(raw),
                normalizedAdded = AddedTokens(normalized),
                specialContents = special,
                preTokenizers = readPreTokenizer(root.opt("pre_tokenizer"))
            ).also { checkDecoder(root.opt("decoder")) }
            // post_processor is not read: encode() adds no special tokens (see TextCodec).
        }

        private fun mergePair(merge: Any): Pair<String, String> {
            if (merge is JSONArray && merge.length() == 2) return merge.getString(0) to merge.getString(1)
            if (merge is String) {
                val parts = merge.split(' ')
                if (parts.size == 2) return parts[0] to parts[1]
            }
            refuse("a merge must be \"left right\" or [left, right], not $merge")
        }

        /** True for NFC; null means no normalizer. */
        private fun readNormalizer(spec: Any?): Boolean {
            if (spec == null || spec == JSONObject.NULL) return false
            val type = (spec as? JSONObject)?.optString("type")
            if (type == "NFC") return true
            refuse("the normalizer '$type' is not supported (only none or NFC)")
        }

        private fun readPreTokenizer(spec: Any?): List<PreTokenizer> {
            val obj = spec as? JSONObject ?: refuse("a tokenizer without a pre-tokenizer is not byte-level and is not supported")
            val steps = if (obj.optString("type") == "Sequence") {
                val list = obj.getJSONArray("pretokenizers")
                (0 until list.length()).map { list.getJSONObject(it) }
            } else {
                listOf(obj)
            }
            if (steps.lastOrNull()?.optString("type") != "ByteLevel") {
                refuse("the pre-tokenizer must end with ByteLevel (it is ${steps.map { it.optString("type") }})")
            }
            return steps.mapIndexed { i, step ->
                when (val type = step.optString("type")) {
                    "ByteLevel" -> {
                        if (i != steps.size - 1) refuse("ByteLevel must be the last pre-tokenizer")
                        val regex = if (step.optBoolean("use_regex", true)) compile(GPT2_REGEX) else null
                        PreTokenizer(regex, step.optBoolean("add_prefix_space", false))
                    }
                    "Split" -> readSplit(step)
                    else -> refuse("the pre-tokenizer '$type' is not supported")
                }
            }
        }

        private fun readSplit(step: JSONObject): PreTokenizer {
            val behavior = step.optString("behavior")
            if (behavior != "Isolated" || step.optBoolean("invert", false)) {
                refuse("a Split pre-tokenizer must be Isolated and not inverted (it is $behavior, invert=${step.opt("invert")})")
            }
            val pattern = step.getJSONObject("pattern")
            val regex = when {
                pattern.has("Regex") -> compile(pattern.getString("Regex"))
                pattern.has("String") -> Pattern.compile(Pattern.quote(pattern.getString("String")))
                else -> refuse("a Split pattern must be a Regex or a String: $pattern")
            }
            return PreTokenizer(regex, addPrefixSpace = false)
        }

        private fun checkDecoder(spec: Any?) {
            val type = (spec as? JSONObject)?.optString("type")
            if (type != "ByteLevel") refuse("the decoder '${type ?: "none"}' is not supported")
        }

        /**
         * Compile a `tokenizers` regex (Oniguruma, Ruby syntax) for java.util.regex: the JDK's engine
         * on the host, ICU's on a phone. What all three read alike is kept, what Oniguruma means but the
         * others spell differently is spelled out, and anything else is refused by name: a regex that
         * split text differently would tokenize it differently, in silence.
         *
         * Spelled out: `\s` `\S` (Unicode White_Space in Oniguruma; ASCII in the JDK unless
         * UNICODE_CHARACTER_CLASS, a flag ICU does not take, and ICU's own misses U+000B and U+0085),
         * `\d` `\D` (\p{Nd} in Oniguruma and ICU, [0-9] in the JDK), `\h` `\H` (a hex digit in
         * Oniguruma, horizontal space in the others), `\v` (U+000B; vertical space in the others),
         * `\xH`, `\xHH`, `\x{H..}`, `\uHHHH` (one code point; the JDK's \x takes exactly two digits),
         * `\p{..}` `\P{..}` of a Unicode general category in any of Oniguruma's spellings (`Lu`, `lu`,
         * `Uppercase_Letter`, `^Lu`), `.` (anything but \n in Oniguruma; the others also stop at \r,
         * U+0085, U+2028 and U+2029) and `{,n}`. Kept: `\t \n \r \f \a \e`, `\A` `\z`, escaped ASCII
         * punctuation. The general categories come from the platform's Unicode tables, which may be
         * older than Oniguruma's (README: letters added since differ).
         */
        internal fun compile(regex: String): Pattern {
            val out = StringBuilder()
            var inClass = 0
            // Oniguruma folds case for \p{..} inside (?i) only in [...], the JDK and ICU everywhere.
            var caseless = false
            val groups = ArrayList<Boolean>() // `caseless` where each open group began, back at its ')'
            var i = 0
            while (i < regex.length) {
                val c = regex[i]
                i = when {
                    c == '\\' -> escape(regex, i, inClass > 0, caseless, out)
                    inClass > 0 -> {
                        if (regex.startsWith("[:", i)) {
                            differs("[:...:]", "a POSIX bracket: a Unicode class in Oniguruma, the characters themselves in Java")
                        }
                        if (c == '[') inClass++ else if (c == ']') inClass--
                        out.append(c)
                        i + 1
                    }
                    c == '[' -> {
                        inClass++
                        out.append(c)
                        i + 1
                    }
                    c == '.' -> {
                        out.append("[^\\n]")
                        i + 1
                    }
                    c == '^' || c == '$' -> differs("$c", "a line anchor in Oniguruma, the whole text's in Java")
                    c == '(' -> {
                        val options = INLINE_OPTIONS.matcher(regex).region(i, regex.length)
                        if (options.lookingAt()) {
                            val letters = options.group(1)
                            if (letters.any { it != 'i' && it != '-' }) {
                                differs("(?$letters)", "only the i option is the same: (?m) is dotall in Oniguruma, multiline in Java")
                            }
                            // (?i:...) sets it for its group, (?i) for the rest of the enclosing one.
                            if (options.group(2) == ":") groups.add(caseless)
                            caseless = letters.startsWith("i")
                            out.append(options.group())
                            options.end()
                        } else {
                            groups.add(caseless)
                            out.append(c)
                            i + 1
                        }
                    }
                    c == ')' -> {
                        if (groups.isNotEmpty()) caseless = groups.removeAt(groups.size - 1)
                        out.append(c)
                        i + 1
                    }
                    c == '{' -> interval(regex, i, out)
                    else -> {
                        out.append(c)
                        i + 1
                    }
                }
            }
            // UNICODE_CASE: Oniguruma's (?i:'s|...) folds case beyond ASCII too.
            return Pattern.compile(out.toString(), Pattern.UNICODE_CASE)
        }

        /** Translate the escape at regex[at] (a backslash) into [out]; the index after it. */
        private fun escape(regex: String, at: Int, inClass: Boolean, caseless: Boolean, out: StringBuilder): Int {
            if (at + 1 >= regex.length) refuse("the pre-tokenizer regex ends with a lone backslash")
            val e = regex[at + 1]
            var next = at + 2
            when (e) {
                's' -> out.append(if (inClass) WHITE_SPACE else "[$WHITE_SPACE]")
                'd' -> out.append("\\p{Nd}")
                'D' -> out.append("\\P{Nd}")
                'h' -> out.append(if (inClass) HEX_DIGIT else "[$HEX_DIGIT]")
                'S', 'H' -> if (inClass) {
                    differs("\\$e inside [...]", "a negated class inside a class cannot be spelled out for Java")
                } else {
                    out.append("[^").append(if (e == 'S') WHITE_SPACE else HEX_DIGIT).append(']')
                }
                'v' -> out.append("\\x{b}")
                't', 'n', 'r', 'f', 'a', 'e' -> out.append('\\').append(e)
                'A', 'z' -> if (inClass) differs("\\$e inside [...]", "an anchor cannot be in a class") else out.append('\\').append(e)
                'x', 'u' -> {
                    // Oniguruma: \x{1-8 hex digits}, \x with 1-2 hex digits (a byte: ASCII only in UTF-8), \u with 4.
                    val braced = e == 'x' && regex.startsWith("{", next)
                    val from = if (braced) next + 1 else next
                    var to = from
                    val most = if (braced) 8 else if (e == 'x') 2 else 4
                    while (to < regex.length && to - from < most && Character.digit(regex[to], 16) >= 0) to++
                    val digits = regex.substring(from, to)
                    val closed = !braced || regex.startsWith("}", to)
                    val cp = digits.toLongOrNull(16)
                    val ok = cp != null && closed && (e != 'u' || digits.length == 4) && (braced || e == 'u' || cp < 0x80) &&
                        cp <= Character.MAX_CODE_POINT && cp !in 0xD800L..0xDFFFL
                    if (!ok) differs("\\$e${regex.substring(next, minOf(regex.length, to + 1))}", "not one whole code point")
                    out.append("\\x{").append(java.lang.Long.toHexString(cp!!)).append('}')
                    next = if (braced) to + 1 else to
                }
                'p', 'P' -> {
                    val close = regex.indexOf('}', next)
                    if (!regex.startsWith("{", next) || close < 0) differs("\\$e without {...}", "not read alike")
                    val written = regex.substring(next + 1, close)
                    if (caseless) {
                        differs("\\$e{$written} inside (?i)", "Oniguruma folds case for it only inside [...], Java everywhere")
                    }
                    val negated = written.startsWith("^")
                    val category = GENERAL_CATEGORIES[written.removePrefix("^").toLowerCase().filter { it !in " _-" }]
                        ?: differs("\\$e{$written}", "only Unicode general categories (L, Lu, N, Nd, P, ...) are read alike: " +
                            "scripts, blocks and POSIX names are spelled or defined differently in Java")
                    out.append('\\').append(if ((e == 'P') != negated) 'P' else 'p').append('{').append(category).append('}')
                    next = close + 1
                }
                else -> if (e.toInt() < 0x80 && !e.isLetterOrDigit()) {
                    out.append('\\').append(e) // escaped punctuation is the character itself everywhere
                } else {
                    differs("\\$e", ESCAPES_THAT_DIFFER[e] ?: "an escape the app does not translate")
                }
            }
            return next
        }

        /** `{` at regex[at], outside a class: an interval quantifier, or a plain brace (Oniguruma); the index after it. */
        private fun interval(regex: String, at: Int, out: StringBuilder): Int {
            val m = INTERVAL.matcher(regex).region(at, regex.length)
            if (!m.lookingAt() || (m.group(1).isEmpty() && m.group(3).isEmpty())) {
                out.append("\\{") // not an interval: Oniguruma reads a plain brace, Java would refuse it
                return at + 1
            }
            val low = m.group(1)
            val comma = m.group(2)
            val after = regex.getOrNull(m.end())
            if (after == '+' || (after == '?' && comma.isEmpty())) {
                differs("${m.group()}$after", "in Oniguruma's Ruby syntax ${if (after == '+') "a repeated" else "an optional"} " +
                    "interval, in Java a ${if (after == '+') "possessive" else "lazy"} one")
            }
            out.append('{').append(if (low.isEmpty()) "0" else low).append(comma).append(m.group(3)).append('}')
            return m.end()
        }

        private val INTERVAL = Pattern.compile("""\{(\d*)(,?)(\d*)\}""")
        private val INLINE_OPTIONS = Pattern.compile("""\(\?([A-Za-z-]+)([:)])""")

        private fun differs(what: String, why: String): Nothing = refuse(
            "the pre-tokenizer regex uses $what ($why), which the app cannot run as `tokenizers` does: " +
                "it would split text, so tokenize it, differently")

        /** Why the escapes refused by letter are refused. */
        private val ESCAPES_THAT_DIFFER = mapOf(
            'w' to "a word character: Unicode in Oniguruma, ASCII in Java", 'W' to "not a word character: Unicode in Oniguruma, ASCII in Java",
            'b' to "a word boundary: Unicode words in Oniguruma, not so in Java", 'B' to "not a word boundary: Unicode words in Oniguruma, not so in Java",
            'Z' to "the end or a final \\n in Oniguruma, any final line terminator in Java",
            'G' to "where the search started in Oniguruma, the previous match's end in Java",
            'Q' to "a plain Q in Oniguruma, the start of a quote in Java",
            'X' to "a grapheme cluster by the platform's rules", 'R' to "a line break, not translated",
            'N' to "a non-newline in Oniguruma", 'O' to "any character in Oniguruma", 'K' to "keep-out in Oniguruma",
            'y' to "a text segment boundary in Oniguruma", 'Y' to "not a text segment boundary in Oniguruma",
            'c' to "a control character, not translated", 'k' to "a named backreference, not translated",
            'g' to "a subexpression call in Oniguruma"
        ).plus(('0'..'9').map { it to "a backreference or an octal escape, not translated" })

        /** Unicode general categories by Oniguruma's names for them (lower case, without ' ', '_' and
         * '-'), as the JDK and ICU spell them; the long names are Unicode's PropertyValueAliases. */
        private val GENERAL_CATEGORIES: Map<String, String> = listOf(
            "C" to "Other", "Cc" to "Control", "Cf" to "Format", "Cn" to "Unassigned", "Co" to "Private_Use",
            "Cs" to "Surrogate", "L" to "Letter", "LC" to "Cased_Letter", "Ll" to "Lowercase_Letter",
            "Lm" to "Modifier_Letter", "Lo" to "Other_Letter", "Lt" to "Titlecase_Letter", "Lu" to "Uppercase_Letter",
            "M" to "Mark", "M" to "Combining_Mark", "Mc" to "Spacing_Mark", "Me" to "Enclosing_Mark",
            "Mn" to "Nonspacing_Mark", "N" to "Number", "Nd" to "Decimal_Number", "Nl" to "Letter_Number",
            "No" to "Other_Number", "P" to "Punctuation", "Pc" to "Connector_Punctuation", "Pd" to "Dash_Punctuation",
            "Pe" to "Close_Punctuation", "Pf" to "Final_Punctuation", "Pi" to "Initial_Punctuation",
            "Po" to "Other_Punctuation", "Ps" to "Open_Punctuation", "S" to "Symbol", "Sc" to "Currency_Symbol",
            "Sk" to "Modifier_Symbol", "Sm" to "Math_Symbol", "So" to "Other_Symbol", "Z" to "Separator",
            "Zl" to "Line_Separator", "Zp" to "Paragraph_Separator", "Zs" to "Space_Separator"
        ).flatMap { (short, long) -> listOf(short.toLowerCase() to short, long.toLowerCase().replace("_", "") to short) }.toMap()

        /** Unicode's White_Space property (what Oniguruma's \s matches), for use inside [...]. */
        private const val WHITE_SPACE = "\\t\\n\\u000B\\f\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000"
        /** Oniguruma's \h, for use inside [...]. */
        private const val HEX_DIGIT = "0-9a-fA-F"

        private fun byteChars(text: String): String {
            val bytes = text.toByteArray(Charsets.UTF_8)
            val chars = CharArray(bytes.size) { CHAR_OF_BYTE[bytes[it].toInt() and 0xFF] }
            return String(chars)
        }

        private fun pairKey(left: Int, right: Int): Long = (left.toLong() shl 32) or (right.toLong() and 0xFFFFFFFFL)

        private fun refuse(what: String): Nothing = throw IllegalArgumentException("$what; $SUPPORTED")
    }
}

/** One pre-tokenization step: a Split (regex, Isolated) or ByteLevel (optional GPT-2 regex and prefix space). */
internal class PreTokenizer(private val regex: Pattern?, val addPrefixSpace: Boolean) {
    /** Matches and the text between them, in order (`tokenizers`' "Isolated" behavior). An empty
     * match still cuts the text there, as in `tokenizers` ("a?" splits "abc" into a, b, c). */
    fun split(text: String): List<String> {
        val input = if (addPrefixSpace && !text.startsWith(" ")) " $text" else text
        if (regex == null) return listOf(input)
        val pieces = ArrayList<String>()
        val m = regex.matcher(input)
        var last = 0
        while (m.find()) {
            // After an empty match the JDK searches on one UTF-16 unit further, `tokenizers` one character:
            // an empty match inside a surrogate pair is one `tokenizers` never sees.
            val at = m.start()
            if (at == m.end() && at in 1 until input.length && Character.isSurrogatePair(input[at - 1], input[at])) continue
            if (at > last) pieces.add(input.substring(last, at))
            if (m.end() > at) pieces.add(input.substring(at, m.end()))
            last = m.end()
        }
        if (last < input.length) pieces.add(input.substring(last))
        return pieces
    }
}

/**
 * Added tokens found in text the way `tokenizers` finds them (Aho-Corasick, leftmost-longest):
 * at the earliest position where one starts, the longest one. Pieces are (text, -1) or (token, id).
 */
internal class AddedTokens(tokens: List<Pair<String, Int>>) {
    private val byContent = tokens.filter { it.first.isNotEmpty() }.toMap()
    /** Candidates by first character, longest first. */
    private val byFirst: Map<Char, List<String>> =
        byContent.keys.groupBy { it[0] }.mapValues { (_, list) -> list.sortedByDescending { it.length } }

    fun idOf(content: String): Int? = byContent[content]

    fun split(text: String): List<Pair<String, Int>> {
        if (byContent.isEmpty()) return if (text.length == 0) emptyList() else listOf(text to -1)
        val pieces = ArrayList<Pair<String, Int>>()
        var start = 0  // start of the text not yet emitted
        var i = 0
        while (i < text.length) {
            val match = byFirst[text[i]]?.firstOrNull { text.startsWith(it, i) }
            if (match == null) { i++; continue }
            if (i > start) pieces.add(text.substring(start, i) to -1)
            pieces.add(match to byContent.getValue(match))
            i += match.length
            start = i
        }
        if (start < text.length) pieces.add(text.substring(start) to -1)
        return pieces
    }
}

/** A growable IntArray (boxing every id of a long prompt into a List<Int> is wasteful on a phone). */
internal class IntList {
    private var data = IntArray(16)
    var size = 0
        private set

    fun add(v: Int) {
        if (size == data.size) data = data.copyOf(size * 2)
        data[size++] = v
    }

    fun addAll(vs: IntArray) = vs.forEach(::add)
    fun last(): Int = data[size - 1]
    fun toArray(): IntArray = data.copyOf(size)
}

/**
 * Text with half of a surrogate pair (an emoji cut in two when it was copied) has no UTF-8 form:
 * refused as runtime/model.py check_utf8 and Hugging Face tokenizers refuse it, where Java's
 * encoder would silently make it a "?".
 */
internal fun refuseLoneSurrogates(text: String) {
    var i = 0
    while (i < text.length) {
        val c = text[i]
        val paired = Character.isHighSurrogate(c) && i + 1 < text.length && Character.isLowSurrogate(text[i + 1])
        if (paired) { i += 2; continue }
        if (Character.isSurrogate(c)) {
            throw IllegalArgumentException("the text is not valid Unicode: a lone surrogate U+" +
                String.format(Locale.ROOT, "%04X", text.codePointAt(i)) + " at character ${text.codePointCount(0, i) + 1} " +
                "(often half of an emoji cut when the text was copied); remove it")
        }
        i++
    }
}
