package dev.nomoat.core

/** Prints {"<threads>": bytes/s, ...} for the thread counts given, as `python -m nomoat.runtime.bandwidth`
 * does, so tests/test_android_core.py can set the JVM's probe beside the Python one on the same machine. */
object BandwidthCli {
    @JvmStatic
    fun main(args: Array<String>) {
        val rates = args.map { it.toInt() }.map { "\"$it\": ${Bandwidth.readBytesPerSecond(it)}" }
        println(rates.joinToString(", ", "{", "}"))
    }
}
