"""Peak RSS as the bench reports it: the worker's largest reading over its rounds (VmHWM only grows
within a process), and its RSS before the model loads (Python, the harness and the engine's library)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from nomoat.runtime.bench import RoundResult, process_peak_rss_mb, summarize
from nomoat.runtime.bench_worker import WorkerProcess, local_worker_argv
from nomoat.runtime.cli_bench import Config, format_table, measure_configs

TESTS = Path(__file__).parent
MB = 1_000_000


class GrowingEngine:
    """Holds `library_mb` from import_library, `model_mb` from prepare, and `grow_mb` more after every
    run: an engine whose memory grows over the rounds, as a cache or an allocator's pools may."""

    libraries = ("nomoat", "no-such-distribution")

    def __init__(self, library_mb: int = 0, model_mb: int = 0, grow_mb: int = 0):
        self.name = "growing"
        self.library_mb, self.model_mb, self.grow_mb = library_mb, model_mb, grow_mb
        self.held: list[bytes] = []

    def import_library(self) -> None:
        self.held.append(b"\x01" * (self.library_mb * MB))  # filled: every page is really touched

    def prepare(self) -> None:
        self.held.append(b"\x01" * (self.model_mb * MB))

    def run(self, prompt_ids: Sequence[int], new_tokens: int) -> Iterator[int]:
        self.held.append(b"\x01" * (self.grow_mb * MB))
        yield from range(new_tokens)

    def reset(self) -> None:
        pass

    def model_bytes(self) -> int | None:
        return 1


def _growing_worker(label: str, **options) -> WorkerProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return WorkerProcess(label, local_worker_argv("test_bench_rss:GrowingEngine", options), env=env)


def test_the_peak_of_rounds_is_their_largest_reading_not_their_median():
    rounds = [RoundResult(8, 4, 0.1, 0.1, peak_rss_bytes=n * MB) for n in (100, 300, 200)]
    assert process_peak_rss_mb(rounds) == 300 and summarize(rounds).peak_rss_mb.median == 200
    # A JSON report's summary says the peak, not the readings' median: the same number as its peak_rss_mb.
    from nomoat.runtime.bench import report_summary

    assert report_summary(rounds)["peak_rss_mb"] == {"median": 300, "min": 300, "max": 300}
    assert report_summary(rounds)["decode_tps"] == summarize(rounds).to_dict()["decode_tps"]
    assert process_peak_rss_mb([RoundResult(8, 4, 0.1, 0.1)]) is None


def test_the_worker_reads_its_rss_after_importing_the_library_and_before_loading_the_model():
    with _growing_worker("w", library_mb=80, model_mb=120) as worker:
        before, after = worker.ready["rss_before_load_bytes"], worker.ready["peak_rss_bytes"]
    assert 80 * MB < before < 80 * MB + 100 * MB  # the library's 80 MB and Python's own, no model yet
    assert 110 * MB < after - before < 140 * MB  # the model's 120 MB
    assert worker.rss_before_load_mb == before / 1e6


def test_an_engine_without_import_library_reports_python_and_the_harness_alone():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    argv = local_worker_argv("test_bench:SleepyEngine", {})
    with WorkerProcess("sleepy", argv, env=env) as worker:
        assert 0 < worker.ready["rss_before_load_bytes"] <= worker.ready["peak_rss_bytes"]


def test_nomoat_bench_reports_the_largest_reading_as_the_peak_and_the_rss_before_load():
    report = measure_configs([Config(1, 8, 3)], lambda c: list(range(8)),
                             lambda c: _growing_worker(c.label, library_mb=40, grow_mb=40),
                             rounds=3, warmup=0, pause_s=0)
    (r,) = report["results"]
    readings = [x["peak_rss_mb"] for x in r["rounds"]]
    assert readings == sorted(readings) and readings[-1] - readings[0] > 70  # 40 MB more each round
    assert r["peak_rss_mb"] == max(readings) > readings[1]  # the readings' median
    assert r["summary"]["peak_rss_mb"] == {"median": r["peak_rss_mb"], "min": r["peak_rss_mb"], "max": r["peak_rss_mb"]}
    # The versions the worker found, as benchmarks/run.py's report keeps them (None: not installed).
    assert set(r["libraries"]) == {"nomoat", "no-such-distribution"} and r["libraries"]["no-such-distribution"] is None
    assert 40 < r["rss_before_load_mb"] < readings[0] - 30
    lines = format_table({"bundle": "fake", **report}).splitlines()
    header, row = (re.split(r"\s{2,}", line.strip()) for line in lines[2:4])
    assert header[-2:] == ["peak RSS MB", "RSS before load MB"]
    assert row[-2:] == [f"{r['peak_rss_mb']:.0f}", f"{r['rss_before_load_mb']:.0f}"]
    assert "peak RSS: the worker's peak since it started, the model's load included" in lines[0]


def test_a_report_with_only_the_rounds_readings_keeps_its_table():
    """The Android app's (converter/deploy_bench.py): no worker, so no peak of its own and no RSS before load."""
    rounds = [RoundResult(8, 4, 0.1, 0.1, peak_rss_bytes=n * MB) for n in (100, 120, 110)]
    report = {"bundle": "/data/b", "machine": {"cpu": "phone", "cpus": 8}, "rounds": 3, "warmup": 0,
              "results": [{"threads": 2, "prompt_tokens": 8, "new_tokens": 4, "prompt_lookup": 0,
                           "summary": summarize(rounds).to_dict(), "rounds": [x.to_dict() for x in rounds]}]}
    lines = format_table(report).splitlines()
    assert lines[2].endswith("peak RSS MB") and lines[3].endswith("110 (100–120)") and len(lines) == 4


def test_the_chart_draws_the_peak_as_the_largest_reading_without_whiskers():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from nomoat.runtime.bench_plot import draw_summaries

    rounds = [RoundResult(8, 4, 0.1, 0.1, peak_rss_bytes=n * MB) for n in (100, 300, 200)]
    fig = draw_summaries([("a", summarize(rounds))], "test")
    rss = fig.axes[3]
    assert rss.get_title().startswith("Peak RSS")
    assert [bar.get_height() for bar in rss.patches] == [300] and not rss.collections  # no whiskers
    plt.close(fig)
