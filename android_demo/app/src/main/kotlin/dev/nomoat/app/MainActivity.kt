package dev.nomoat.app

// NEVER BUILT INTO AN APK OR RUN: written without an Android SDK at hand. Only type-checked: kotlinc
// compiles it on the host against hand-written declarations of the Android members it calls
// (android_demo/apicheck, tests/test_android_shell.py), not against the real android.jar. The logic it
// calls (dev.nomoat.core) is compiled and tested on the host JVM; this screen never ran.

import android.app.Activity
import android.content.Intent
import android.os.Bundle as AndroidBundle
import android.os.SystemClock
import android.util.Log
import android.view.WindowManager
import android.view.ViewGroup.LayoutParams.MATCH_PARENT
import android.view.ViewGroup.LayoutParams.WRAP_CONTENT
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import dev.nomoat.core.Bandwidth
import dev.nomoat.core.Bench
import dev.nomoat.core.Bundle
import dev.nomoat.core.ChatFormat
import dev.nomoat.core.Conversation
import dev.nomoat.core.Generator
import dev.nomoat.core.SamplingParams
import dev.nomoat.core.Tokenizer
import dev.nomoat.core.failureText
import org.json.JSONObject
import java.io.File
import java.util.concurrent.Executors

/**
 * A minimal chat screen over one bundle, plus a benchmark mode for `nomoat deploy --adb --bench`:
 *
 *     adb shell am start -S -W -n dev.nomoat.app/.MainActivity --es bundle smollm2 \
 *         --ez bench true --ei prompt_tokens 128 --ei new_tokens 64 --ei rounds 3 [--ei threads 4] \
 *         [--ei prompt_lookup 8] [--es bench_run ID]
 *
 * writes one JSON line per round to logcat with the tag `nomoat-bench` (runtime/bench.py RoundResult's
 * keys, plus load timings and peak RSS), then `{"done": true}` or `{"error": "..."}`, and finishes;
 * with `bench_run`, every line carries that id (Bench.roundLine), so the host tells this run's lines
 * from an earlier run's still in the log.
 * `--ei prompt_lookup N` (chat or bench) drafts up to N tokens a pass from the context for greedy
 * answers (Generator.generateTokens: greedy's tokens, fewer passes when the answer repeats its context).
 * "New chat" (or sending "/reset") starts the conversation over; what a message does is Conversation's.
 *
 * Bundles are looked for in the app's external files dir (`/sdcard/Android/data/dev.nomoat.app/files/<name>`)
 * and in `/data/local/tmp/nomoat/<name>` (where `nomoat deploy --adb` copies them; whether an app may read
 * there depends on the device's SELinux policy -- never checked).
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor() // one request at a time: the Generator is not thread-safe
    private lateinit var status: TextView
    private lateinit var transcript: TextView
    private lateinit var scroll: ScrollView
    private lateinit var input: EditText
    private lateinit var send: Button
    private lateinit var newChat: Button

    private var forward: OrtForward? = null
    private var generator: Generator? = null
    private var conversation: Conversation? = null
    private var maxNewTokens = 256
    private var params = SamplingParams()
    private var promptLookup = 0

    override fun onCreate(savedInstanceState: AndroidBundle?) {
        super.onCreate(savedInstanceState)
        buildScreen()
        val name = intent.getStringExtra("bundle")
        promptLookup = intent.getIntExtra("prompt_lookup", 0).coerceAtLeast(0)
        // Reopened from Recents, a task replays the intent it was started with: a finished bench would run again.
        val fromRecents = intent.flags and Intent.FLAG_ACTIVITY_LAUNCHED_FROM_HISTORY != 0
        if (intent.getBooleanExtra("bench", false) && !fromRecents) {
            // A front app whose screen went off runs in the background CPU group ("top-sleeping": the little
            // cores on a Pixel): a bench longer than the screen timeout would measure those, unsaid.
            window.addFlags(WindowManager.LayoutParams.FLAG_KEEP_SCREEN_ON)
            worker.execute { bench(name) }
        } else {
            worker.execute { load(name) }
        }
    }

    override fun onDestroy() {
        // Close the session after the request in progress (if any) is done with it, on the same thread.
        worker.execute { forward?.close() }
        worker.shutdown()
        super.onDestroy()
    }

    private fun buildScreen() {
        status = TextView(this).apply { text = "Opening the bundle…" }
        transcript = TextView(this).apply { setTextIsSelectable(true) }
        scroll = ScrollView(this).apply { addView(transcript) }
        input = EditText(this).apply { hint = "Message" }
        send = Button(this).apply {
            text = "Send"
            isEnabled = false
            setOnClickListener { onSend() }
        }
        newChat = Button(this).apply {
            text = Conversation.NEW_CHAT
            isEnabled = false
            setOnClickListener { onNewChat() }
        }
        val row = LinearLayout(this).apply {
            orientation = LinearLayout.HORIZONTAL
            addView(input, LinearLayout.LayoutParams(0, WRAP_CONTENT, 1f))
            addView(send, LinearLayout.LayoutParams(WRAP_CONTENT, WRAP_CONTENT))
            addView(newChat, LinearLayout.LayoutParams(WRAP_CONTENT, WRAP_CONTENT))
        }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            setPadding(24, 24, 24, 24)
            addView(status, LinearLayout.LayoutParams(MATCH_PARENT, WRAP_CONTENT))
            addView(scroll, LinearLayout.LayoutParams(MATCH_PARENT, 0, 1f))
            addView(row, LinearLayout.LayoutParams(MATCH_PARENT, WRAP_CONTENT))
        })
    }

    /** The bundle folder: [name] (a path, or a folder name in one of the places bundles go), else the first found. */
    private fun findBundle(name: String?): File {
        if (name != null && name.startsWith("/")) return File(name)
        val roots = listOfNotNull(getExternalFilesDir(null), File("/data/local/tmp/nomoat"))
        val found = roots.flatMap { root ->
            // Dot-folders are a deploy's staging copy or the bundle it moved aside (converter/deploy.py): never
            // the bundle, though they hold a manifest, and ".x" sorts before every name.
            root.listFiles()?.filter { !it.name.startsWith(".") && File(it, "manifest.json").isFile }
                ?.sortedBy { it.name } ?: emptyList()
        }
        val pick = if (name != null) found.firstOrNull { it.name == name } else found.firstOrNull()
        return pick ?: throw IllegalStateException(
            "no bundle${name?.let { " named $it" } ?: ""} in ${roots.joinToString(" or ")}; copy one with " +
                "`nomoat deploy --adb`")
    }

    /** A bundle found, opened and verified (its files' hashes), not loaded yet. */
    private class Verified(val dir: File, val bundle: Bundle, val seconds: Double)

    private fun verify(name: String?): Verified {
        val dir = findBundle(name)
        val t0 = SystemClock.elapsedRealtimeNanos()
        val bundle = Bundle.open(dir, verify = true) // names the first damaged file and says to re-copy
        return Verified(dir, bundle, (SystemClock.elapsedRealtimeNanos() - t0) / 1e9)
    }

    /** Load a verified bundle; the load timings for the bench line. */
    private fun open(verified: Verified, threads: Int?): JSONObject {
        val bundle = verified.bundle
        val t1 = SystemClock.elapsedRealtimeNanos()
        val tokenizer = Tokenizer.fromFile(bundle.tokenizerFile)
        val ort = OrtForward(bundle, threads)
        val t2 = SystemClock.elapsedRealtimeNanos()
        forward = ort
        val gen = Generator.forBundle(bundle.manifest, ort, tokenizer)
        generator = gen
        maxNewTokens = bundle.manifest.defaultMaxNewTokens()
        params = SamplingParams.fromManifest(bundle.manifest)
        conversation = Conversation(gen, ChatFormat.fromManifestOrNull(bundle.manifest))
        return JSONObject().put("bundle", verified.dir.absolutePath).put("verify_s", verified.seconds)
            .put("load_s", (t2 - t1) / 1e9).put("threads", threads ?: bundle.manifest.targetThreads ?: JSONObject.NULL)
    }

    private fun load(name: String?) {
        try {
            val info = open(verify(name), null)
            val note = if (conversation?.chat == null) "\n${ChatFormat.MISSING}: prompts are sent as they are." else ""
            ui {
                status.text = "${File(info.getString("bundle")).name}: ready$note"
                send.isEnabled = true
                newChat.isEnabled = true
            }
        } catch (e: Throwable) { // an OutOfMemoryError or UnsatisfiedLinkError too: said, not a crash
            ui { status.text = failureText(e) }
        }
    }

    private fun onSend() {
        val text = input.text.toString()
        if (text.isBlank()) return
        input.setText("")
        send.isEnabled = false
        transcript.append("\n> $text\n")
        worker.execute {
            try {
                // scrollTo once the appended text is laid out (post): fullScroll read the old bottom, and it moved
                // the focus to the selectable transcript at every token, out of the box the user types the next
                // message in.
                val onDelta = { delta: String ->
                    ui {
                        transcript.append(delta)
                        scroll.post { scroll.scrollTo(0, transcript.bottom) }
                    }
                }
                val talk = conversation ?: throw IllegalStateException("no bundle loaded")
                val turn = talk.send(text, maxNewTokens, params, promptLookup, onDelta)
                turn.note?.let { note -> ui { transcript.append("\n$note\n") } }
                turn.result?.stats?.let { s ->
                    val drafts = if (s.draftedTokens > 0) ", ${s.acceptedTokens}/${s.draftedTokens} drafted tokens accepted" else ""
                    ui {
                        status.text = String.format("%d prompt tokens (%d cached), first token %.0f ms, %.1f tok/s%s",
                            s.promptTokens, s.cachedTokens, s.timeToFirstTokenSeconds * 1000, s.decodeTokensPerSecond, drafts)
                    }
                }
            } catch (e: Throwable) {
                ui { transcript.append("\n[${failureText(e)}]\n") }
            } finally {
                ui { send.isEnabled = true }
            }
        }
    }

    /** A new conversation, once the answer in progress (if any) is done: the worker owns the Chat. */
    private fun onNewChat() {
        worker.execute {
            conversation?.reset()
            ui { transcript.text = "${Conversation.RESET_NOTE}\n" }
        }
    }

    /** Benchmark rounds: fresh cache, the host's prompt ids, greedy, stop tokens ignored (bench.py measure_once). */
    private fun bench(name: String?) {
        val run = intent.getStringExtra(Bench.RUN) // the host's id for this run, echoed in every line
        try {
            val promptTokens = intent.getIntExtra("prompt_tokens", 128)
            val newTokens = intent.getIntExtra("new_tokens", 64)
            val rounds = intent.getIntExtra("rounds", 1)
            val threads = intent.getIntExtra("threads", 0).takeIf { it > 0 }
            val verified = verify(name)
            // For the host's decode-against-ceiling column: this phone's read bandwidth at the app's
            // threads, once, before the rounds. 64 MB is far past a phone's caches (a Pixel 6: 4 MB of
            // L3, 8 MB of system cache) and well within an app's Java heap; without it, no column.
            // Before the model loads: the probe's array would otherwise sit on top of the weights and KV
            // cache in the peak RSS (VmHWM) every round line reports, unlike the host's (its probe runs
            // outside the engines' processes).
            val probeThreads = threads ?: verified.bundle.manifest.targetThreads ?: Runtime.getRuntime().availableProcessors()
            val bandwidth = try {
                Bandwidth.readBytesPerSecond(probeThreads, megabytes = 64)
            } catch (e: OutOfMemoryError) {
                Log.w(BENCH_TAG, "no memory for the bandwidth probe: the table will have no ceiling column")
                null
            }
            val info = open(verified, threads)
            bandwidth?.let { info.put("read_bandwidth_bytes_per_s", it).put("bandwidth_threads", probeThreads) }
            val gen = generator ?: throw IllegalStateException("no bundle loaded")
            val prompt = Bench.promptIds(gen.codec, promptTokens)
            // With prompt lookup each round runs plain and with lookup, alternating as on the host.
            val lookups = if (promptLookup > 0) listOf(0, promptLookup) else listOf(0)
            for (round in 0 until rounds) {
                for (lookup in Bench.roundOrder(lookups, round)) {
                    gen.reset()
                    val result = gen.generate(prompt, newTokens, SamplingParams(), ignoreEos = true, promptLookup = lookup)
                    Log.i(BENCH_TAG, Bench.roundLine(run, result.stats, round, peakRssBytes(), lookup, info))
                }
            }
            Log.i(BENCH_TAG, Bench.doneLine(run))
        } catch (e: Throwable) { // an Error too: the host reads this line at once instead of waiting out its timeout
            Log.i(BENCH_TAG, Bench.errorLine(run, failureText(e)))
        }
        ui { finishAndRemoveTask() } // not left in Recents, whose relaunch would replay the bench's intent
    }

    /** VmHWM from /proc/self/status: the process's peak resident memory. */
    private fun peakRssBytes(): Any = try {
        File("/proc/self/status").readLines().firstOrNull { it.startsWith("VmHWM:") }
            ?.split(Regex("\\s+"))?.getOrNull(1)?.toLong()?.times(1024) ?: JSONObject.NULL
    } catch (e: Exception) {
        JSONObject.NULL
    }

    private fun ui(block: () -> Unit) = runOnUiThread(block)

    private companion object {
        const val BENCH_TAG = "nomoat-bench"
    }
}
