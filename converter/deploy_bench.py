"""Run the nomoat Android app's benchmark mode on a phone over adb and read back its rounds.

The measuring happens on the phone, in the app (android_demo, MainActivity's benchmark mode):
this module only starts it with `am start` and reads the JSON lines it logs under the logcat
tag `nomoat-bench`: one per round, with runtime/bench.py RoundResult's keys, then
{"done": true} or {"error": "..."}, each with the id this run passed the app (bench_run): the
log is never cleared, so it may still hold an earlier run's lines, and only this run's are read.
The rounds are summarized and printed by the same code as `nomoat bench` (runtime/bench.py
summarize, runtime/cli_bench.py format_table).

runtime/bench_worker's seam ("only the argv that starts a worker knows where it runs") does not
fit here: it needs Python on the device, and the app is Kotlin speaking its own logcat protocol.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import deploy
from .adb import AdbError, Device
from .deploy import DeployError, shell
from .transport import Reply

if TYPE_CHECKING:
    from nomoat.runtime.bench import RoundResult

APP_PACKAGE = "dev.nomoat.app"
APP_COMPONENT = f"{APP_PACKAGE}/.MainActivity"
BENCH_TAG = "nomoat-bench"  # MainActivity.BENCH_TAG; the app logs with Log.i
RUN_KEY = "bench_run"  # Bench.RUN: the extra that passes the app this run's id, and the key its lines repeat it under
INSTALL_HINT = ("build and install the nomoat Android app first: `cd android_demo && gradle :app:assembleRelease && "
                "adb install -r app/build/outputs/apk/release/app-release.apk` (android_demo/README.md, "
                "\"Building the APK\")")
POLL_S = 0.5
DEFAULT_TIMEOUT_S = 900.0
# Each step on the phone (am start, each read of the log) gets what is left of --bench-timeout, so a phone that
# stops answering is given up on near it, not a step's whole minute (deploy.STEP_S) later; but at least this
# long, so that a read begun just before the end is not cut short and blamed on the phone (it takes well under
# a second). Module values, read at each step, so a test can shrink them.
STEP_MIN_S = 5.0
# am force-stop after a timeout, an error or Ctrl-C: a moment's work on a phone that answers, and one that
# stopped answering must not hold the user long past the error that is already known.
STOP_S = 10.0
DROPPED_LINES_FIX = ("logcat may have dropped lines (its buffer is the whole phone's, and small): enlarge it with "
                     "`adb logcat -G 16M` and deploy again with --bench")

# `am start` exits 0 even when it fails; its errors are lines starting "Error:" or "Error type N"
# (not "Error" anywhere: an activity may be named .ErrorReportActivity).
_AM_ERROR = re.compile(r"^\s*Error(?::| type\b).*$", re.M)
_AM_MISSING = ("does not exist", "unable to resolve Intent")


@dataclass(frozen=True)
class AppBench:
    """What the app logged: the rounds as RoundResults and the round lines as they came (load_s, threads...)."""

    rounds: list[RoundResult]
    lines: list[dict[str, Any]]


@dataclass(frozen=True)
class BenchRun:
    """One start of the app's benchmark: on which phone, on which deployed bundle, the id its lines carry
    (RUN_KEY) and when --bench-timeout runs out (time.monotonic)."""

    device: Device
    bundle: str
    run_id: str
    deadline: float

    def step(self, command: str, what: str) -> str:
        """deploy.shell for a step of the bench: given at most the time left (STEP_MIN_S at least), and, if the
        phone stops answering, an error that says the new bundle is in place already."""
        return shell(self.device, command, what, timeout=self._left(), outcome=self.outcome,
                     retry="deploy again with --bench to measure it")

    def reply(self, command: str, what: str) -> Reply:
        """As step, with the command's reply whatever its exit status."""
        return deploy.run_step(self.device, command, what, timeout=self._left(), outcome=self.outcome,
                               retry="deploy again with --bench to measure it")

    @property
    def outcome(self) -> str:
        return f"the new bundle is in place at {self.bundle}"

    def _left(self) -> float:
        return min(deploy.STEP_S, max(self.deadline - time.monotonic(), STEP_MIN_S))


def bench_on_device(device: Device, bundle: str, prompt_tokens: int, new_tokens: int, rounds: int,
                    threads: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                    progress: Callable[[str], None] | None = None, prompt_lookup: int = 0) -> AppBench:
    """Start the app's benchmark on bundle (a path on the device, or a bundle name the app finds)
    and wait for its rounds; a DeployError says what went wrong and what to do. With prompt_lookup
    the app runs each round plain and with prompt lookup (alternating which goes first): twice the lines."""
    say = progress or (lambda _msg: None)
    # No `logcat -c` first: the run id tells this run's lines from an earlier run's, and clearing fails on a
    # phone whose log another reader streams (Android Studio's Logcat) and would wipe the user's log besides.
    run = BenchRun(device, bundle, secrets.token_hex(8), time.monotonic() + timeout)
    check_screen_on(run)
    try:
        start_app(run, bench_extras(bundle, prompt_tokens, new_tokens, rounds, threads, prompt_lookup, run.run_id))
        lines = wait_for_rounds(run, rounds * (2 if prompt_lookup else 1), timeout, say)
    except BaseException:  # timeout or Ctrl-C: do not leave the phone busy benchmarking
        stop_app(device)
        raise
    check_round_counts(lines, rounds, prompt_lookup, device.serial)
    results = [round_result(line, prompt_tokens, new_tokens) for line in lines]
    return AppBench(results, lines)


def bench_extras(bundle: str, prompt_tokens: int, new_tokens: int, rounds: int,
                 threads: int | None, prompt_lookup: int = 0, run_id: str | None = None) -> list[str]:
    """The intent extras MainActivity reads; no threads extra means the bundle's own thread count."""
    extras = ["--es", "bundle", bundle, "--ez", "bench", "true", "--ei", "prompt_tokens", str(prompt_tokens),
              "--ei", "new_tokens", str(new_tokens), "--ei", "rounds", str(rounds)]
    extras += ["--ei", "threads", str(threads)] if threads is not None else []
    extras += ["--ei", "prompt_lookup", str(prompt_lookup)] if prompt_lookup else []
    return extras + (["--es", RUN_KEY, run_id] if run_id is not None else [])


def check_screen_on(run: BenchRun) -> None:
    """Refuse to bench a phone whose screen is off: Android puts the front app of a sleeping phone in the
    background CPU group ("top-sleeping": the little cores on a Pixel), so its numbers would be those of the
    slow cores, unsaid. (The app keeps the screen on once it runs.) A phone that does not say is benched."""
    said = re.search(r"^\s*mWakefulness=(\w+)", run.reply("dumpsys power", "asking whether the screen is on "
                                                         "(`dumpsys power`)").out, re.M)
    if said and said.group(1) != "Awake":
        serial = run.device.serial
        raise DeployError(f"the screen of {serial} is off (mWakefulness={said.group(1)}): a sleeping phone runs its "
                          "front app on its slow cores, and the bench would measure those. Wake and unlock it "
                          f"(`adb -s {serial} shell input keyevent KEYCODE_WAKEUP`, then unlock), then deploy again "
                          f"with --bench; {run.outcome}.")


def app_gone(run: BenchRun) -> bool:
    """Whether the app's process is gone (pidof finds none). False when pidof cannot say (a phone without it)."""
    reply = run.reply(f"pidof {APP_PACKAGE}", "looking for the app's process (`pidof`)")
    return reply.status == 1 and not reply.out.strip()


def start_app(run: BenchRun, extras: list[str]) -> None:
    """am start -S (a chat left open would otherwise get the intent without running the bench) -W."""
    command = shlex.join(["am", "start", "-S", "-W", "-n", APP_COMPONENT, *extras])
    out = run.step(command, "starting the app (`am start`)")
    errors = [e.strip() for e in _AM_ERROR.findall(out)]
    serial = run.device.serial
    if any(m in out for m in _AM_MISSING):
        said = errors[-1] if errors else "no such activity"
        raise DeployError(f"the nomoat app is not installed on {serial} ({said}); {INSTALL_HINT}.")
    if errors:
        raise DeployError(f"`am start` could not start the nomoat app on {serial}: {errors[-1]}")


def wait_for_rounds(run: BenchRun, expected: int, timeout: float, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Poll the app's log until this run's lines end with done or an error; this run's round lines, each once."""
    # Keyed by the whole line, not by its place in the log: a line read again counts once, and one gone from the
    # log since it was read (logcat's buffer turns over) still counts.
    rounds: dict[str, dict[str, Any]] = {}
    earlier_ends = None  # done and error lines without a run id at the first read: earlier runs'
    while True:
        # Before the read: the app logs its end before it finishes, and Android keeps a finished app's process, so
        # a process gone before a read that holds no end is an app that died (a native crash, the low-memory
        # killer), which logs nothing more: said now, not after the rest of --bench-timeout.
        gone = app_gone(run)
        messages = read_bench_log(run)
        mine = [m for m in messages if m.get(RUN_KEY) == run.run_id]
        for line in (m for m in mine if "ttft_s" in m):
            key = json.dumps(line, sort_keys=True)
            if key not in rounds:
                rounds[key] = line
                say(f"  round {len(rounds)}/{expected} on the phone: {_round_note(line)}")
        if has_ended(mine, run.device.serial):
            return list(rounds.values())
        earlier_ends = check_no_untagged_end(messages, earlier_ends, run.device.serial)
        if gone:
            serial = run.device.serial
            raise DeployError(f"the app died on {serial} after {len(rounds)} of {expected} rounds, without a word "
                              f"in its log (a crash in ONNX Runtime, or the low-memory killer: see `adb -s {serial} "
                              "logcat -b crash -d`); a smaller --new-tokens or --prompt-tokens needs less memory.")
        if time.monotonic() >= run.deadline:
            raise DeployError(f"the app logged {len(rounds)} of {expected} rounds and no end within {timeout:.0f} s "
                              f"on {run.device.serial}. It may still be loading, or have crashed (see `adb logcat`); "
                              "give it longer with --bench-timeout, or ask for fewer --rounds/--new-tokens.")
        time.sleep(POLL_S)


def has_ended(mine: list[dict[str, Any]], serial: str) -> bool:
    """Whether this run's lines hold its done; a DeployError with the app's own error if they hold one."""
    failed = [m for m in mine if "error" in m]
    if failed:
        raise DeployError(f"the app's benchmark failed on {serial}: {failed[0]['error']}")
    return any(m.get("done") is True for m in mine)


def check_no_untagged_end(messages: list[dict[str, Any]], earlier: int | None, serial: str) -> int:
    """An app older than run ids tags none of its lines: a done or error line without a run id that was not
    in the log at the first read (earlier: their count then, None at the first read) is this run's end,
    which would otherwise be waited for until the timeout. Their count now."""
    ends = sum(1 for m in messages if RUN_KEY not in m and (m.get("done") is True or "error" in m))
    if earlier is not None and ends > earlier:
        raise DeployError(f"the app on {serial} ended its benchmark without this run's id in its lines (an app "
                          "older than run ids); install the app built from this version of nomoat.")
    return ends


def check_round_counts(lines: list[dict[str, Any]], rounds: int, prompt_lookup: int, serial: str) -> None:
    """Every round asked for, plain and (with prompt_lookup) with lookup, before the app said done."""
    counts = Counter(bool(line.get("prompt_lookup")) for line in lines)
    if prompt_lookup and counts[False] and not counts[True]:
        raise DeployError("the app measured no prompt-lookup rounds (an app older than --prompt-lookup); "
                          "install the app built from this version of nomoat.")
    kinds = [(" plain", counts[False]), (" prompt-lookup", counts[True])] if prompt_lookup else [("", counts[False])]
    short = [f"{n} of {rounds}{kind} rounds" for kind, n in kinds if n < rounds]
    if short:
        raise DeployError(f"the app on {serial} said done after only {' and '.join(short)} in its log; "
                          f"{DROPPED_LINES_FIX}.")


def read_bench_log(run: BenchRun) -> list[dict[str, Any]]:
    """The JSON objects the app logged so far under its tag (-v raw: the message alone on each line)."""
    return parse_bench_lines(run.step(f"logcat -d -v raw -s {BENCH_TAG}:I", "reading the app's log (`logcat -d`)"))


def parse_bench_lines(text: str) -> list[dict[str, Any]]:
    """Each line's JSON object, from its first '{' (so a logcat prefix or a "--------- beginning of main"
    header does no harm); lines without one are skipped."""
    decoder = json.JSONDecoder()
    found = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            value, _ = decoder.raw_decode(line, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def round_result(line: dict[str, Any], prompt_tokens: int, new_tokens: int) -> RoundResult:
    """A round line as runtime/bench.py's RoundResult, checked against the request like measure_once does."""
    from nomoat.runtime.bench import RoundResult

    try:
        result = RoundResult.from_dict(line)
    except (KeyError, TypeError, ValueError) as e:
        raise DeployError(f"the app logged a round nomoat cannot read ({e!r} in {json.dumps(line)}); install "
                          "the app built from this version of nomoat.") from e
    if (result.prompt_tokens, result.new_tokens) != (prompt_tokens, new_tokens):
        raise DeployError(f"the app measured {result.prompt_tokens}+{result.new_tokens} tokens instead of "
                          f"{prompt_tokens}+{new_tokens}; install the app built from this version of nomoat.")
    return result


def stop_app(device: Device) -> None:
    """Best effort: the error that got us here matters more than one from stopping the app."""
    try:
        device.shell(f"am force-stop {APP_PACKAGE}", timeout=STOP_S)
    except AdbError:
        pass


def check_bench_request(bundle: Path, prompt_tokens: int, new_tokens: int, rounds: int,
                        threads: int | None) -> None:
    """Refuse before deploying what the app could not run: the counts, and the bundle's context."""
    from nomoat.runtime.bench import BenchError
    from nomoat.runtime.cli_bench import check_counts  # the same limits as `nomoat bench`
    from nomoat.runtime.errors import BundleError
    from nomoat.runtime.manifest import read_manifest

    try:
        check_counts([threads], [prompt_tokens], [new_tokens], rounds, 0)
        max_context = read_manifest(bundle, verify_files=False).max_context
    except (BenchError, BundleError) as e:
        raise DeployError(str(e)) from e
    if prompt_tokens + new_tokens > max_context:
        raise DeployError(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the bundle's context "
                          f"of {max_context} tokens; measure shorter runs or convert with a larger --max-context.")


def device_machine(device: Device) -> dict[str, Any]:
    """Where the app measured, in runtime/bench.py machine_info's keys that the table shows."""
    out = device.shell('echo "model=$(getprop ro.product.model)"; echo "soc=$(getprop ro.soc.model)"; '
                       'echo "cpus=$(nproc)"', timeout=30).out
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    cpus = values.get("cpus", "").strip()
    model, soc = values.get("model", "").strip(), values.get("soc", "").strip()
    return {"system": "Android", "model": model or None, "cpu": soc or model or device.serial,
            "cpus": int(cpus) if cpus.isdigit() else None}


def bench_report(device_path: str, machine: dict[str, Any], bench: AppBench, rounds: int,
                 threads: int | None, prompt_tokens: int, new_tokens: int,
                 weight_bytes_per_token: int | None = None) -> dict[str, Any]:
    """The report `nomoat bench` prints (cli_bench.format_table reads it; --json prints it): one
    result, or two (plain decoding, then prompt lookup) when the app's lines carry prompt_lookup.
    With the bundle's bytes a token and the phone's read bandwidth (which the app measures before
    its rounds), decode is set against the phone's ceiling, as `nomoat bench` does."""
    from nomoat.runtime.bench import process_peak_rss_mb, report_summary

    first = bench.lines[0] if bench.lines else {}
    app_threads = first.get("threads") if first.get("threads") is not None else threads  # the bundle's, if asked none
    bandwidth, probe_threads = first.get("read_bandwidth_bytes_per_s"), first.get("bandwidth_threads")
    ceiling = bool(bandwidth and probe_threads and weight_bytes_per_token)
    kinds = [int(line.get("prompt_lookup") or 0) for line in bench.lines]  # 0: a plain round
    results = []
    for lookup in sorted(set(kinds)) or [0]:
        rounds_of = [r for r, kind in zip(bench.rounds, kinds, strict=True) if kind == lookup]
        results.append({
            "label": f"{app_threads or 'default'} thr, {prompt_tokens}+{new_tokens} tok"
                     + (f", lookup {lookup}" if lookup else ""),
            "name": f"nomoat Android app ({APP_PACKAGE})",
            "threads": app_threads,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "prompt_lookup": lookup,
            "verify_s": first.get("verify_s"),
            "load_s": first.get("load_s"),
            **({"weight_bytes_per_token": weight_bytes_per_token, "threads_used": probe_threads} if ceiling else {}),
            "summary": report_summary(rounds_of),
            "peak_rss_mb": process_peak_rss_mb(rounds_of),  # the app's process ran every round
            "rounds": [r.to_dict() for r in rounds_of],
        })
    return {
        "bundle": device_path,
        "machine": machine,
        "rounds": rounds,
        "warmup": 0,  # the app measures every round it runs
        **({"read_bandwidth_bytes_per_s": {str(probe_threads): bandwidth}} if ceiling else {}),
        "results": results,
    }


def _round_note(line: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        value = line.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "?"

    return (f"prefill {num('prefill_tps', '.1f')} tok/s, decode {num('decode_tps', '.1f')} tok/s, "
            f"TTFT {num('ttft_ms', '.0f')} ms")
