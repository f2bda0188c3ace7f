"""Measure bundles: prefill and decode tokens/s, time to first token and peak RSS.

Each configuration (bundle x threads x prompt length x generation length x ONNX Runtime options)
runs in its own worker process, so its peak RSS is its own; rounds alternate between
configurations so machine drift spreads evenly: several bundles on one command line are an A/B of
their recipes, several --ort-options an A/B of ONNX Runtime's kernels (e.g. KleidiAI on and off).
Generation always runs the full --new-tokens (end-of-sequence is ignored) and the KV cache is
emptied before every round. The prompt is fixed prose cut to exactly --prompt-tokens tokens.
Reported: median and min–max over the rounds, and decode against the memory-bandwidth ceiling:
this machine's read bandwidth (measured before the rounds, at each thread count) over the bytes
of weights a token reads (counted into the bundle by the converter).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bench import (
    BenchError,
    RoundResult,
    Stat,
    contended,
    contention_warning,
    median_cores_busy,
    plural,
    process_peak_rss_mb,
    report_summary,
    summarize,
    synthetic_prompt_ids,
    usable_cores,
)
from .bench_plot import chart_path
from .bench_worker import Job, WorkerProcess, local_worker_argv, run_alternating
from .cli_generate import ort_options, prompt_lookup
from .errors import BundleError
from .onnx_session import format_ort_options

NOMOAT_ENGINE = "nomoat.runtime.bench:NomoatEngine"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: these defaults depend on other flags or the bundle, so `(default: None)` would mislead.
    unset = argparse.SUPPRESS
    p.add_argument("bundle", type=Path, nargs="+", metavar="BUNDLE",
                   help="bundle folder written by `nomoat convert`; give several to compare them in "
                        "alternating rounds (each configuration of each bundle is one loaded worker)")
    p.add_argument("--threads", type=int, action="append", metavar="N", default=unset,
                   help="CPU threads; repeat to compare: --threads 1 --threads 2 (default: the bundle's)")
    p.add_argument("--prompt-tokens", type=int, action="append", metavar="N", default=unset,
                   help="prompt length in tokens; repeatable (default: 128)")
    p.add_argument("--new-tokens", type=int, action="append", metavar="N", default=unset,
                   help="tokens generated per round, at least 2; repeatable (default: 128)")
    p.add_argument("--prompt-lookup", type=prompt_lookup, default=0, metavar="N",
                   help="also measure prompt-lookup speculative decoding with up to N drafted tokens per "
                        "pass, reported in rows of its own next to plain decoding (default: off)")
    p.add_argument("--ort-options", type=ort_options, action="append", metavar="KEY=VALUE[,...]", default=unset,
                   help="ONNX Runtime session config entries for the workers; repeat to compare, 'none' for "
                        "ONNX Runtime's defaults: --ort-options none --ort-options mlas.disable_kleidiai=1 "
                        "(default: none)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per configuration")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per configuration first")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip measuring the memory bandwidth (a 256 MB buffer read for a few seconds) and the "
                        "decode-against-ceiling column")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", type=Path, metavar="PNG", default=unset,
                   help="also draw a chart to this file, in the format its suffix names (.png if none; needs "
                        "matplotlib)")


def run(args: argparse.Namespace) -> int:
    try:
        plot = chart_path(args.plot) if getattr(args, "plot", None) else None  # before measuring, not after
        report = bench_bundles(args)
    except (BenchError, BundleError) as e:
        print(f"nomoat bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: measure_configs has closed the workers on the way out; the rounds so far are dropped
        # (a partial table would compare configurations measured unequally often).
        print("\n[interrupted]", file=sys.stderr)
        return 128 + signal.SIGINT
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if plot is not None:
        from .bench_plot import plot_summaries

        entries = [(r["label"], summarize([RoundResult.from_dict(x) for x in r["rounds"]]))
                   for r in report["results"]]
        machine = report["machine"]
        bandwidth = report.get("read_bandwidth_bytes_per_s") or {}
        try:
            out = plot_summaries(entries, plot, f"nomoat bench {' '.join(report['bundles'])} — "
                                 f"{machine['cpu']}, {plural(report['rounds'], 'round')} (median, min–max)",
                                 ceilings=[decode_ceiling(r, bandwidth) for r in report["results"]])
        except BenchError as e:  # the table is out; the chart's failure is one line, not a traceback
            print(f"nomoat bench: error: {e}", file=sys.stderr)
            return 1
        print(f"chart written to {out}", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class Config:
    """One measured configuration of a bundle."""

    threads: int | None
    prompt_tokens: int
    new_tokens: int
    prompt_lookup: int = 0  # drafted tokens per pass; 0 = plain decoding
    bundle: str = ""  # the bundle as the user named it, when several are compared ("" = the only one)
    ort_options: tuple[tuple[str, str], ...] = ()  # ONNX Runtime session config entries, sorted

    @property
    def label(self) -> str:
        lookup = f", lookup {self.prompt_lookup}" if self.prompt_lookup else ""
        which = f"{self.bundle}: " if self.bundle else ""
        ort = f", {format_ort_options(self.ort_options)}" if self.ort_options else ""
        return f"{which}{self.threads or 'default'} thr, {self.prompt_tokens}+{self.new_tokens} tok{lookup}{ort}"


def bench_bundles(args: argparse.Namespace) -> dict[str, Any]:
    """Check the request against each bundle, then measure each configuration in a worker."""
    from .manifest import read_manifest

    bundles: list[Path] = args.bundle
    if len({b.resolve() for b in bundles}) < len(bundles):
        raise BenchError("the same bundle is named twice; to repeat a measurement, raise --rounds")
    threads: list[int | None] = getattr(args, "threads", [None])
    prompts: list[int] = getattr(args, "prompt_tokens", [128])
    news: list[int] = getattr(args, "new_tokens", [128])
    lookup: int = getattr(args, "prompt_lookup", 0)
    # Sorted, so the same entries in another order are the same configuration.
    ort_choices = [tuple(sorted(d.items())) for d in getattr(args, "ort_options", [{}])]
    check_counts(threads, prompts, news, args.rounds, args.warmup)
    if len(set(ort_choices)) < len(ort_choices):
        raise BenchError("the same --ort-options are given twice; to repeat a measurement, raise --rounds")
    # One name per bundle, as the user typed it; rows only carry it when there is a choice.
    listed = [str(b) for b in bundles]
    names = listed if len(listed) > 1 else [""]
    prompt_ids: dict[tuple[str, int], list[int]] = {}
    folders: dict[str, str] = {}
    for bundle, name in zip(bundles, names, strict=True):
        manifest = read_manifest(bundle, verify_files=False)  # the worker checks the files when it loads
        if max(prompts) + max(news) > manifest.max_context:
            raise BenchError(f"--prompt-tokens {max(prompts)} + --new-tokens {max(news)} exceed the bundle's "
                             f"context of {manifest.max_context} tokens ({bundle}); measure shorter runs or "
                             "convert with a larger --max-context")
        # Each bundle's prompt comes from its own tokenizer: the same prose, cut to the same length.
        tokenizer_file = bundle / manifest.tokenizer.tokenizer_file
        prompt_ids.update({(name, n): synthetic_prompt_ids(tokenizer_file, n) for n in prompts})
        folders[name] = str(bundle.resolve())

    def start_worker(config: Config) -> WorkerProcess:
        options = {"bundle": folders[config.bundle], "threads": config.threads,
                   "prompt_lookup": config.prompt_lookup, "ort_options": dict(config.ort_options)}
        return WorkerProcess(config.label, local_worker_argv(NOMOAT_ENGINE, options))

    # Prompt lookup is measured next to plain decoding, never instead of it: its speed depends on
    # how much the text repeats, so it is reported in rows of its own. Bundles vary fastest, so
    # the rows of one configuration stand together.
    lookups = [0, lookup] if lookup else [0]
    configs = [Config(*c) for c in itertools.product(threads, prompts, news, lookups, names, ort_choices)]
    probe = None if getattr(args, "no_ceiling", False) else local_bandwidth
    report = measure_configs(configs, lambda c: prompt_ids[c.bundle, c.prompt_tokens], start_worker,
                             args.rounds, args.warmup, probe=probe)
    # "bundle" stays for one bundle, as `nomoat deploy --bench` reports it too.
    return {**({"bundle": listed[0]} if len(listed) == 1 else {}), "bundles": listed, **report}


def local_bandwidth(threads: Sequence[int]) -> dict[int, float]:
    """Read bandwidth of this machine at each thread count, bytes/s; {} with a warning when the
    probe's buffer does not fit (a board with little memory): the rounds matter more."""
    from .bandwidth import DEFAULT_MEGABYTES, read_bandwidth

    try:
        return {t: read_bandwidth(t) for t in threads}
    except MemoryError:
        print(f"warning: no memory for the bandwidth probe's {DEFAULT_MEGABYTES} MB buffer; the table has no "
              "ceiling column (--no-ceiling skips the probe)", file=sys.stderr)
        return {}


def measure_configs(configs: Sequence[Config], prompt_for: Callable[[Config], list[int]],
                    make_worker: Callable[[Config], WorkerProcess], rounds: int, warmup: int,
                    pause_s: float = 0.25,
                    probe: Callable[[Sequence[int]], dict[int, float]] | None = None) -> dict[str, Any]:
    """Start one worker per configuration, alternate rounds between them; return the report.
    With a probe, the read bandwidth where the workers run is measured after they have loaded
    (at the thread counts of those that know their bytes a token) and before the first round."""
    jobs: list[Job] = []
    bandwidth: dict[int, float] = {}
    try:
        for config in configs:
            worker = make_worker(config)
            jobs.append(Job(worker, prompt_for(config), config.new_tokens))
            print(f"loading {worker.label} ...", file=sys.stderr)
            worker.start()
        for warning in thread_warnings(jobs, configs):
            print(warning, file=sys.stderr)
        threads = sorted({job.worker.ready["threads_used"] for job in jobs
                          if job.worker.ready.get("weight_bytes_per_token") and job.worker.ready.get("threads_used")})
        if probe and threads:
            print(f"measuring read bandwidth at {', '.join(map(str, threads))} thread(s) ...", file=sys.stderr)
            bandwidth = probe(threads)
        run_alternating(jobs, rounds, warmup, pause_s, on_round=_print_progress)
    finally:
        for job in jobs:
            job.worker.close()
    results = [_job_report(job, config) for job, config in zip(jobs, configs, strict=True)]
    for r in results:
        if r["contended"]:
            print(contention_warning(r["label"], r["cores_busy"], r["cores"]), file=sys.stderr)
    return {
        "machine": jobs[0].worker.ready.get("machine", {}),
        "rounds": rounds,
        "warmup": warmup,
        **({"read_bandwidth_bytes_per_s": {str(t): bw for t, bw in bandwidth.items()}} if bandwidth else {}),
        "results": results,
    }


def thread_warnings(jobs: Sequence[Job], configs: Sequence[Config]) -> list[str]:
    """What the loaded workers' thread counts put in doubt, said before the rounds: more threads than the
    machine has CPUs (a bundle made for a bigger device asks for its own count), and bundles in one A/B that
    each run their own count, so that their rows differ in threads as well as in recipe."""
    loaded = [(config, job.worker.ready) for job, config in zip(jobs, configs, strict=True)
              if job.worker.ready.get("threads_used") is not None]
    warnings = [w for config, ready in loaded if (w := more_threads_than_cpus(config, ready))]
    warnings += bundles_with_own_thread_counts(loaded)
    return list(dict.fromkeys(warnings))  # once per bundle, not once per row of it


def more_threads_than_cpus(config: Config, ready: dict[str, Any]) -> str | None:
    used, cpus = ready["threads_used"], ready.get("machine", {}).get("cpus")
    if not cpus or used <= cpus:
        return None
    who = config.bundle or "the bundle"
    whose = "as --threads asks" if config.threads else "its own count, from the target it was converted for"
    return (f"warning: {who} runs {plural(used, 'thread')} ({whose}) on {plural(cpus, 'CPU')}: they take turns "
            f"on the cores and every number comes out low; give --threads {cpus}")


def bundles_with_own_thread_counts(loaded: Sequence[tuple[Config, dict[str, Any]]]) -> list[str]:
    """A warning for each configuration that bundles without --threads run at different counts."""
    resolved: dict[Config, dict[str, int]] = {}  # the configuration but its bundle -> each bundle's count
    for config, ready in loaded:
        if config.threads is None:
            resolved.setdefault(dataclasses.replace(config, bundle=""), {})[config.bundle] = ready["threads_used"]
    return [f"warning: the bundles run thread counts of their own ({', '.join(f'{b}: {n}' for b, n in each.items())}),"
            " so their rows differ in threads as well as in recipe; give --threads N to compare the recipes alone"
            for each in resolved.values() if len(set(each.values())) > 1]


def check_counts(threads: Sequence[int | None], prompts: Sequence[int], news: Sequence[int],
                  rounds: int, warmup: int) -> None:
    if any(t is not None and t < 1 for t in threads):
        raise BenchError("--threads must be >= 1")
    if min(prompts) < 1:
        raise BenchError("--prompt-tokens must be >= 1")
    if min(news) < 2:
        raise BenchError("--new-tokens must be >= 2: decode speed is timed from the first token to the last")
    if rounds < 1 or warmup < 0:
        raise BenchError("--rounds must be >= 1 and --warmup >= 0")
    for flag, values in (("--threads", threads), ("--prompt-tokens", prompts), ("--new-tokens", news)):
        refuse_repeats(flag, values)


def refuse_repeats(flag: str, values: Sequence[int | None]) -> None:
    """A value given twice would measure the same configuration twice, as rows that look like an A/B."""
    repeated = next((v for v in values if values.count(v) > 1), None)
    if repeated is not None:
        raise BenchError(f"{flag} {repeated} is given twice; to repeat a measurement, raise --rounds")


def _print_progress(job: Job, index: int, result: RoundResult) -> None:
    print(f"  {job.worker.label}: round {index + 1}: prefill {result.prefill_tps:.1f} tok/s, "
          f"decode {result.decode_tps:.1f} tok/s, TTFT {result.ttft_ms:.0f} ms, "
          f"{result.cpu_utilization:.2f} cores busy", file=sys.stderr)


def _job_report(job: Job, config: Config) -> dict[str, Any]:
    ready = job.worker.ready
    cores_busy = median_cores_busy(job.rounds)
    cores = usable_cores(ready.get("threads_used") or config.threads, ready.get("machine", {}).get("cpus"))
    return {
        "label": job.worker.label,
        **({"bundle": config.bundle} if config.bundle else {}),
        "name": ready.get("name"),
        "threads": config.threads,
        "prompt_tokens": config.prompt_tokens,
        "new_tokens": config.new_tokens,
        "prompt_lookup": config.prompt_lookup,
        **({"ort_options": dict(config.ort_options)} if config.ort_options else {}),
        "model_bytes": ready.get("model_bytes"),
        "weight_bytes_per_token": ready.get("weight_bytes_per_token"),
        "threads_used": ready.get("threads_used"),
        "load_s": ready.get("load_s"),
        # The versions the worker found installed (onnxruntime, nomoat): the next release of either may move
        # the numbers, and a board's need not be this machine's.
        "libraries": ready.get("libraries") or {},
        "rss_before_load_mb": job.worker.rss_before_load_mb,
        "peak_rss_mb": process_peak_rss_mb(job.rounds),
        # Cores the rounds kept busy (median) of those the threads can use; contended: well under, so the
        # numbers are low. (More threads than CPUs are warned about before the rounds.)
        "cores_busy": cores_busy,
        "cores": cores,
        "contended": contended(cores_busy, cores),
        "summary": report_summary(job.rounds),
        "rounds": [r.to_dict() for r in job.rounds],
    }


# -- the table -----------------------------------------------------------------------------

COLUMNS = (  # header, summary metric, decimals; then "peak RSS MB" (format_peak_rss)
    ("prefill tok/s", "prefill_tps", 1),
    ("decode tok/s", "decode_tps", 1),
    ("TTFT ms", "ttft_ms", 0),
)


def format_stat(stat: Stat | dict | None, decimals: int) -> str:
    """'median (min–max)'."""
    if stat is None:
        return "n/a"
    s = stat if isinstance(stat, Stat) else Stat(**stat)
    return f"{s.median:.{decimals}f} ({s.min:.{decimals}f}–{s.max:.{decimals}f})"


def format_peak_rss(result: dict[str, Any]) -> str:
    """The process's peak RSS since it started, the load included: the largest reading over its rounds
    (each reads the peak so far; bench.process_peak_rss_mb; the
    Android app's report carries it too, converter/deploy_bench.py). A report of an older nomoat with
    only the rounds' readings shows them as median (min–max): its peak is the max."""
    if result.get("peak_rss_mb") is not None:
        return f"{result['peak_rss_mb']:.0f}"
    return format_stat(result["summary"]["peak_rss_mb"], 0)


def format_threads(result: dict[str, Any]) -> str:
    """The threads asked for, or 'default (4)': the bundle's own count as the worker resolved it, which two
    bundles in one A/B need not share."""
    if result["threads"]:
        return str(result["threads"])
    used = result.get("threads_used")
    return "default" if used is None else f"default ({used})"


def format_rss_before_load(result: dict[str, Any]) -> str:
    before = result.get("rss_before_load_mb")
    return "-" if before is None else f"{before:.0f}"


def format_drafts(result: dict[str, Any]) -> str:
    """'kept/drafted' tokens a round (the mean over rounds) of a prompt-lookup row; '-' elsewhere.

    Greedy decoding drafts the same way every round, so this is usually each round's own count;
    with the cost of a draft on the device it says whether drafting pays there."""
    return drafts_kept(result.get("rounds", [])) if result.get("prompt_lookup") else "-"


def drafts_kept(rounds: list[dict[str, Any]]) -> str:
    """'kept/drafted' tokens a round, the mean over the rounds that counted them; '-' if none did
    (plain decoding, or a peer whose drafter does not say)."""
    rounds = [r for r in rounds if r.get("drafted_tokens") is not None]
    if not rounds:
        return "-"
    drafted = sum(r["drafted_tokens"] for r in rounds) / len(rounds)
    kept = sum(r["accepted_tokens"] for r in rounds) / len(rounds)
    return f"{kept:.0f}/{drafted:.0f}"


def format_table(report: dict[str, Any]) -> str:
    machine = report["machine"]
    bundles = report.get("bundles") or [report["bundle"]]
    head = (f"nomoat bench {' '.join(bundles)} on {machine.get('cpu', '?')} "
            f"({machine.get('cpus', '?')} CPUs); "
            f"{plural(report['rounds'], 'round')} after {report['warmup']} warm-up, median (min–max)")
    # Only workers count it (not the Android app, nor one with an older nomoat): dashes would say nothing.
    before_load = any(r.get("rss_before_load_mb") is not None for r in report["results"])
    if any(r.get("peak_rss_mb") is not None for r in report["results"]):
        head += "; peak RSS: the worker's peak since it started, the model's load included"
    if before_load:
        head += ", and before the model loaded (Python, this harness, ONNX Runtime)"
    lookup = any(r.get("prompt_lookup") for r in report["results"])
    several = any(r.get("bundle") for r in report["results"])
    ort = any(r.get("ort_options") for r in report["results"])
    bandwidth = report.get("read_bandwidth_bytes_per_s") or {}
    header = [*(["bundle"] if several else []), *(["ONNX Runtime options"] if ort else []),
              "threads", "prompt", "new", *(["lookup", "drafts kept"] if lookup else []),
              *(c[0] for c in COLUMNS), "peak RSS MB", *(["RSS before load MB"] if before_load else []),
              *(["of ceiling"] if bandwidth else [])]
    rows = [[*([r["bundle"]] if several else []),
             *([format_ort_options(r.get("ort_options", {}).items()) or "-"] if ort else []),
             format_threads(r), str(r["prompt_tokens"]), str(r["new_tokens"]),
             *([str(r.get("prompt_lookup") or "-"), format_drafts(r)] if lookup else []),
             *(format_stat(r["summary"][metric], decimals) for _, metric, decimals in COLUMNS),
             format_peak_rss(r), *([format_rss_before_load(r)] if before_load else []),
             *([format_of_ceiling(r, bandwidth)] if bandwidth else [])]
            for r in report["results"]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join([head, "", *lines, *([ceiling_note(report)] if bandwidth else [])])


def decode_ceiling(result: dict[str, Any], bandwidth: dict[str, float]) -> float | None:
    """Tokens/s that reading every weight once a token allows at the row's threads; None if unknown."""
    per_token = result.get("weight_bytes_per_token")
    bw = bandwidth.get(str(result.get("threads_used")))
    return bw / per_token if per_token and bw else None


def format_of_ceiling(result: dict[str, Any], bandwidth: dict[str, float]) -> str:
    ceiling = decode_ceiling(result, bandwidth)
    return "-" if ceiling is None else f"{result['summary']['decode_tps']['median'] / ceiling:.0%}"


def ceiling_note(report: dict[str, Any]) -> str:
    """What 'of ceiling' divides by: the bandwidth read here and the bytes a token reads."""
    bandwidth = report["read_bandwidth_bytes_per_s"]
    reads = ", ".join(f"{bw / 1e9:.1f} GB/s at {t} thread{'s' if t != '1' else ''}" for t, bw in bandwidth.items())
    sizes = sorted({r["weight_bytes_per_token"] for r in report["results"] if r.get("weight_bytes_per_token")})
    return ("\nof ceiling: median decode / (read bandwidth / weight bytes a token); "
            f"read where the rounds ran: {reads}\n"
            f"{' and '.join(f'{n / 1e6:.0f}' for n in sizes)} MB of weights a token, as ONNX Runtime holds them; "
            "past 100 % only with prompt lookup, which checks several tokens a pass")
