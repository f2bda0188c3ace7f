"""benchmarks/run.py's choice of systems: which peers run, with which options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pytest  # noqa: E402
import run  # noqa: E402  (benchmarks/ is not a package)
from artifacts import GENAI_ALL_LOGITS  # noqa: E402

PEERS = {"llama.cpp Q4_0": Path("/x/q4_0.gguf"), "ONNX Runtime GenAI int4": Path("/x/genai"),
         GENAI_ALL_LOGITS: Path("/x/genai-all-logits"), "ExecuTorch 8da4w": Path("/x/model.pte")}
LLAMA_LOOKUP_8 = "llama.cpp Q4_0 + lookup 8 (llama-cpp-python's drafter, all-position logits)"


def test_plain_run_measures_all_four_systems_without_lookup(tmp_path):
    systems = run.systems(tmp_path / "int4", PEERS, threads=2, context=2048)
    assert [label for label, _, _ in systems] == ["nomoat int4", "llama.cpp Q4_0", "ONNX Runtime GenAI int4",
                                                 "ExecuTorch 8da4w"]
    assert all("prompt_lookup" not in options and options["threads"] == 2 for _, _, options in systems)


def test_prompt_lookup_run_pairs_each_drafting_system_with_its_plain_self(tmp_path):
    systems = run.systems(tmp_path / "int4", PEERS, threads=1, context=2048, prompt_lookup=8)
    labels = [label for label, _, _ in systems]
    # Each row names what runs: llama-cpp-python's drafter turns every position's logits on, and GenAI's
    # rows run the graph with them (its drafter refuses the other), plain row too.
    assert labels == ["nomoat int4", "llama.cpp Q4_0", "ONNX Runtime GenAI int4 (all-position logits)",
                      "nomoat int4 + lookup 8", LLAMA_LOOKUP_8,
                      "ONNX Runtime GenAI int4 (all-position logits) + lookup 8"]
    plain, lookup = systems[:3], systems[3:]
    for (_, engine, options), (_, lookup_engine, lookup_options) in zip(plain, lookup, strict=True):
        assert lookup_engine == engine  # the same engine class and weights, only the drafter differs
        assert lookup_options == {**options, "prompt_lookup": 8}
    # ExecuTorch's Python runtime has no drafter: it sits the lookup run out rather than run plain twice.
    assert not any("ExecuTorch" in label for label in labels)


def test_prompt_lookup_is_stated_in_the_report_heading():
    report = {"date": "2026-11-27T18:00:00", "source": "/x/m.gguf", "prompt_tokens": 256, "new_tokens": 128,
              "context": 2048, "rounds": 3, "warmup": 1, "load_average_before": 0.1, "load_average_after": 0.2,
              "command": "python benchmarks/run.py", "prompt_lookup": 8,
              "results": [{"machine": {"cpu": "cpu", "cpus": 2}}]}
    assert "up to 8 drafted tokens per pass" in run.report_heading(report)
    assert "drafted" not in run.report_heading({**report, "prompt_lookup": 0})


def test_lookup_agreement_names_where_each_drafter_parts_from_plain():
    results = [{"system": "nomoat int4", "threads": 1},
               {"system": "nomoat int4 + lookup 8", "threads": 1, "tokens_as_plain": 128},
               {"system": "GenAI + lookup 8", "threads": 1, "tokens_as_plain": 16},
               {"system": "nomoat int4 + lookup 8", "threads": 2, "tokens_as_plain": 97}]
    line = run.lookup_agreement(results, 128)
    assert "nomoat int4 + lookup 8: 128 / 97" in line and "GenAI + lookup 8: 16" in line
    assert run.matching_prefix([1, 2, 3], [1, 2, 4]) == 2 and run.matching_prefix([1], [1, 2]) == 1


class _FakeWorker:
    def __init__(self, label: str, tokens: list[int]):
        self.label, self.tokens = label, tokens

    def generate(self, prompt_ids, new_tokens):
        return self.tokens[:new_tokens]


class _FakeJob:
    def __init__(self, label: str, tokens: list[int]):
        self.worker = _FakeWorker(label, tokens)


def test_compare_with_plain_pairs_each_lookup_worker_with_its_plain_one():
    jobs = [_FakeJob("a", [1, 2, 3, 4]), _FakeJob("b", [5, 6, 7, 8]),
            _FakeJob("a + lookup 4", [1, 2, 9, 9]), _FakeJob("b + lookup 4", [5, 6, 7, 8])]
    assert run.compare_with_plain(jobs, [0], 4, 4) == [{}, {}, {"tokens_as_plain": 2}, {"tokens_as_plain": 4}]


def test_genai_graph_row_runs_genais_files_in_plain_runs_only(tmp_path):
    systems = run.systems(tmp_path / "int4", PEERS, threads=2, context=2048, genai_graph=True)
    labels = [label for label, _, _ in systems]
    assert labels == ["nomoat int4", "llama.cpp Q4_0", "ONNX Runtime GenAI int4", run.GENAI_GRAPH,
                      "ExecuTorch 8da4w"]
    _, engine, options = systems[3]
    assert engine == "peers:GenAIGraphEngine"
    assert options == {"model_dir": str(PEERS["ONNX Runtime GenAI int4"]), "threads": 2, "context": 2048}
    lookup = run.systems(tmp_path / "int4", PEERS, threads=2, context=2048, prompt_lookup=8, genai_graph=True)
    assert run.GENAI_GRAPH not in [label for label, _, _ in lookup]


def _result(system: str, counts: list[tuple[int, int] | None]) -> dict:
    summary = {m: {"median": 10.0, "min": 9.0, "max": 11.0}
               for m in ("prefill_tps", "decode_tps", "ttft_ms", "peak_rss_mb")}
    rounds = [{"drafted_tokens": c[0] if c else None, "accepted_tokens": c[1] if c else None} for c in counts]
    return {"system": system, "threads": 1, "model_bytes": 90e6, "answer_ok": True, "summary": summary,
            "rounds": rounds, "peak_rss_mb": 11.0, "rss_before_load_mb": 3.0}


def test_table_ratios_are_each_system_over_llama_cpp_at_the_same_threads():
    def result(system, threads, prefill, decode, ttft, rss):
        summary = {m: {"median": v, "min": v, "max": v} for m, v in
                   (("prefill_tps", prefill), ("decode_tps", decode), ("ttft_ms", ttft), ("peak_rss_mb", rss))}
        return {"system": system, "threads": threads, "model_bytes": 90e6, "answer_ok": True, "summary": summary,
                "rounds": [], "peak_rss_mb": rss, "rss_before_load_mb": 30.0}

    results = [result("llama.cpp Q4_0", 1, 1000, 200, 100, 250), result("nomoat int4", 1, 1500, 300, 80, 200),
               result("llama.cpp Q4_0", 2, 2000, 400, 50, 260), result("nomoat int4", 2, 1000, 200, 100, 130)]
    rows = run.markdown_table(results).split("\n\n")[0].splitlines()[2:]  # the table, not the legend under it
    ratios = [line.split("|")[9:13] for line in rows]
    # decode, prefill, TTFT, RSS: above 1 is faster for the rates, below 1 is better for TTFT and RSS
    assert [[x.strip() for x in row] for row in ratios] == [
        ["1.00×"] * 4, ["1.50×", "1.50×", "0.80×", "0.80×"],
        ["1.00×"] * 4, ["0.50×", "0.50×", "2.00×", "0.50×"]]


def test_lookup_table_shows_the_drafts_each_system_kept():
    results = [_result("llama.cpp Q4_0", [None, None]), _result("nomoat int4 + lookup 8", [(40, 30), (60, 50)]),
               _result(LLAMA_LOOKUP_8, [None, None])]  # a drafter that does not say
    rows = run.markdown_table(results, prompt_lookup=8).splitlines()
    assert rows[0].endswith("| drafts kept |") and rows[1].count("---") == 13
    assert rows[3].endswith("| 1.00× | 40/50 |")  # kept / drafted, means over the rounds
    assert rows[2].endswith("| 1.00× | - |") and rows[4].endswith("| - |")
    # a plain run's table has no such column
    assert "drafts" not in run.markdown_table(results[:1])
    assert run.markdown_table(results[:1]).splitlines()[2].endswith("| 1.00× |")


def test_chart_marks_each_row_with_the_ceiling_of_its_system_and_threads(monkeypatch, tmp_path):
    drawn = {}
    monkeypatch.setattr(run, "plot_summaries", lambda entries, out, title, **kw: drawn.update(entries=entries, **kw))
    rounds = [{"prompt_tokens": 16, "new_tokens": 5, "ttft_s": 0.1, "decode_s": 0.04}]
    results = [{"system": s, "threads": t, "rounds": rounds}
               for t in (1, 2) for s in ("nomoat int4", "llama.cpp Q4_0")]
    report = {"source": "/x/model.gguf", "prompt_tokens": 16, "new_tokens": 5, "rounds": 1, "results": results,
              "read_bandwidth_bytes_per_s": {1: 40e9, 2: 60e9},
              "weight_bytes_per_token": {"nomoat int4": 100e6, "llama.cpp Q4_0": 80e6}}
    run.plot_report(report, tmp_path / "chart.png")
    assert [label for label, _ in drawn["entries"]] == ["nomoat int4, 1 thr", "llama.cpp Q4_0, 1 thr",
                                                        "nomoat int4, 2 thr", "llama.cpp Q4_0, 2 thr"]
    assert drawn["ceilings"] == [400, 500, 600, 750]  # bandwidth at the row's threads / its system's bytes
    assert drawn["groups"] == ["nomoat int4", "llama.cpp Q4_0"] * 2
    assert drawn["entries"][0][1].decode_tps.median == 100  # 4 tokens in 40 ms


def test_genai_plain_rows_use_last_position_logits_and_its_drafter_the_graph_with_all(tmp_path):
    """GenAI's n-gram drafter refuses a graph with last-position logits ("requires target logits for
    every verified token"), and a plain row on a graph with all of them runs the LM head once per
    prompt token (its prefill 23-25 % slower, measured): each run gets the graph it needs."""
    genai = lambda systems: {label: options["model_dir"] for label, engine, options in systems  # noqa: E731
                             if engine == "peers:OrtGenAIEngine"}
    assert genai(run.systems(tmp_path / "int4", PEERS, threads=1, context=2048)) == {
        "ONNX Runtime GenAI int4": "/x/genai"}
    assert genai(run.systems(tmp_path / "int4", PEERS, threads=1, context=2048, prompt_lookup=8)) == {
        GENAI_ALL_LOGITS: "/x/genai-all-logits", f"{GENAI_ALL_LOGITS} + lookup 8": "/x/genai-all-logits"}
    assert GENAI_ALL_LOGITS == "ONNX Runtime GenAI int4 (all-position logits)"


def test_genai_builder_prunes_the_lm_head_only_when_asked(tmp_path, monkeypatch):
    import subprocess

    import artifacts

    commands = []

    def builder(cmd, **kwargs):  # writes what the real builder would, where it was told to
        commands.append(cmd)
        out = Path(cmd[cmd.index("-o") + 1])
        out.mkdir()
        (out / "genai_config.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(artifacts.subprocess, "run", builder)
    artifacts.ortgenai_int4(tmp_path / "hf", tmp_path / "last", prune_lm_head=True)
    artifacts.ortgenai_int4(tmp_path / "hf", tmp_path / "all")
    pruned, full = commands
    assert pruned[pruned.index("--extra_options") + 1] == "prune_lm_head=true"
    assert "--extra_options" not in full and "prune_lm_head=true" not in full
    assert (tmp_path / "last" / "genai_config.json").is_file() and (tmp_path / "all" / "genai_config.json").is_file()


def test_a_lookup_runs_rows_pair_with_their_plain_rows_and_bytes_under_the_new_labels():
    """compare_with_plain and the ceiling find each drafting row's plain row by lookup_label."""
    jobs = [_FakeJob(label, [1, 2, 3]) for label, _, _ in run.systems(Path("/x/int4"), PEERS, 1, 2048, 8)]
    assert run.compare_with_plain(jobs, [0], 3, 8) == [{}, {}, {}] + [{"tokens_as_plain": 3}] * 3
    assert run.lookup_label("llama.cpp Q4_0", 8) == LLAMA_LOOKUP_8


def test_peak_rss_is_each_workers_largest_reading_and_the_ratio_divides_peaks():
    """Its VmHWM only grows, so the rounds' median (here 200) is below the worker's peak (300)."""
    llama, nomoat = _result("llama.cpp Q4_0", [None]), _result("nomoat int4", [None])
    llama["summary"]["peak_rss_mb"] = {"median": 200.0, "min": 100.0, "max": 300.0}
    llama |= {"peak_rss_mb": 300.0, "rss_before_load_mb": 40.4}
    nomoat["summary"]["peak_rss_mb"] = {"median": 100.0, "min": 100.0, "max": 150.0}
    nomoat |= {"peak_rss_mb": 150.0, "rss_before_load_mb": 31.6}
    rows = run.markdown_table([llama, nomoat]).split("\n\n")[0].splitlines()  # the table, not the legend under it
    assert [c.strip() for c in rows[0].split("|")[7:9]] == ["peak RSS MB", "RSS before load MB"]
    assert [[c.strip() for c in row.split("|")[7:9]] for row in rows[2:]] == [["300", "40"], ["150", "32"]]
    assert rows[3].endswith("| 0.50× |")  # 150 / 300, not 100 / 200 of the medians


@pytest.mark.parametrize(("args", "problem"), [
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "1", "--threads", "2", "--threads", "1"],
     "--threads 1 is given twice; to repeat a measurement, raise --rounds"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--new-tokens", "1"], "--new-tokens must be >= 2"),
])
def test_counts_that_would_measure_something_else_are_refused_in_one_line(tmp_path, args, problem):
    with pytest.raises(SystemExit) as exit_:
        run.main(["--bundle", str(tmp_path / "no-bundle"), *args])  # refused before the bundle is read
    message = str(exit_.value.code)
    assert message.startswith(f"benchmarks/run.py: {problem}") and "\n" not in message


def test_ratio_columns_say_which_way_is_better():
    """Above 1 is good for the rates and bad for TTFT and RSS: each column's heading says so, and a line under
    the table says what the marks mean."""
    lines = run.markdown_table([_result("llama.cpp Q4_0", [None]), _result("nomoat int4", [None])]).splitlines()
    assert [c.strip() for c in lines[0].split("|")[9:13]] == ["decode × (↑)", "prefill × (↑)", "TTFT × (↓)",
                                                              "RSS × (↓)"]
    assert lines[-1] == ("× columns: each system over llama.cpp Q4_0 at the same threads; (↑) higher is better, "
                         "(↓) lower is better.")


def test_every_system_names_the_libraries_whose_versions_the_report_records(tmp_path):
    import importlib

    for prompt_lookup, genai_graph in ((0, True), (8, False)):
        for label, engine, _ in run.systems(tmp_path / "int4", PEERS, 1, 2048, prompt_lookup, genai_graph):
            module, name = engine.split(":")
            assert getattr(importlib.import_module(module), name).libraries, label
    libraries = {"nomoat": "0.1.0", "onnxruntime": "1.23.0"}
    results = [{"libraries": libraries}, {"libraries": {"llama-cpp-python": "0.3.36"}},
               {"libraries": {"onnxruntime-genai": "0.18.0", "onnxruntime": "1.23.0"}}]
    versions = run.library_versions(results)
    assert versions == {"nomoat": "0.1.0", "onnxruntime": "1.23.0", "llama-cpp-python": "0.3.36",
                        "onnxruntime-genai": "0.18.0"}
    heading = run.report_heading({**_REPORT, "libraries": versions})
    assert (" Libraries: nomoat 0.1.0, onnxruntime 1.23.0, llama-cpp-python 0.3.36, onnxruntime-genai 0.18.0.\n"
            in heading)


_REPORT = {"date": "2026-11-27T18:00:00", "source": "/x/m.gguf", "prompt_tokens": 128, "new_tokens": 128,
           "context": 2048, "rounds": 1, "warmup": 1, "load_average_before": 0.1, "load_average_after": 0.2,
           "command": "python benchmarks/run.py", "prompt_lookup": 0,
           "results": [{"machine": {"cpu": "cpu", "cpus": 2}}]}


def test_the_heading_counts_rounds_in_words_and_says_the_peak_includes_the_load():
    heading = run.report_heading(_REPORT)
    assert "median (min–max) of 1 alternating round after 1 warm-up" in heading
    assert "peak RSS: each worker's peak since it started, the model's load included" in heading


class _RoundsJob:
    def __init__(self, label: str, rounds: list):
        self.worker = type("Worker", (), {"label": label, "rss_before_load_mb": 30.0, "ready": {
            "model_bytes": 1, "load_s": 0.1, "machine": {}, "libraries": {"nomoat": "0.1.0"}}})()
        self.rounds = rounds


def test_a_systems_result_flags_rounds_that_kept_few_cores_busy_and_agrees_on_prefill(capsys):
    from nomoat.runtime.bench import RoundResult

    # Two rounds, 1 s each, prefill 0.1 s and 0.3 s: the median prefill is 100 / 0.2 s, not the mean of the rates.
    idle = [RoundResult(100, 4, ttft, 1.0 - ttft, cpu_s=1.9) for ttft in (0.1, 0.3)]
    result = run.system_result(_RoundsJob("nomoat int4", idle), 2, {"answer_ok": True})
    assert (result["cores_busy"], result["contended"]) == (pytest.approx(1.9), False)
    assert result["summary"]["prefill_tps"]["median"] == pytest.approx(500)
    assert result["summary"]["ttft_ms"]["median"] == pytest.approx(200)
    assert result["libraries"] == {"nomoat": "0.1.0"} and capsys.readouterr().err == ""
    busy = [RoundResult(100, 4, 0.1, 0.9, cpu_s=1.1) for _ in range(3)]
    result = run.system_result(_RoundsJob("llama.cpp Q4_0", busy), 2, {"answer_ok": True})
    assert (result["cores_busy"], result["contended"]) == (pytest.approx(1.1), True)
    assert capsys.readouterr().err == ("warning: llama.cpp Q4_0: its rounds kept a median 1.10 of the 2 cores its "
                                       "threads can use busy: the machine was busy with other work, so these "
                                       "numbers are low; measure again when it is idle\n")
    # Four threads on two CPUs can keep two cores busy, not four.
    job = _RoundsJob("nomoat int4", idle)
    job.worker.ready["machine"] = {"cpus": 2}
    assert run.system_result(job, 4, {"answer_ok": True})["contended"] is False


def test_a_run_longer_than_the_context_is_refused_in_the_scripts_words(monkeypatch, tmp_path):
    monkeypatch.setattr(run, "read_manifest", lambda bundle: type("Manifest", (), {"max_context": 96})())
    with pytest.raises(SystemExit) as exit_:
        run.main(["--bundle", str(tmp_path), "--prompt-tokens", "90", "--new-tokens", "10"])
    assert str(exit_.value.code) == (f"benchmarks/run.py: --prompt-tokens 90 + --new-tokens 10 exceed the bundle's "
                                     f"context of 96 tokens ({tmp_path}); measure shorter runs or convert with a "
                                     "larger --max-context")


@pytest.mark.parametrize(("plot", "problem"), [("nowhere/chart.png", "the folder"), ("chart.txt", "cannot write .txt")])
def test_the_chart_path_is_checked_before_the_peers_are_built(monkeypatch, tmp_path, plot, problem):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(run, "read_manifest", lambda bundle: type("Manifest", (), {"max_context": 2048})())
    monkeypatch.setattr(run, "peer_artifacts", lambda *a: pytest.fail("built the peers before checking --plot"))
    with pytest.raises(SystemExit) as exit_:
        run.main(["--bundle", str(tmp_path), "--plot", str(tmp_path / plot)])
    assert str(exit_.value.code).startswith(f"benchmarks/run.py: --plot {tmp_path / plot}: ")
    assert problem in str(exit_.value.code)


def test_help_says_nox_passes_extra_arguments_to_all_three_runs(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "arguments after `nox -s bench --` go to all three" in said
    assert "--threads, which repeats, adds a count to the session's 1 and 2" in said


# -- main, with fake workers ---------------------------------------------------------------

WORDS = {1: "The capital of France is Paris.", 2: "Lyon."}


class _FakeWorkerProcess:
    """Stands in for a worker process: answers the check question as its system would (`wrong` names the
    systems that answer Lyon), times rounds without running anything, and logs what it is asked."""

    wrong: set[str] = set()
    log: list[tuple[str, str]] = []

    def __init__(self, label: str, argv: list[str], env: dict | None = None):
        self.label, self.rss_before_load_mb = label, 30.0
        self.ready = {"model_bytes": 90e6, "load_s": 0.1, "machine": {"cpu": "cpu", "cpus": 2},
                      "libraries": {"nomoat": "0.1.0"}}

    def start(self) -> dict:
        return self.ready

    def generate(self, prompt_ids, new_tokens):
        return [2] if self.label in self.wrong else [1]

    def measure(self, prompt_ids, new_tokens):
        from nomoat.runtime.bench import RoundResult

        self.log.append(("measure", self.label))
        return RoundResult(len(prompt_ids), new_tokens, 0.1, 0.2, peak_rss_bytes=200 * 10**6, cpu_s=0.6)

    def close(self) -> None:
        self.log.append(("close", self.label))


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """benchmarks/run.py's main with everything it would load or measure faked: peers, manifest, tokenizer,
    bandwidth and the workers (_FakeWorkerProcess); the rounds without their pause."""
    import functools
    import types

    from nomoat.runtime import bench_worker

    manifest = types.SimpleNamespace(max_context=2048, stop_token_ids=[],
                                     tokenizer=types.SimpleNamespace(tokenizer_file="tokenizer.json"))
    monkeypatch.setattr(run, "read_manifest", lambda bundle: manifest)
    monkeypatch.setattr(run, "synthetic_prompt_ids", lambda tokenizer_file, n: list(range(n)))
    monkeypatch.setattr(run, "default_gguf", lambda: Path("/x/m.gguf"))
    monkeypatch.setattr(run, "peer_artifacts", lambda source, cache: PEERS)
    monkeypatch.setattr(run, "read_bandwidth", lambda threads, megabytes: 40e9)
    monkeypatch.setattr(run, "_bytes_per_token", lambda path: 100 * 10**6)
    monkeypatch.setattr(run, "question_ids", lambda bundle, manifest: [0])
    tokenizer = types.SimpleNamespace(decode=lambda ids: " ".join(WORDS[i] for i in ids))
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(
        Tokenizer=types.SimpleNamespace(from_file=lambda path: tokenizer)))
    monkeypatch.setattr(run, "WorkerProcess", _FakeWorkerProcess)
    monkeypatch.setattr(run, "run_alternating", functools.partial(bench_worker.run_alternating, pause_s=0))
    monkeypatch.setattr(_FakeWorkerProcess, "wrong", set())
    monkeypatch.setattr(_FakeWorkerProcess, "log", [])
    charts = []
    monkeypatch.setattr(run, "chart_path", lambda path: path)  # no matplotlib needed
    monkeypatch.setattr(run, "plot_report", lambda report, path: charts.append(path))
    bundle = tmp_path / "int4"
    bundle.mkdir()
    return types.SimpleNamespace(args=["--bundle", str(bundle), "--threads", "1", "--rounds", "2", "--warmup", "1"],
                                 charts=charts, log=_FakeWorkerProcess.log)


def test_a_system_that_answers_wrong_is_not_timed_and_the_others_are(fake_run, tmp_path, capsys):
    _FakeWorkerProcess.wrong = {"ONNX Runtime GenAI int4"}
    out = tmp_path / "results.json"
    assert run.main([*fake_run.args, "--json", str(out)]) == 1
    measured = [label for event, label in fake_run.log if event == "measure"]
    assert "ONNX Runtime GenAI int4" not in measured
    assert sorted(set(measured)) == ["ExecuTorch 8da4w", "llama.cpp Q4_0", "nomoat int4"]
    assert all(measured.count(label) == 3 for label in set(measured))  # 1 warm-up + 2 rounds each
    # Its worker is closed before the rounds, so its memory is not held while the others are timed.
    first_round = next(i for i, (event, _) in enumerate(fake_run.log) if event == "measure")
    assert fake_run.log.index(("close", "ONNX Runtime GenAI int4")) < first_round
    genai = next(r for r in json.loads(out.read_text())["results"] if r["system"] == "ONNX Runtime GenAI int4")
    assert (genai["answer"], genai["answer_ok"], genai["summary"], genai["rounds"]) == ("Lyon.", False, None, [])
    printed = capsys.readouterr()
    row = next(line for line in printed.out.splitlines() if line.startswith("| ONNX Runtime GenAI int4 (wrong"))
    assert row.startswith("| ONNX Runtime GenAI int4 (wrong answer: not timed) | 1 | 90 | – | – | – | – | 30 | – |")
    ceiling_row = next(line for line in printed.out.splitlines() if line.startswith("| ONNX Runtime GenAI int4 |"))
    assert ceiling_row.endswith("| – | – |")
    assert "[bench] ONNX Runtime GenAI int4 answered wrong: not timed" in printed.err


def test_a_baseline_that_answers_wrong_leaves_no_ratios(fake_run, capsys):
    _FakeWorkerProcess.wrong = {"llama.cpp Q4_0"}
    assert run.main(fake_run.args) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| nomoat int4 | 1 | 90 |")]
    assert rows[0].endswith("| – | – | – | – |")  # nothing to divide by


def test_a_report_that_cannot_be_written_does_not_cost_the_chart(fake_run, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    measure_threads = run.measure_threads

    def folder_goes_during_the_rounds(*args):
        folder.rmdir()
        return measure_threads(*args)

    monkeypatch.setattr(run, "measure_threads", folder_goes_during_the_rounds)
    code = run.main([*fake_run.args, "--json", str(folder / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert code == 1 and fake_run.charts == [tmp_path / "r.png"]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"benchmarks/run.py: --json {folder / 'r.json'}: the report cannot be written (No such file or directory); "
        "the tables are printed above")


@pytest.mark.parametrize(("json_file", "problem"), [
    ("nowhere/r.json", "the folder {tmp}/nowhere does not exist; create it first (mkdir -p) or name a file in an "
                       "existing folder"),
    (".", "that is a folder; name a file in it, e.g. {tmp}/results.json"),
])
def test_the_json_path_is_checked_before_the_peers_are_built(monkeypatch, tmp_path, json_file, problem):
    monkeypatch.setattr(run, "read_manifest", lambda bundle: type("Manifest", (), {"max_context": 2048})())
    monkeypatch.setattr(run, "peer_artifacts", lambda *a: pytest.fail("built the peers before checking --json"))
    with pytest.raises(SystemExit) as exit_:
        run.main(["--bundle", str(tmp_path), "--json", str(tmp_path / json_file)])
    assert str(exit_.value.code) == f"benchmarks/run.py: --json {tmp_path / json_file}: {problem.format(tmp=tmp_path)}"


def test_each_run_of_nox_bench_tags_its_files_so_none_overwrites_another(fake_run, tmp_path):
    """nox -s bench passes every run the same --json and --plot after `--`; --file-tag keeps their files apart."""
    run.main([*fake_run.args, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
              "--file-tag", "long"])
    assert (tmp_path / "r-long.json").is_file() and not (tmp_path / "r.json").exists()
    assert fake_run.charts == [tmp_path / "r-long.png"]
    assert run.tagged(Path("build/bench/results.json"), "lookup") == Path("build/bench/results-lookup.json")


def test_llama_cpp_reads_the_tensors_of_its_gguf_a_token_not_its_vocabulary(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"token {i}" for i in range(20_000)])  # read at load only
    weights = np.ones((64, 128), dtype=np.float32)
    writer.add_tensor("blk.0.ffn_up.weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert run._bytes_per_token(path) == weights.nbytes < path.stat().st_size - 200_000


def test_lora_quality_checks_its_json_path_before_minutes_of_work(monkeypatch, tmp_path):
    import lora_quality

    monkeypatch.setattr(lora_quality, "measure", lambda args: pytest.fail("measured before checking --json"))
    with pytest.raises(SystemExit) as exit_:
        lora_quality.main(["--json", str(tmp_path / "nowhere" / "q.json")])
    assert str(exit_.value.code) == (f"benchmarks/lora_quality.py: --json {tmp_path / 'nowhere' / 'q.json'}: the "
                                     f"folder {tmp_path / 'nowhere'} does not exist; create it first (mkdir -p) or "
                                     "name a file in an existing folder")


def test_lora_quality_says_in_one_line_when_its_numbers_cannot_be_written(monkeypatch, tmp_path, capsys):
    import lora_quality

    folder = tmp_path / "out"
    folder.mkdir()
    monkeypatch.setattr(lora_quality, "measure", lambda args: folder.rmdir() or {"systems": []})
    monkeypatch.setattr(lora_quality, "table", lambda result: "the table")
    with pytest.raises(SystemExit) as exit_:
        lora_quality.main(["--json", str(folder / "q.json")])
    assert str(exit_.value.code) == (f"benchmarks/lora_quality.py: --json {folder / 'q.json'}: the numbers cannot be "
                                     "written (No such file or directory); the table is printed above")
    assert capsys.readouterr().out == "the table\n"
