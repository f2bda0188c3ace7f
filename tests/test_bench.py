"""The benchmark harness measures what it says it measures (not how fast anything is)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from nomoat.runtime.bench import (
    BenchError,
    RoundResult,
    Stat,
    measure_once,
    repeat_to_length,
    report_summary,
    summarize,
    synthetic_prompt_ids,
)
from nomoat.runtime.bench_worker import Job, WorkerOverdue, WorkerProcess, local_worker_argv, run_alternating
from nomoat.runtime.cli_bench import Config, decode_ceiling, format_drafts, format_table, measure_configs

TESTS = Path(__file__).parent
MB = 1_000_000


class SleepyEngine:
    """Sleeps prefill_s before the first token and per_token_s before each next one.
    Optionally holds `hold_mb` of touched memory while it runs (to move the peak RSS).
    With a `mark`, it reports that many drafted tokens (none kept) with every round: a fixed
    number that says which worker measured a round, where comparing speeds would be at the
    mercy of the machine's load."""

    def __init__(self, prefill_s: float = 0.0, per_token_s: float = 0.0, hold_mb: int = 0,
                 stop_after: int = 0, libraries: Sequence[str] = (), name: str = "sleepy",
                 mark: int | None = None):
        self.name = name
        self.mark = mark
        self.libraries = tuple(libraries)
        self.prefill_s, self.per_token_s = prefill_s, per_token_s
        self.hold_mb, self.stop_after = hold_mb, stop_after
        self.resets = 0
        self.pulled = 0

    def prepare(self) -> None:
        pass

    def run(self, prompt_ids: Sequence[int], new_tokens: int) -> Iterator[int]:
        held = b"\x01" * (self.hold_mb * MB)  # bytes filled with 1s: every page is really touched
        count = min(new_tokens, self.stop_after) if self.stop_after else new_tokens
        for i in range(count):
            time.sleep(self.prefill_s if i == 0 else self.per_token_s)
            self.pulled += 1
            yield i
        del held

    def reset(self) -> None:
        self.resets += 1

    def draft_counts(self) -> tuple[int, int] | None:
        return None if self.mark is None else (self.mark, 0)

    def model_bytes(self) -> int | None:
        return 1234


class CeilingEngine(SleepyEngine):
    """A SleepyEngine that knows what the bandwidth ceiling needs: its bytes a token and threads."""

    def __init__(self, threads: int = 1, **options):
        super().__init__(**options)
        self.threads = threads

    def weight_bytes_per_token(self) -> int:
        return 10 * MB

    def threads_used(self) -> int:
        return self.threads


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ClockedEngine(SleepyEngine):
    """Advances a manual clock instead of sleeping: exact, instant timings."""

    def __init__(self, clock: ManualClock, prefill_s: float, per_token_s: float, reset_s: float = 0.0):
        super().__init__(prefill_s, per_token_s)
        self.clock, self.reset_s = clock, reset_s

    def run(self, prompt_ids: Sequence[int], new_tokens: int) -> Iterator[int]:
        for i in range(new_tokens):
            self.clock.now += self.prefill_s if i == 0 else self.per_token_s
            self.pulled += 1
            yield i

    def reset(self) -> None:
        super().reset()
        self.clock.now += self.reset_s


# -- measure_once --------------------------------------------------------------------------

def test_known_sleeps_give_the_expected_rates():
    r = measure_once(SleepyEngine(prefill_s=0.2, per_token_s=0.02), list(range(100)), 11)
    # sleep() never ends early, so no rate can come out above the sleeps' (1 % for float rounding), however
    # busy the machine. It does overshoot, the more the busier the machine: the floors are half the sleeps'
    # rates, which still rule out timing decode from the start (0.4 s: 25 tokens/s, not above 50 x 0.5) or the
    # TTFT to the last token (0.4 s: 250 tokens/s). ManualClock checks the arithmetic exactly, below.
    assert 500 * 0.5 < r.prefill_tps <= 500 * 1.01  # 100 tokens / 0.2 s
    assert 50 * 0.5 < r.decode_tps <= 50 * 1.01  # 10 tokens after the first / (10 x 0.02 s)
    assert 200 <= r.ttft_ms < 200 / 0.5


def test_decode_rate_excludes_the_first_token_and_reset_is_not_timed():
    clock = ManualClock()
    engine = ClockedEngine(clock, prefill_s=1.0, per_token_s=0.5, reset_s=7.0)
    r = measure_once(engine, [1, 2, 3, 4], 5, clock=clock)
    assert r.ttft_s == pytest.approx(1.0)
    assert r.prefill_tps == pytest.approx(4.0)
    assert r.decode_s == pytest.approx(2.0)  # four steps after the first token
    assert r.decode_tps == pytest.approx(2.0)
    assert engine.resets == 1


def test_cpu_time_of_the_round_is_recorded():
    def busy_engine_run(prompt_ids, new_tokens):
        for i in range(new_tokens):
            end = time.process_time() + 0.05
            while time.process_time() < end:  # burn CPU, unlike sleep
                pass
            yield i

    engine, idle = SleepyEngine(), measure_once(SleepyEngine(prefill_s=0.1), [1], 2)
    engine.run = busy_engine_run
    busy = measure_once(engine, [1], 4)
    assert busy.cpu_s >= 0.19  # 4 x 50 ms of CPU, however busy the machine is
    assert idle.cpu_s < 0.05  # sleeping costs no CPU
    assert RoundResult(10, 5, ttft_s=0.1, decode_s=0.3, cpu_s=0.8).cpu_utilization == pytest.approx(2.0)


def test_engine_runs_the_full_count():
    engine = SleepyEngine()
    measure_once(engine, [1], 37)
    assert engine.pulled == 37


def test_engine_that_stops_early_is_an_error():
    with pytest.raises(BenchError, match="generated 3 tokens instead of 10"):
        measure_once(SleepyEngine(stop_after=3), [1], 10)


def test_rounds_reset_the_engine_every_time():
    engine = SleepyEngine()
    for _ in range(3):
        measure_once(engine, [1, 2], 2)
    assert engine.resets == 3


# -- summaries and prompts -----------------------------------------------------------------

def _round(ttft_s: float, decode_s: float, new_tokens: int = 11, rss: int | None = None) -> RoundResult:
    return RoundResult(prompt_tokens=100, new_tokens=new_tokens, ttft_s=ttft_s, decode_s=decode_s,
                       peak_rss_bytes=rss)


def test_summary_median_min_max():
    rounds = [_round(0.1, 1.0, rss=300 * MB), _round(0.2, 0.5, rss=100 * MB), _round(0.4, 0.25, rss=200 * MB),
              _round(0.5, 2.0, rss=100 * MB)]
    s = summarize(rounds)
    assert s.rounds == 4
    assert s.prefill_tps == Stat(median=pytest.approx(100 / 0.3), min=200, max=1000)  # 100 tokens / median TTFT
    assert s.decode_tps == Stat(median=(10 + 20) / 2, min=5, max=40)
    assert s.ttft_ms == Stat(median=300, min=100, max=500)
    assert s.peak_rss_mb == Stat(median=150, min=100, max=300)


def test_median_prefill_is_the_prompt_over_the_median_ttft_with_an_even_number_of_rounds():
    """A median of the rates averages the two middle rates (1000 and 500 tokens/s: 750), while the median
    TTFT is the mean of the two middle times (150 ms: 667 tokens/s); the two columns must tell one story."""
    s = summarize([_round(0.1, 1.0), _round(0.2, 1.0), _round(0.05, 1.0), _round(0.4, 1.0)])
    assert s.ttft_ms.median == pytest.approx(150)
    assert s.prefill_tps.median == pytest.approx(100 / 0.15)
    assert (s.prefill_tps.min, s.prefill_tps.max) == (pytest.approx(250), pytest.approx(2000))
    odd = summarize([_round(0.1, 1.0), _round(0.2, 1.0), _round(0.4, 1.0)])
    assert odd.prefill_tps.median == pytest.approx(500) and odd.ttft_ms.median == pytest.approx(200)


def test_summary_without_decode_or_rss():
    s = summarize([_round(0.1, 0.0, new_tokens=1), _round(0.3, 0.0, new_tokens=1)])
    assert s.decode_tps is None and s.peak_rss_mb is None
    assert s.ttft_ms.median == pytest.approx(200)
    with pytest.raises(ValueError):
        summarize([])


def test_round_result_survives_json():
    r = _round(0.25, 1.5, rss=123 * MB)
    d = json.loads(json.dumps(r.to_dict()))
    assert RoundResult.from_dict(d) == r
    assert d["decode_tps"] == pytest.approx(10 / 1.5) and d["prefill_tps"] == pytest.approx(400)


@pytest.mark.parametrize("damage", ["missing", "broken"])
def test_a_missing_or_broken_tokenizer_is_a_bundle_error_naming_the_file_and_the_fix(tmp_path, damage):
    from nomoat.runtime.errors import BundleError

    path = tmp_path / "tokenizer.json"
    if damage == "broken":
        path.write_text('{"version": "1.0", "model": ')  # cut short, as a copy that stopped midway
    with pytest.raises(BundleError) as e:
        synthetic_prompt_ids(path, 16)
    said = str(e.value)
    assert str(path) in said and said.endswith("copy the bundle again or re-convert it.") and "\n" not in said
    assert ("is missing" in said) == (damage == "missing")


def test_synthetic_prompt_has_exactly_n_deterministic_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "light": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    ids = synthetic_prompt_ids(tmp_path / "tokenizer.json", 300)
    assert len(ids) == 300 and ids == synthetic_prompt_ids(tmp_path / "tokenizer.json", 300)
    assert repeat_to_length([7, 8, 9], 7) == [7, 8, 9, 7, 8, 9, 7]


# -- alternation ---------------------------------------------------------------------------

class RecordingWorker:
    def __init__(self, label: str, log: list[str]):
        self.label, self.log = label, log

    def measure(self, prompt_ids: Sequence[int], new_tokens: int) -> RoundResult:
        self.log.append(self.label)
        return _round(0.1 * len(self.log), 1.0)


def test_rounds_alternate_between_systems_and_warmup_is_dropped():
    log: list[str] = []
    jobs = [Job(RecordingWorker(name, log), [1], 2) for name in "ABC"]
    run_alternating(jobs, rounds=3, warmup=1, pause_s=0)
    # Forward, then backward: over each pair of rounds every system's mean position is the same.
    assert log == list("ABCCBAABCCBA")
    assert [len(j.rounds) for j in jobs] == [3, 3, 3]
    assert jobs[0].rounds[0].ttft_s == pytest.approx(0.6)  # the 6th call overall, not the warm-up
    assert jobs[2].rounds[0].ttft_s == pytest.approx(0.4)


# -- the worker process --------------------------------------------------------------------

def _worker(label: str, **options) -> WorkerProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return WorkerProcess(label, local_worker_argv("test_bench:SleepyEngine", options), env=env)


def test_worker_reports_its_own_peak_rss():
    with _worker("small") as small, _worker("big", hold_mb=200) as big:
        assert small.generate([5, 6], 4) == [0, 1, 2, 3]
        small_round = small.measure([1, 2, 3], 3)
        big_round = big.measure([1, 2, 3], 3)
        assert big.ready["model_bytes"] == 1234 and big.ready["name"] == "sleepy"
    small_growth = small_round.peak_rss_bytes - small.ready["peak_rss_bytes"]
    big_growth = big_round.peak_rss_bytes - big.ready["peak_rss_bytes"]
    assert small_growth < 50 * MB
    # The ready message's peak already covers some memory the allocator reuses: allow for it.
    assert 150 * MB < big_growth < 260 * MB
    assert big_round.new_tokens == 3 and big_round.decode_tps is not None


def test_worker_peak_rss_is_not_inherited_from_its_parent():
    # Linux hands ru_maxrss down through fork + exec: a parent that once held a lot of memory
    # must not make its workers look big.
    held = b"\x01" * (300 * MB)
    with _worker("small") as small:
        assert small.ready["peak_rss_bytes"] < 200 * MB
    del held


def test_worker_failure_is_reported_with_its_stderr():
    with pytest.raises(BenchError, match="exited with code 1(.|\n)*no 'NoSuchEngine'"):
        WorkerProcess("broken", local_worker_argv("nomoat.runtime.bench:NoSuchEngine", {})).start()


@pytest.mark.parametrize(("sig", "said"), [("SIGKILL", "was killed by SIGKILL (out of memory? check dmesg):"),
                                           ("SIGSEGV", "was killed by SIGSEGV:")])
def test_a_worker_killed_by_a_signal_is_said_so_by_name(sig, said):
    # The kernel's out-of-memory killer leaves nothing on the worker's stderr: the signal is all there is.
    worker = WorkerProcess("doomed", [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{sig})"])
    with pytest.raises(BenchError) as e:
        worker.start()
    assert f"worker doomed ({sys.executable} -c import os, signal; os.kill(os.getpid(), signal.{sig}) ...) {said}" \
        in str(e.value)
    assert "code -" not in str(e.value)


def test_the_worker_reports_the_versions_of_its_engines_libraries():
    from importlib.metadata import version

    with _worker("versioned", libraries=["nomoat", "no-such-distribution"]) as worker:
        assert worker.ready["libraries"] == {"nomoat": version("nomoat"), "no-such-distribution": None}
    with _worker("plain") as worker:  # an engine that names none
        assert worker.ready["libraries"] == {}


def test_lines_before_the_ready_message_are_skipped():
    """A wrapper, conda or pyenv printing a notice on stdout before the worker starts (a board's python)."""
    worker = _worker("noisy")
    worker.argv = ["sh", "-c", 'echo "conda: base environment activated"; echo; echo "[1, 2]"; exec "$@"', "sh",
                   *worker.argv]
    with worker:
        assert worker.ready["name"] == "sleepy"
        assert worker.generate([5, 6], 4) == [0, 1, 2, 3]


def test_a_line_that_is_no_message_after_ready_is_a_one_line_error():
    fake = ("import json, sys; print(json.dumps({'event': 'ready', 'name': 'x'}), flush=True); "
            "sys.stdin.readline(); print('oops, not JSON', flush=True); sys.stdin.readline()")
    with WorkerProcess("garbled", [sys.executable, "-c", fake]) as worker:
        with pytest.raises(BenchError) as e:
            worker.measure([1, 2], 2)
    said = str(e.value)
    assert "\n" not in said and "worker garbled printed 'oops, not JSON'" in said and "'round' was expected" in said


def test_a_worker_that_dies_after_a_notice_shows_the_notice():
    worker = WorkerProcess("broken", ["sh", "-c", 'echo "pyenv: python3: command not found"; exit 127'])
    with pytest.raises(BenchError, match="exited with code 127:\nbefore it, on stdout: pyenv: python3: command"):
        worker.start()


# -- deadlines: a worker that hangs is killed, not waited on forever (a board's worker over ssh) --

def test_a_worker_silent_past_its_deadline_is_killed_and_said_so():
    stopped = []
    worker = _worker("stuck", prefill_s=60)  # its first token would come a minute into the round
    worker.argv = ["sh", "-c", 'echo "the board is swapping" >&2; exec "$@"', "sh", *worker.argv]
    worker.stop_hung = stopped.append
    with worker:
        assert worker.pid == worker._proc.pid  # sh exec'd the worker: its announced pid is the process's
        began = time.monotonic()
        worker.deadline = began + 1.0
        with pytest.raises(WorkerOverdue) as e:
            worker.measure([1, 2, 3], 3)
        waited = time.monotonic() - began
        assert worker._proc.poll() is not None  # killed, not left running
    assert 1.0 <= waited < 10
    assert str(e.value) == (f"worker stuck (pid {worker.pid}) sent no reply by the deadline, in round 1 (the warm-up "
                            "counted), and was stopped; the end of its stderr:\nthe board is swapping")
    assert stopped == [worker.pid]  # where a kill here does not reach it (ssh), it is killed where it ran


def test_a_worker_that_never_loads_is_given_up_at_the_deadline():
    stopped = []
    hangs = ("import json, os, time; print(json.dumps({'event': 'started', 'pid': os.getpid()}), flush=True); "
             "time.sleep(60)")
    worker = WorkerProcess("loading", [sys.executable, "-c", hangs], deadline=time.monotonic() + 1.0,
                           stop_hung=stopped.append)
    with pytest.raises(WorkerOverdue, match=r"^worker loading \(pid \d+\) sent no reply by the deadline, "
                                            r"loading its model, and was stopped\.$"):
        worker.start()
    assert worker._proc.poll() is not None and stopped == [worker._proc.pid] == [worker.pid]
    worker.close()


def test_replies_already_read_are_not_waited_for_again():
    """Two messages in one write, and one message in two writes: every reply is there by its deadline,
    whether it came with the one before it or split in half."""
    fake = ("import json, sys, time; "
            "ready = json.dumps({'event': 'ready', 'name': 'x'}); "
            "tokens = json.dumps({'event': 'tokens', 'ids': [7]}); "
            "sys.stdout.write(ready + '\\n' + tokens + '\\n'); sys.stdout.flush(); sys.stdin.readline(); "
            "sys.stdout.write(tokens[:9]); sys.stdout.flush(); time.sleep(0.3); sys.stdout.write(tokens[9:] + '\\n'); "
            "sys.stdout.flush(); sys.stdin.readline(); time.sleep(60)")
    worker = WorkerProcess("chunked", [sys.executable, "-c", fake], deadline=time.monotonic() + 20)
    with worker:
        assert worker.ready == {"event": "ready", "name": "x"}
        began = time.monotonic()
        assert worker.generate([1], 1) == [7]  # the second line of the first write
        assert time.monotonic() - began < 5  # taken from what was read, not waited on until the deadline
        assert worker.generate([1], 1) == [7]  # a line in two pieces
        worker.deadline = time.monotonic() + 0.5
        with pytest.raises(WorkerOverdue, match="generating its answer 3"):
            worker.generate([1], 1)


def test_a_reply_in_the_pipe_at_the_deadline_is_taken():
    fake = ("import json, sys, time; print(json.dumps({'event': 'ready', 'name': 'x'}), flush=True); time.sleep(0.2); "
            "print(json.dumps({'event': 'tokens', 'ids': [7]}), flush=True); "
            "any('quit' in line for line in sys.stdin)")  # ends at its quit
    with WorkerProcess("punctual", [sys.executable, "-c", fake], deadline=time.monotonic() + 30) as worker:
        time.sleep(1.5)  # its reply is written by now, and not yet read
        worker.deadline = time.monotonic() - 1  # and the deadline has passed
        assert worker.generate([1], 1) == [7]


def test_a_worker_closed_while_busy_is_killed_at_once_where_it_runs():
    """Ctrl-C or an error while a round runs: the worker is not asked to quit (it would answer after its
    round, or never if it hangs) but killed, here and where it runs."""
    stopped = []
    worker = _worker("busy", prefill_s=60)
    worker.stop_hung = stopped.append
    worker.start()
    worker._command({"cmd": "round", "prompt_ids": [1, 2], "new_tokens": 2})  # its reply is a minute away
    proc, began = worker._proc, time.monotonic()
    worker.close()
    assert time.monotonic() - began < 10 and proc.poll() is not None
    assert stopped == [worker.pid]


def test_a_worker_that_exits_by_itself_is_not_killed_again():
    stopped = []
    worker = WorkerProcess("broken", [sys.executable, "-c", "import json, os; print(json.dumps("
                                      "{'event': 'started', 'pid': os.getpid()}), flush=True); raise SystemExit(3)"],
                           stop_hung=stopped.append)
    with pytest.raises(BenchError, match="exited with code 3"):
        worker.start()
    worker.close()
    assert worker.pid is not None and stopped == []  # over ssh: no kill sent to a board whose worker is gone


def test_a_worker_that_ignores_quit_is_killed_where_it_runs(monkeypatch):
    monkeypatch.setattr(WorkerProcess, "QUIT_WAIT_S", 0.5)
    stopped = []
    deaf = ("import json, os, time; print(json.dumps({'event': 'started', 'pid': os.getpid()}), flush=True); "
            "print(json.dumps({'event': 'ready', 'name': 'x'}), flush=True); time.sleep(60)")  # never reads its quit
    worker = WorkerProcess("deaf", [sys.executable, "-c", deaf], stop_hung=stopped.append)
    worker.start()
    proc = worker._proc
    began = time.monotonic()
    worker.close()
    assert time.monotonic() - began < 10 and proc.poll() is not None
    assert stopped == [proc.pid]


# -- the CLI -------------------------------------------------------------------------------

def _sleepy_worker(config: Config) -> WorkerProcess:
    return _worker(config.label, prefill_s=0.01 * config.threads, per_token_s=0.002)


def _assert_rows_own_rounds(result: dict, mark: int) -> None:
    """Every round of a report row carries the mark its own worker's engine was given, and the row's
    summary is of those rounds: no row was measured, or summarized, with another row's worker."""
    assert {(r["drafted_tokens"], r["accepted_tokens"]) for r in result["rounds"]} == {(mark, 0)}
    rounds = [RoundResult.from_dict(r) for r in result["rounds"]]
    assert result["summary"] == json.loads(json.dumps(report_summary(rounds)))


def test_report_is_one_json_object_and_a_table(capsys):
    # Each row's worker has a name, a mark on its rounds and a prefill sleep of its own (10 ms at 1 thread,
    # 100 ms at 2). No speeds are compared: a busy machine stretches a sleep by tens of ms, but never shortens it.
    prefill_s = {1: 0.01, 2: 0.1}

    def worker(config: Config) -> WorkerProcess:
        return _worker(config.label, name=f"sleepy {config.threads}", mark=config.threads,
                       prefill_s=prefill_s[config.threads], per_token_s=0.002)

    configs = [Config(1, 16, 4), Config(2, 16, 4)]
    report = measure_configs(configs, lambda c: list(range(16)), worker, rounds=2, warmup=1, pause_s=0)
    parsed = json.loads(json.dumps({"bundle": "fake", **report}))
    assert [r["threads"] for r in parsed["results"]] == [1, 2]
    for r in parsed["results"]:
        assert r["prompt_tokens"] == 16 and r["new_tokens"] == 4 and len(r["rounds"]) == 2
        assert r["model_bytes"] == 1234 and r["name"] == f"sleepy {r['threads']}"
        _assert_rows_own_rounds(r, mark=r["threads"])
        # A sleep never ends early: no TTFT is shorter than the row's prefill sleep, so no prefill rate is
        # above 16 tokens in it (a TTFT that missed the prefill, or the 2-thread row timed on the
        # 1-thread worker, would be).
        sleep = prefill_s[r["threads"]]
        assert r["summary"]["ttft_ms"]["min"] >= 1000 * sleep and r["summary"]["prefill_tps"]["max"] <= 16 / sleep
        assert r["summary"]["decode_tps"]["min"] <= r["summary"]["decode_tps"]["median"]
    table = format_table(parsed)
    assert "prefill tok/s" in table and len(table.splitlines()) == 5


def _ceiling_worker(config: Config) -> WorkerProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    options = {"threads": config.threads, "per_token_s": 0.005}
    return WorkerProcess(config.label, local_worker_argv("test_bench:CeilingEngine", options), env=env)


def test_decode_is_set_against_the_bandwidth_measured_at_each_rows_threads():
    probed = []

    def probe(threads):
        probed.append(list(threads))
        return {t: t * 1e9 for t in threads}  # 1 GB/s a thread: ceilings of 100 and 200 tokens/s

    configs = [Config(1, 16, 4), Config(2, 16, 4), Config(2, 32, 4)]
    report = measure_configs(configs, lambda c: list(range(c.prompt_tokens)), _ceiling_worker, rounds=2,
                             warmup=0, pause_s=0, probe=probe)
    assert probed == [[1, 2]]  # once, before the rounds, at each thread count
    report = json.loads(json.dumps({"bundle": "fake", **report}))
    assert report["read_bandwidth_bytes_per_s"] == {"1": 1e9, "2": 2e9}
    assert [decode_ceiling(r, report["read_bandwidth_bytes_per_s"]) for r in report["results"]] == [100, 200, 200]
    lines = format_table(report).splitlines()
    assert lines[2].endswith("of ceiling")
    for line, r, ceiling in zip(lines[3:6], report["results"], [100, 200, 200], strict=True):
        # ~200 tokens/s of 5 ms sleeps: about twice the 1-thread ceiling, the 2-thread one
        assert line.endswith(f"{r['summary']['decode_tps']['median'] / ceiling:.0%}")
    note = "\n".join(lines[-2:])
    assert "read where the rounds ran: 1.0 GB/s at 1 thread, 2.0 GB/s at 2 threads" in note
    assert "10 MB of weights a token" in note


def test_cli_chart_gets_each_rows_ceiling(monkeypatch, capsys, tmp_path):
    import argparse

    import nomoat.runtime.bench_plot as bench_plot
    import nomoat.runtime.cli_bench as cli_bench

    report = measure_configs([Config(1, 16, 4), Config(2, 16, 4)], lambda c: list(range(16)), _ceiling_worker,
                             rounds=1, warmup=0, pause_s=0, probe=lambda threads: {1: 1e9, 2: 3e9})
    monkeypatch.setattr(cli_bench, "bench_bundles", lambda args: {"bundle": "fake", "bundles": ["fake"], **report})
    drawn = {}
    monkeypatch.setattr(bench_plot, "plot_summaries",
                        lambda entries, out, title, **kw: drawn.update(entries=entries, out=out, **kw) or out)
    assert cli_bench.run(argparse.Namespace(json=False, plot=tmp_path / "c.png")) == 0
    assert drawn["ceilings"] == [100, 300]  # 1 and 3 GB/s over the engine's 10 MB a token
    assert len(drawn["entries"]) == 2 and drawn["out"] == tmp_path / "c.png"
    assert "of ceiling" in capsys.readouterr().out


def test_a_probe_without_memory_costs_the_column_not_the_run(monkeypatch, capsys):
    import nomoat.runtime.bandwidth as bandwidth
    from nomoat.runtime.cli_bench import local_bandwidth

    def no_memory(threads, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(bandwidth, "read_bandwidth", no_memory)
    report = measure_configs([Config(1, 16, 4)], lambda c: list(range(16)), _ceiling_worker, rounds=1, warmup=0,
                             pause_s=0, probe=local_bandwidth)
    assert "read_bandwidth_bytes_per_s" not in report and len(report["results"][0]["rounds"]) == 1
    assert "no memory for the bandwidth probe" in capsys.readouterr().err


def _threads_worker(threads_of: dict[str, int]):
    """Workers whose engine, asked no thread count, resolves each bundle's own, as NomoatEngine does."""
    def make(config: Config) -> WorkerProcess:
        options = {"threads": config.threads or threads_of[config.bundle]}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        return WorkerProcess(config.label, local_worker_argv("test_bench:CeilingEngine", options), env=env)
    return make


def test_the_table_shows_the_thread_count_each_bundle_resolved_and_warns_when_they_differ(capsys):
    cpus = os.cpu_count()
    configs = [Config(None, 16, 4, bundle="host"), Config(None, 16, 4, bundle="pixel6")]
    report = measure_configs(configs, lambda c: list(range(16)), _threads_worker({"host": 1, "pixel6": cpus + 2}),
                             rounds=1, warmup=0, pause_s=0)
    err = capsys.readouterr().err
    lines = format_table({"bundles": ["host", "pixel6"], **report}).splitlines()
    assert [re.split(r"\s{2,}", line)[:2] for line in lines[3:5]] == [["host", "default (1)"],
                                                                      ["pixel6", f"default ({cpus + 2})"]]
    assert (f"warning: pixel6 runs {cpus + 2} threads (its own count, from the target it was converted for) on "
            f"{cpus} CPU{'s' if cpus > 1 else ''}: they take turns on the cores and every number comes out low; "
            f"give --threads {cpus}") in err
    assert (f"warning: the bundles run thread counts of their own (host: 1, pixel6: {cpus + 2}), so their rows "
            "differ in threads as well as in recipe; give --threads N to compare the recipes alone") in err
    assert err.index("warning: the bundles") < err.index("round 1")  # said before the rounds, not after
    # Given --threads, every bundle runs it: nothing to warn about, and the table shows the number.
    report = measure_configs([Config(1, 16, 4, bundle="host"), Config(1, 16, 4, bundle="pixel6")],
                             lambda c: list(range(16)), _threads_worker({}), rounds=1, warmup=0, pause_s=0)
    assert "thread" not in capsys.readouterr().err.split("round 1")[0]
    assert [re.split(r"\s{2,}", line)[1] for line in format_table({"bundles": ["host", "pixel6"],
                                                                    **report}).splitlines()[3:5]] == ["1", "1"]


def test_a_row_whose_rounds_kept_few_cores_busy_is_flagged_as_measured_on_a_busy_machine(capsys):
    # CeilingEngine sleeps through its rounds: a thread that waits is what other work on the cores looks like.
    report = measure_configs([Config(2, 16, 4)], lambda c: list(range(16)), _ceiling_worker, rounds=2, warmup=0,
                             pause_s=0)
    (r,) = report["results"]
    cores = min(2, os.cpu_count())
    assert r["contended"] is True and r["cores_busy"] < 0.2 and (r["threads_used"], r["cores"]) == (2, cores)
    err = capsys.readouterr().err
    assert (f"warning: 2 thr, 16+4 tok: its rounds kept a median {r['cores_busy']:.2f} of the {cores} "
            f"core{'s' if cores > 1 else ''} its threads can use busy: the machine was busy with other work, so these "
            "numbers are low; measure again when it is idle") in err
    assert json.loads(json.dumps(report))["results"][0]["contended"] is True


def test_contention_is_fewer_busy_cores_than_most_of_the_threads():
    from nomoat.runtime.bench import contended, median_cores_busy, usable_cores

    assert not contended(1.95, 2) and not contended(1.6, 2) and contended(1.5, 2) and contended(0.7, 1)
    assert not contended(None, 2) and not contended(0.1, None)  # unknown is no finding
    # Four threads on two CPUs keep two cores busy at most: too many threads is a warning of its own.
    assert usable_cores(4, 2) == 2 and usable_cores(2, 8) == 2 and usable_cores(2, None) == 2
    assert usable_cores(None, 8) is None
    busy = [RoundResult(16, 4, 0.5, 0.5, cpu_s=c) for c in (1.9, 1.0, 2.0, 1.95)]
    assert median_cores_busy(busy) == pytest.approx(1.925) and median_cores_busy([_round(0.1, 1.0)]) is None


def test_no_ceiling_without_an_engine_that_counts_its_bytes():
    probed = []
    report = measure_configs([Config(1, 16, 4)], lambda c: list(range(16)), _sleepy_worker, rounds=1, warmup=0,
                             pause_s=0, probe=lambda threads: probed.append(threads) or {1: 1e9})
    assert probed == [] and "read_bandwidth_bytes_per_s" not in report
    assert "ceiling" not in format_table({"bundle": "fake", **report})


def test_prompt_lookup_rows_stand_apart_from_plain_ones():
    configs = [Config(1, 16, 4), Config(1, 16, 4, prompt_lookup=3)]
    report = measure_configs(configs, lambda c: list(range(16)), _sleepy_worker, rounds=1, warmup=0, pause_s=0)
    assert [r["prompt_lookup"] for r in report["results"]] == [0, 3]
    assert [r["label"] for r in report["results"]] == ["1 thr, 16+4 tok", "1 thr, 16+4 tok, lookup 3"]
    header, plain, lookup = format_table({"bundle": "fake", **report}).splitlines()[2:]
    assert header.split()[3] == "lookup"
    assert plain.split()[3] == "-" and lookup.split()[3] == "3"
    # Without lookup rows the table keeps its columns.
    assert "lookup" not in format_table({"bundle": "fake", **measure_configs(
        configs[:1], lambda c: list(range(16)), _sleepy_worker, rounds=1, warmup=0, pause_s=0)})


def test_lookup_rows_say_how_many_drafts_were_kept_a_round():
    def row(lookup: int, counts: list[tuple[int, int] | None]) -> dict:
        rounds = [RoundResult(16, 4, 0.1, 0.1, drafted_tokens=c[0] if c else None,
                              accepted_tokens=c[1] if c else None).to_dict() for c in counts]
        return {"prompt_lookup": lookup, "rounds": rounds}

    assert format_drafts(row(8, [(10, 6), (20, 14)])) == "10/15"  # kept/drafted, the mean of the rounds
    assert format_drafts(row(0, [None, None])) == "-"
    assert format_drafts(row(8, [None])) == "-"  # a peer that does not say
    # Rounds travel as JSON (worker, adb): the counts survive it.
    r = RoundResult(16, 4, 0.1, 0.1, drafted_tokens=7, accepted_tokens=3)
    assert RoundResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_bundles_compared_in_one_run_keep_their_rows_apart():
    # Two "bundles" whose engines differ only in their name and the mark they put on each round: each row
    # must be measured by its own worker, on its own prompt, and carry its bundle's name to the table.
    marks = {"int4-a": 1, "int4-b": 2}
    prompts = {"int4-a": list(range(16)), "int4-b": list(range(100, 116))}
    asked: list[tuple[str, list[int]]] = []

    def prompt_for(config: Config) -> list[int]:
        asked.append((config.bundle, prompts[config.bundle]))
        return prompts[config.bundle]

    def worker(config: Config) -> WorkerProcess:
        return _worker(config.label, name=f"sleepy {config.bundle}", mark=marks[config.bundle], per_token_s=0.002)

    configs = [Config(1, 16, 6, bundle=name) for name in marks]
    report = measure_configs(configs, prompt_for, worker, rounds=2, warmup=0, pause_s=0)
    assert asked == [(name, prompts[name]) for name in marks]
    assert [(r["bundle"], r["label"], r["name"]) for r in report["results"]] == [
        ("int4-a", "int4-a: 1 thr, 16+6 tok", "sleepy int4-a"), ("int4-b", "int4-b: 1 thr, 16+6 tok", "sleepy int4-b")]
    for r in json.loads(json.dumps(report))["results"]:
        assert len(r["rounds"]) == 2
        _assert_rows_own_rounds(r, marks[r["bundle"]])
    lines = format_table({"bundles": ["int4-a", "int4-b"], **report}).splitlines()
    assert lines[0].startswith("nomoat bench int4-a int4-b on ")
    assert lines[2].split()[:2] == ["bundle", "threads"]
    assert [line.split()[0] for line in lines[3:]] == ["int4-a", "int4-b"]


def test_ort_options_are_configurations_of_their_own():
    # Each set of ONNX Runtime options is its own worker and row, named in the label and the table.
    marks = {(): 1, (("mlas.disable_kleidiai", "1"),): 2}
    configs = [Config(1, 16, 6, ort_options=o) for o in marks]
    report = measure_configs(configs, lambda c: list(range(16)),
                             lambda c: _worker(c.label, mark=marks[c.ort_options], per_token_s=0.002),
                             rounds=2, warmup=0, pause_s=0)
    assert [r["label"] for r in report["results"]] == ["1 thr, 16+6 tok", "1 thr, 16+6 tok, mlas.disable_kleidiai=1"]
    assert [r.get("ort_options") for r in report["results"]] == [None, {"mlas.disable_kleidiai": "1"}]
    for r, mark in zip(json.loads(json.dumps(report))["results"], marks.values(), strict=True):
        assert len(r["rounds"]) == 2
        _assert_rows_own_rounds(r, mark)
    lines = format_table({"bundle": "fake", **report}).splitlines()
    assert re.split(r"\s{2,}", lines[2])[:2] == ["ONNX Runtime options", "threads"]
    assert [line.split()[0] for line in lines[3:]] == ["-", "mlas.disable_kleidiai=1"]


def test_cli_refuses_the_same_ort_options_twice_and_a_bad_one(tmp_path, capsys):
    from nomoat.__main__ import main

    assert main(["bench", str(tmp_path), "--ort-options", "mlas.use_lut_gemm=1,mlas.disable_kleidiai=1",
                 "--ort-options", " mlas.disable_kleidiai=1, mlas.use_lut_gemm=1"]) == 1
    assert "the same --ort-options are given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["bench", str(tmp_path), "--ort-options", "lut=1"])
    assert exit_.value.code == 2
    assert "'lut' is not an ONNX Runtime session config key" in capsys.readouterr().err


def test_cli_refuses_the_same_bundle_twice(tmp_path, capsys):
    from nomoat.__main__ import main

    (tmp_path / "sub").mkdir()
    assert main(["bench", str(tmp_path), str(tmp_path / "sub" / "..")]) == 1  # one folder, two spellings
    assert "the same bundle is named twice" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--threads", "--prompt-tokens", "--new-tokens"])
def test_cli_refuses_the_same_count_twice(tmp_path, capsys, flag):
    """It would measure one configuration twice, in rows that look like an A/B."""
    from nomoat.__main__ import main

    assert main(["bench", str(tmp_path), flag, "4", flag, "8", flag, "4"]) == 1
    err = capsys.readouterr().err
    assert err == f"nomoat bench: error: {flag} 4 is given twice; to repeat a measurement, raise --rounds\n"


def test_cli_refuses_a_negative_prompt_lookup(tmp_path, capsys):
    from nomoat.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", str(tmp_path), "--prompt-lookup", "-1"])
    assert exit_.value.code == 2
    assert "'-1' is not a number of drafted tokens: give 0 (off) or more" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from tiny_models import tiny_fp32_bundle

    return tiny_fp32_bundle(tmp_path_factory, max_context=96)


@pytest.mark.slow  # builds a tiny bundle (torch): ~8 s
def test_cli_json_on_a_real_bundle(tiny_bundle, tmp_path):
    cmd = [sys.executable, "-m", "nomoat", "bench", str(tiny_bundle), "--threads", "1", "--threads", "2",
           "--prompt-tokens", "16", "--new-tokens", "4", "--rounds", "2", "--warmup", "0", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["threads"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["prompt_tokens"] == 16 and r["new_tokens"] == 4 and len(r["rounds"]) == 2
        assert r["model_bytes"] > 0
        assert r["summary"]["peak_rss_mb"]["median"] > 10
    # The ceiling: the bundle's own count of its bytes a token, this machine's bandwidth at each
    # row's threads, measured in the parent (so no worker's peak RSS holds the probe's buffer).
    per_token = json.loads((tiny_bundle / "manifest.json").read_text())["onnx"]["weight_bytes_per_token"]
    assert [(r["weight_bytes_per_token"], r["threads_used"]) for r in report["results"]] == [(per_token, 1),
                                                                                             (per_token, 2)]
    assert set(report["read_bandwidth_bytes_per_s"]) == {"1", "2"}
    assert all(r["summary"]["peak_rss_mb"]["median"] < 200 for r in report["results"])
    cmd.append("--no-ceiling")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "read_bandwidth_bytes_per_s" not in json.loads(out.stdout), out.stderr


@pytest.mark.slow  # the tiny bundle, as above
def test_cli_measures_prompt_lookup_next_to_plain_decoding(tiny_bundle):
    cmd = [sys.executable, "-m", "nomoat", "bench", str(tiny_bundle), "--threads", "1", "--prompt-tokens", "16",
           "--new-tokens", "8", "--prompt-lookup", "3", "--rounds", "1", "--warmup", "0", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)["results"]
    assert [(r["prompt_lookup"], r["new_tokens"], len(r["rounds"])) for r in results] == [(0, 8, 1), (3, 8, 1)]


@pytest.mark.slow  # the tiny bundle, as above
def test_cli_compares_bundles_in_alternating_rounds(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    cmd = [sys.executable, "-m", "nomoat", "bench", str(tiny_bundle), str(copy), "--threads", "1",
           "--prompt-tokens", "16", "--new-tokens", "4", "--rounds", "2", "--warmup", "0"]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["bundles"] == [str(tiny_bundle), str(copy)] and "bundle" not in report
    assert [(r["bundle"], len(r["rounds"])) for r in report["results"]] == [(str(tiny_bundle), 2), (str(copy), 2)]
    # The progress lines show the rounds alternating between the two workers.
    rounds = [line.split(": round")[0].strip() for line in out.stderr.splitlines() if ": round" in line]
    assert rounds == [f"{b}: 1 thr, 16+4 tok" for b in (tiny_bundle, copy, copy, tiny_bundle)]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.split("\n\n")[1].splitlines()  # the table between its heading and the ceiling's note
    assert [line.split()[0] for line in rows] == ["bundle", str(tiny_bundle), str(copy)]


@pytest.mark.slow  # the tiny bundle, as above
def test_cli_compares_ort_options_in_alternating_rounds(tiny_bundle):
    cmd = [sys.executable, "-m", "nomoat", "bench", str(tiny_bundle), "--threads", "1", "--prompt-tokens", "16",
           "--new-tokens", "4", "--rounds", "2", "--warmup", "0", "--json",
           "--ort-options", "none", "--ort-options", "session.intra_op.allow_spinning=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [(r.get("ort_options"), len(r["rounds"])) for r in report["results"]] == [
        (None, 2), ({"session.intra_op.allow_spinning": "0"}, 2)]
    rounds = [line.split(": round")[0].strip() for line in out.stderr.splitlines() if ": round" in line]
    plain, spinning = "1 thr, 16+4 tok", "1 thr, 16+4 tok, session.intra_op.allow_spinning=0"
    assert rounds == [plain, spinning, spinning, plain]


@pytest.mark.slow
def test_cli_refuses_a_run_longer_than_the_context(tiny_bundle, capsys):
    from nomoat.__main__ import main

    assert main(["bench", str(tiny_bundle), "--prompt-tokens", "90", "--new-tokens", "10"]) == 1
    assert "exceed the bundle's context of 96 tokens" in capsys.readouterr().err


@pytest.mark.slow  # the tiny bundle, as above
@pytest.mark.parametrize("damage", ["missing", "broken"])
def test_cli_names_a_missing_or_broken_tokenizer_instead_of_a_traceback(tiny_bundle, tmp_path, capsys, damage):
    import shutil

    from nomoat.__main__ import main

    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))
    tokenizer = copy / "tokenizer.json"
    if damage == "missing":
        tokenizer.unlink()
    else:
        tokenizer.write_text(tokenizer.read_text()[:100])
    assert main(["bench", str(copy), "--prompt-tokens", "16", "--new-tokens", "4", "--rounds", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nomoat bench: error: the bundle's tokenizer file {tokenizer} ")
    assert err.endswith("copy the bundle again or re-convert it.\n") and "Traceback" not in err


def test_cli_refuses_bad_counts_before_loading_anything(tmp_path, capsys):
    from nomoat.__main__ import main

    assert main(["bench", str(tmp_path), "--new-tokens", "1"]) == 1
    assert "--new-tokens must be >= 2" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(("plot", "problem"), [
    ("no-such-folder/chart.png", "the folder {tmp}/no-such-folder does not exist; create it first"),
    ("chart.txt", "matplotlib cannot write .txt files; end the name with one of "),
])
def test_cli_checks_the_chart_path_before_measuring(tmp_path, capsys, plot, problem):
    pytest.importorskip("matplotlib")
    from nomoat.__main__ import main

    # tmp_path is no bundle: the chart's problem is said first, before any bundle is read or measured.
    assert main(["bench", str(tmp_path), "--plot", str(tmp_path / plot)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nomoat bench: error: --plot {tmp_path / plot}: {problem.format(tmp=tmp_path)}")
    assert ".png" in err and "\n" not in err.rstrip("\n")


@pytest.mark.parametrize(("plot", "problem"), [
    ("charts", "that is a folder; name a file in it, e.g. {tmp}/charts/chart.png"),
    ("charts.png", "that is a folder; name a file in it"),
    ("notes.txt/chart.png", "{tmp}/notes.txt is a file, not a folder; name a file in a folder"),
    ("chart.png", "this user cannot write there; name a file in a folder you can write to"),
])
def test_cli_refuses_a_chart_path_savefig_would_fail_on_before_measuring(tmp_path, capsys, monkeypatch, plot,
                                                                          problem):
    pytest.importorskip("matplotlib")
    import nomoat.runtime.bench_plot as bench_plot
    from nomoat.__main__ import main

    (tmp_path / "charts").mkdir()
    (tmp_path / "charts.png").mkdir()
    (tmp_path / "notes.txt").write_text("")
    if plot == "chart.png":  # an unwritable folder; root may write anywhere, so ask os.access as a user would
        monkeypatch.setattr(bench_plot.os, "access", lambda path, mode: Path(path) != tmp_path)
    # tmp_path is no bundle: the chart's problem is said first, in one line, before anything is measured.
    assert main(["bench", str(tmp_path), "--plot", str(tmp_path / plot)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nomoat bench: error: --plot {tmp_path / plot}: {problem.format(tmp=tmp_path)}"), err
    assert "\n" not in err.rstrip("\n")


def test_a_chart_savefig_cannot_write_after_the_rounds_is_an_error_not_a_traceback(monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    import argparse
    import shutil

    import nomoat.runtime.cli_bench as cli_bench

    report = measure_configs([Config(1, 16, 4)], lambda c: list(range(16)), _sleepy_worker, rounds=1, warmup=0,
                             pause_s=0)

    def folder_gone_while_measuring(args):
        shutil.rmtree(tmp_path / "charts")
        return {"bundle": "fake", "bundles": ["fake"], **report}

    (tmp_path / "charts").mkdir()
    monkeypatch.setattr(cli_bench, "bench_bundles", folder_gone_while_measuring)
    assert cli_bench.run(argparse.Namespace(json=False, plot=tmp_path / "charts" / "c.png")) == 1
    captured = capsys.readouterr()
    assert "decode" in captured.out  # the measurements are out before the chart fails
    assert captured.err.endswith(f"\nnomoat bench: error: --plot {tmp_path / 'charts' / 'c.png'}: the chart cannot be "
                            "written (No such file or directory); the measurements are printed above\n"), captured.err


def test_a_chart_named_without_a_suffix_is_a_png_and_said_so(monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    import argparse

    import nomoat.runtime.cli_bench as cli_bench

    report = measure_configs([Config(1, 16, 4)], lambda c: list(range(16)), _sleepy_worker, rounds=1, warmup=0,
                             pause_s=0)
    monkeypatch.setattr(cli_bench, "bench_bundles", lambda args: {"bundle": "fake", "bundles": ["fake"], **report})
    assert cli_bench.run(argparse.Namespace(json=False, plot=tmp_path / "chart")) == 0
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "chart").exists()
    assert capsys.readouterr().err.endswith(f"chart written to {tmp_path / 'chart.png'}\n")


def test_the_table_heading_counts_rounds_in_words_and_says_the_peak_includes_the_load():
    report = measure_configs([Config(1, 16, 4)], lambda c: list(range(16)), _sleepy_worker, rounds=1, warmup=1,
                             pause_s=0)
    heading = format_table({"bundle": "fake", **report}).splitlines()[0]
    assert "; 1 round after 1 warm-up, median (min–max)" in heading
    assert "peak RSS: the worker's peak since it started, the model's load included" in heading


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from nomoat.runtime.bench_plot import plot_summaries

    s = summarize([_round(0.1, 1.0, rss=100 * MB), _round(0.2, 1.2, rss=110 * MB)])
    out = plot_summaries([("a", s), ("b", s)], tmp_path / "chart.png", "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_marks_each_decode_bar_with_its_ceiling():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from nomoat.runtime.bench_plot import draw_summaries

    s = summarize([_round(0.1, 1.0, rss=100 * MB), _round(0.2, 1.2, rss=110 * MB)])
    fig = draw_summaries([("a", s), ("b", s), ("c", s)], "test", ceilings=[500.0, None, 800.0])
    decode, *others = fig.axes
    assert decode.get_title().startswith("Decode")
    (marks,) = decode.collections[1:]  # after the whiskers: one dashed mark per known ceiling, none for "b"
    segments = [value for seg in marks.get_segments() for value in seg.ravel()]
    assert segments == pytest.approx([-0.4, 500, 0.4, 500, 1.6, 800, 2.4, 800])  # (x0, y, x1, y) each
    assert decode.get_ylim()[1] >= 800  # the highest mark stays in view above bars far below it
    assert {"500", "800"} <= {t.get_text() for t in decode.texts}
    assert decode.get_legend().get_texts()[0].get_text() == "read-bandwidth ceiling"
    assert all(ax.get_legend() is None and len(ax.collections) <= 1 for ax in others)
    plt.close(fig)
    with pytest.raises(ValueError, match="2 ceilings for 3 entries"):
        draw_summaries([("a", s), ("b", s), ("c", s)], "test", ceilings=[1.0, 2.0])


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    from nomoat.runtime.bench_plot import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BenchError, match="pip install matplotlib"):
        require_matplotlib()


def test_the_machine_counts_the_cpus_this_process_may_use(monkeypatch):
    """Under `taskset -c 0` (or a container's --cpuset-cpus) the report said 2 CPUs, and a 2-thread run's
    slowdown was put down to other work rather than to the one CPU it had."""
    import os

    from nomoat.runtime.bench import machine_info

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert machine_info()["cpus"] == 1
