"""Run the nomoat Android app's benchmark mode on a phone over adb and read back its rounds.

The measuring happens on the phone, in the app (android_demo, MainActivity's benchmark mode):
this module only starts it with `am start` and reads the JSON lines it logs under the logcat
tag `nomoat-bench`: one per round, with runtime/bench.py RoundResult's keys, then
{"done": true} or {"error": "..."}. The rounds are summarized and printed by the same code as
`nomoat bench` (runtime/bench.py summarize, runtime/cli_bench.py format_table).

runtime/bench_worker's seam ("only the argv that starts a worker knows where it runs") does not
fit here: it needs Python on the device, and the app is Kotlin speaking its own logcat protocol.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adb import AdbError, Device
from .deploy import DeployError, shell

if TYPE_CHECKING:
    from nomoat.runtime.bench import RoundResult

APP_PACKAGE = "dev.nomoat.app"
APP_COMPONENT = f"{APP_PACKAGE}/.MainActivity"
BENCH_TAG = "nomoat-bench"  # MainActivity.BENCH_TAG; the app logs with Log.i
INSTALL_HINT = ("build and install the nomoat Android app first: `cd android_demo && gradle :app:assembleRelease && "
                "adb install -r app/build/outputs/apk/release/app-release.apk` (android_demo/README.md, "
                "\"Building the APK\")")
POLL_S = 0.5
DEFAULT_TIMEOUT_S = 900.0

# `am start` exits 0 even when it fails; its errors are lines starting "Error:" or "Error type N"
# (not "Error" anywhere: an activity may be named .ErrorReportActivity).
_AM_ERROR = re.compile(r"^\s*Error(?::| type\b).*$", re.M)
_AM_MISSING = ("does not exist", "unable to resolve Intent")


@dataclass(frozen=True)
class AppBench:
    """What the app logged: the rounds as RoundResults and the round lines as they came (load_s, threads...)."""

    rounds: list[RoundResult]
    lines: list[dict[str, Any]]


def bench_on_device(device: Device, bundle: str, prompt_tokens: int, new_tokens: int, rounds: int,
                    threads: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                    progress: Callable[[str], None] | None = None, prompt_lookup: int = 0) -> AppBench:
    """Start the app's benchmark on bundle (a path on the device, or a bundle name the app finds)
    and wait for its rounds; a DeployError says what went wrong and what to do. With prompt_lookup
    the app runs each round plain and with prompt lookup (alternating which goes first): twice the lines."""
    say = progress or (lambda _msg: None)
    shell(device, "logcat -c", "clearing the log (`logcat -c`)")  # only this run's lines count
    start_app(device, bench_extras(bundle, prompt_tokens, new_tokens, rounds, threads, prompt_lookup))
    try:
        lines = wait_for_rounds(device, rounds * (2 if prompt_lookup else 1), timeout, say)
    except BaseException:  # timeout or Ctrl-C: do not leave the phone busy benchmarking
        stop_app(device)
        raise
    if prompt_lookup and not any(line.get("prompt_lookup") for line in lines):
        raise DeployError("the app measured no prompt-lookup rounds (an app older than --prompt-lookup); "
                          "install the app built from this version of nomoat.")
    results = [round_result(line, prompt_tokens, new_tokens) for line in lines]
    return AppBench(results, lines)


def bench_extras(bundle: str, prompt_tokens: int, new_tokens: int, rounds: int,
                 threads: int | None, prompt_lookup: int = 0) -> list[str]:
    """The intent extras MainActivity reads; no threads extra means the bundle's own thread count."""
    extras = ["--es", "bundle", bundle, "--ez", "bench", "true", "--ei", "prompt_tokens", str(prompt_tokens),
              "--ei", "new_tokens", str(new_tokens), "--ei", "rounds", str(rounds)]
    extras += ["--ei", "threads", str(threads)] if threads is not None else []
    return extras + (["--ei", "prompt_lookup", str(prompt_lookup)] if prompt_lookup else [])


def start_app(device: Device, extras: list[str]) -> None:
    """am start -S (a chat left open would otherwise get the intent without running the bench) -W."""
    command = shlex.join(["am", "start", "-S", "-W", "-n", APP_COMPONENT, *extras])
    out = shell(device, command, "starting the app (`am start`)")
    errors = [e.strip() for e in _AM_ERROR.findall(out)]
    if any(m in out for m in _AM_MISSING):
        said = errors[-1] if errors else "no such activity"
        raise DeployError(f"the nomoat app is not installed on {device.serial} ({said}); {INSTALL_HINT}.")
    if errors:
        raise DeployError(f"`am start` could not start the nomoat app on {device.serial}: {errors[-1]}")


def wait_for_rounds(device: Device, rounds: int, timeout: float, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Poll the app's log lines until it logs done or an error; the round lines."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        messages = read_bench_log(device)
        round_lines = [m for m in messages if "ttft_s" in m]
        for line in round_lines[seen:]:
            seen += 1
            say(f"  round {seen}/{rounds} on the phone: {_round_note(line)}")
        failed = [m for m in messages if "error" in m]
        if failed:
            raise DeployError(f"the app's benchmark failed on {device.serial}: {failed[0]['error']}")
        if any(m.get("done") is True for m in messages):
            return round_lines
        if time.monotonic() >= deadline:
            raise DeployError(f"the app logged {seen} of {rounds} rounds and no end within {timeout:.0f} s on "
                              f"{device.serial}. It may still be loading, or have crashed (see `adb logcat`); "
                              "give it longer with --bench-timeout, or ask for fewer --rounds/--new-tokens.")
        time.sleep(POLL_S)


def read_bench_log(device: Device) -> list[dict[str, Any]]:
    """The JSON objects the app logged so far under its tag (-v raw: the message alone on each line)."""
    out = shell(device, f"logcat -d -v raw -s {BENCH_TAG}:I", "reading the app's log (`logcat -d`)")
    return parse_bench_lines(out)


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
        device.shell(f"am force-stop {APP_PACKAGE}", timeout=30)
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
