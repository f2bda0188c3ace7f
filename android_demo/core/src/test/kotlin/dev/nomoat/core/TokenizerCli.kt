package dev.nomoat.core

import org.json.JSONArray
import java.io.File

/**
 * For the host cross-check against Hugging Face `tokenizers` (tests/test_android_tokenizer.py):
 *
 *     TokenizerCli tokenizer.json            stdin: a JSON string a line
 *         stdout a line each: ids (JSON array) TAB decode(ids) TAB stream pushes + flush
 *     TokenizerCli tokenizer.json --decode   stdin: a JSON array of ids a line
 *         stdout a line each: decode(ids) TAB stream pushes + flush
 *     TokenizerCli --split                   stdin: a JSON array [regex, text] a line
 *         stdout a line each: the pieces of text by an Isolated Split with the `tokenizers` regex
 *         (a JSON array), or {"error": "..."} when the app refuses the regex
 *
 * Output is pure ASCII (non-ASCII as \uXXXX), so the host's locale does not matter.
 */
object TokenizerCli {
    @JvmStatic
    fun main(args: Array<String>) {
        require(args.size in 1..2) { "usage: TokenizerCli tokenizer.json [--decode] < lines | TokenizerCli --split < lines" }
        if (args[0] == "--split") return split()
        val tokenizer = Tokenizer.fromFile(File(args[0]))
        val decodeOnly = args.getOrNull(1) == "--decode"
        val out = StringBuilder()
        System.`in`.bufferedReader(Charsets.UTF_8).forEachLine { line ->
            val ids = if (decodeOnly) {
                val list = JSONArray(line)
                IntArray(list.length()) { list.getInt(it) }
            } else {
                tokenizer.encode(JSONArray("[$line]").getString(0))
            }
            if (!decodeOnly) out.append(ids.joinToString(",", "[", "]")).append('\t')
            val stream = tokenizer.streamDecoder()
            val streamed = ids.joinToString("") { stream.push(it) } + stream.flush()
            out.append(quote(tokenizer.decode(ids))).append('\t').append(quote(streamed)).append('\n')
        }
        print(out)
    }

    private fun split() {
        val out = StringBuilder()
        System.`in`.bufferedReader(Charsets.UTF_8).forEachLine { line ->
            val request = JSONArray(line)
            try {
                val pieces = PreTokenizer(Tokenizer.compile(request.getString(0)), addPrefixSpace = false).split(request.getString(1))
                out.append(pieces.joinToString(",", "[", "]") { quote(it) }).append('\n')
            } catch (e: IllegalArgumentException) {
                out.append("{\"error\": ${quote(e.message ?: "")}}\n")
            }
        }
        print(out)
    }

    private fun quote(s: String): String = buildString {
        append('"')
        for (c in s) {
            when {
                c == '"' || c == '\\' -> append('\\').append(c)
                c < ' ' || c > '~' -> append(String.format("\\u%04x", c.toInt()))
                else -> append(c)
            }
        }
        append('"')
    }
}
