"""The measuring core of `nomoat bench`: what a round measures and how rounds are summarized.

Kept apart from *where* an engine runs: an `Engine` only turns prompt ids into a stream of
token ids, `measure_once` times that stream, and `bench_worker` hosts one engine in its own
process (locally now; over adb or ssh later) so each engine's peak RSS is its own.

    prefill tok/s = prompt_tokens / ttft            (ttft = start -> first token)
    decode tok/s  = (new_tokens - 1) / (t_last - t_first)

The first token comes out of prefill, so decode counts only the tokens after it. Over rounds,
the median prefill rate is the prompt over the median TTFT, so the two always agree.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import BundleError

Clock = Callable[[], float]

# Plain prose, no markup: every engine that shares the tokenizer gets the same ids, and
# none of them hits a special token. Repeated until the prompt has the length asked for.
PROSE = (
    "The lighthouse keeper climbed the spiral stairs each evening before the sun went down. "
    "He trimmed the wick, polished the great lens and wrote the weather in a small notebook: "
    "the direction of the wind, the height of the waves, the ships that passed the point. "
    "In winter the storms came from the north and the glass rattled in its frame, but the light "
    "never failed. Children from the village sometimes walked out along the rocks to visit him, "
    "and he told them about the currents, the seabirds and the names of the stars over the bay."
)


class BenchError(Exception):
    """A benchmark could not measure what it was asked to (engine stopped early, worker died, ...)."""


@runtime_checkable
class Engine(Protocol):
    """One system under test. `run` must yield each token as soon as it exists and always
    produce exactly `new_tokens` of them (end-of-sequence ignored), from an empty cache."""

    name: str

    def prepare(self) -> None:
        """Load the model (not timed)."""

    def run(self, prompt_ids: Sequence[int], new_tokens: int) -> Iterator[int]:
        """Prefill the prompt, then decode greedily; yield every generated token id."""

    def reset(self) -> None:
        """Empty any cache so the next run prefills the whole prompt again."""

    def model_bytes(self) -> int | None:
        """Size on disk of the weights this engine loaded (None if unknown)."""

    # Optional: import_library() -> None imports the library that runs the model, without loading one,
    # so the worker's RSS before the model (rss_before_load_bytes) includes the library.
    # Optional, for the bandwidth ceiling (engines without them get no ceiling):
    #   weight_bytes_per_token() -> int | None: bytes of weights one decode step reads
    #   threads_used() -> int: the threads it decodes with
    # Optional, for the report: `libraries`, the distributions (pip names) whose versions say what ran.


@dataclass(frozen=True)
class RoundResult:
    """Timings of one prompt -> new_tokens run, plus the process's peak RSS after it."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_s: float  # from the first token to the last
    peak_rss_bytes: int | None = None
    # CPU seconds the process used in the round (all threads). Well below threads x wall time
    # means something else had the cores: the round measured contention, not the engine.
    cpu_s: float | None = None
    # Prompt lookup: tokens drafted and checked in the round, and how many the model kept (None
    # for plain decoding and for engines that do not say).
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def decode_tps(self) -> float | None:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else None

    @property
    def ttft_ms(self) -> float:
        return self.ttft_s * 1000.0

    @property
    def cpu_utilization(self) -> float | None:
        """Average busy cores during the round."""
        wall = self.ttft_s + self.decode_s
        return self.cpu_s / wall if self.cpu_s is not None and wall > 0 else None

    @property
    def peak_rss_mb(self) -> float | None:
        return self.peak_rss_bytes / 1e6 if self.peak_rss_bytes is not None else None

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_tps": self.prefill_tps, "decode_tps": self.decode_tps,
                "ttft_ms": self.ttft_ms, "peak_rss_mb": self.peak_rss_mb,
                "cpu_utilization": self.cpu_utilization}

    @classmethod
    def from_dict(cls, d: dict) -> RoundResult:
        return cls(prompt_tokens=int(d["prompt_tokens"]), new_tokens=int(d["new_tokens"]),
                   ttft_s=float(d["ttft_s"]), decode_s=float(d["decode_s"]),
                   peak_rss_bytes=d.get("peak_rss_bytes"), cpu_s=d.get("cpu_s"),
                   drafted_tokens=d.get("drafted_tokens"), accepted_tokens=d.get("accepted_tokens"))


def measure_once(engine: Engine, prompt_ids: Sequence[int], new_tokens: int,
                 clock: Clock = time.perf_counter) -> RoundResult:
    """Reset the engine (untimed), run it once and time its first and last token."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    engine.reset()
    count = 0
    t_first = t_last = 0.0
    cpu_start = time.process_time()
    start = clock()
    for _ in engine.run(prompt_ids, new_tokens):
        t_last = clock()
        if count == 0:
            t_first = t_last
        count += 1
    if count != new_tokens:
        raise BenchError(f"{engine.name} generated {count} tokens instead of {new_tokens}; an engine "
                         "under test must ignore end-of-sequence and run the full count "
                         "(is its context too small?)")
    # An engine that drafts may say how its drafts did (NomoatEngine.draft_counts).
    counts = engine.draft_counts() if callable(getattr(engine, "draft_counts", None)) else None
    drafted, accepted = counts if counts is not None else (None, None)
    return RoundResult(prompt_tokens=len(prompt_ids), new_tokens=new_tokens, ttft_s=t_first - start,
                       decode_s=t_last - t_first, peak_rss_bytes=peak_rss_bytes(),
                       cpu_s=time.process_time() - cpu_start, drafted_tokens=drafted, accepted_tokens=accepted)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    On Linux (and Android) this is VmHWM from /proc/self/status, not getrusage's ru_maxrss:
    Linux carries ru_maxrss over fork and execve, so a worker started by a parent that once
    held 1.4 GB reports 1.4 GB whatever it does itself. VmHWM belongs to the process's own
    address space, which execve starts afresh.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


# -- summaries -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class Summary:
    """Median, min and max of each metric over the rounds (None where no round had a value)."""

    rounds: int
    prefill_tps: Stat
    decode_tps: Stat | None
    ttft_ms: Stat
    peak_rss_mb: Stat | None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(rounds: Sequence[RoundResult]) -> Summary:
    if not rounds:
        raise ValueError("nothing to summarize: no rounds were measured")

    def stat(metric: str) -> Stat | None:
        values = [v for r in rounds if (v := getattr(r, metric)) is not None]
        return Stat.of(values) if values else None

    ttft = stat("ttft_ms")
    return Summary(len(rounds), prefill_tps=prefill_stat(rounds, ttft), decode_tps=stat("decode_tps"),
                   ttft_ms=ttft, peak_rss_mb=stat("peak_rss_mb"))


def prefill_stat(rounds: Sequence[RoundResult], ttft_ms: Stat) -> Stat:
    """Prefill tokens/s as the prompt over the TTFT's median, max and min, so the two columns always agree:
    over an even number of rounds a median of the rates averages the two middle rates, which is not the
    prompt over the median TTFT (the mean of the two middle times)."""
    prompts = {r.prompt_tokens for r in rounds}
    if len(prompts) != 1:
        raise ValueError(f"rounds of different prompt lengths ({sorted(prompts)}) have no one prefill rate")
    tokens_per_ms = prompts.pop() * 1000.0
    return Stat(tokens_per_ms / ttft_ms.median, min=tokens_per_ms / ttft_ms.max, max=tokens_per_ms / ttft_ms.min)


def process_peak_rss_mb(rounds: Sequence[RoundResult]) -> float | None:
    """The peak RSS of the process that ran the rounds: the largest reading, not their median. Each
    reading is the peak so far (VmHWM only grows within a process), so a median is some middle round's
    and understates the last."""
    values = [mb for r in rounds if (mb := r.peak_rss_mb) is not None]
    return max(values) if values else None


def report_summary(rounds: Sequence[RoundResult]) -> dict[str, Any]:
    """summarize(rounds) as a JSON report holds it, its peak RSS the process's peak (the largest reading) as
    median, min and max alike: each reading is the peak so far, so their median understates the peak and
    their spread is no spread of a measurement. The same number as the report's own peak_rss_mb."""
    peak = process_peak_rss_mb(rounds)
    return {**summarize(rounds).to_dict(), "peak_rss_mb": None if peak is None else asdict(Stat(peak, peak, peak))}


# A row whose rounds kept fewer cores busy than this share of the cores its threads can use ran beside other work.
BUSY_SHARE = 0.8


def median_cores_busy(rounds: Sequence[RoundResult]) -> float | None:
    """The median over the rounds of the cores each kept busy on average (None if none counted its CPU time)."""
    values = [u for r in rounds if (u := r.cpu_utilization) is not None]
    return statistics.median(values) if values else None


def usable_cores(threads: int | None, cpus: int | None) -> int | None:
    """The cores `threads` threads can keep busy: one each, up to the machine's CPUs (None if unknown)."""
    return min(threads, cpus) if threads and cpus else threads


def contended(cores_busy: float | None, cores: int | None) -> bool:
    """Whether the rounds kept well under the `cores` their threads can use busy: something else had the
    cores, so every number of the row is low. Unknown (no CPU time or no thread count) is no finding."""
    return cores_busy is not None and bool(cores) and cores_busy < BUSY_SHARE * cores


def contention_warning(label: str, cores_busy: float, cores: int) -> str:
    return (f"warning: {label}: its rounds kept a median {cores_busy:.2f} of the {plural(cores, 'core')} its "
            "threads can use busy: the machine was busy with other work, so these numbers are low; measure again "
            "when it is idle")


# -- prompts -------------------------------------------------------------------------------

def repeat_to_length(ids: Sequence[int], n: int) -> list[int]:
    """The first n ids of `ids` repeated end to end."""
    if not ids:
        raise ValueError("cannot build a prompt from an empty token list")
    return [ids[i % len(ids)] for i in range(n)]


def synthetic_prompt_ids(tokenizer_file: str | Path, n: int) -> list[int]:
    """Exactly n token ids of fixed prose, from a tokenizer.json: the same ids on every run."""
    ids = read_tokenizer(Path(tokenizer_file)).encode(PROSE, add_special_tokens=False).ids
    return repeat_to_length(ids, n)


def read_tokenizer(path: Path):  # -> tokenizers.Tokenizer
    """A bundle's tokenizer.json, or a BundleError naming the file when it is missing or damaged: the
    benchmark reads it before any worker has checked the bundle's files."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise BundleError(f"the bundle's tokenizer file {path} is missing; copy the bundle again or re-convert it.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for every problem of the file
        reason = " ".join(str(e).split())[:200]
        raise BundleError(f"the bundle's tokenizer file {path} cannot be read ({reason}); copy the bundle again "
                          "or re-convert it.") from e


def plural(n: int, noun: str) -> str:
    """'1 round', '2 rounds'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def machine_info() -> dict[str, object]:
    """Where a measurement ran, for the report (the worker sends its own: it may be a phone)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # Other load on the machine is the usual reason two runs disagree: record it.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"system": platform.system(), "machine": platform.machine(), "cpu": cpu,
            "cpus": usable_cpus(), "python": platform.python_version(), "load_average_1min": load}


def usable_cpus() -> int:
    """The CPUs this process may run on: taskset's or a container's --cpuset-cpus, not the machine's
    count (under `taskset -c 0` a 2-thread run's slowdown was put down to other work, not to one CPU)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# -- the nomoat engine ---------------------------------------------------------------------

class NomoatEngine:
    """nomoat.runtime on an ONNX bundle, greedy, end-of-sequence ignored. With `prompt_lookup`
    > 0 it decodes with prompt-lookup speculative decoding, up to that many drafted tokens per
    pass (greedy's tokens up to near-ties, fewer passes where the text repeats its context)."""

    libraries = ("nomoat", "onnxruntime")

    def __init__(self, bundle: str, threads: int | None = None, name: str | None = None,
                 prompt_lookup: int = 0, ort_options: dict[str, str] | None = None):
        if prompt_lookup < 0:
            raise ValueError(f"prompt_lookup must be >= 0 drafted tokens, got {prompt_lookup}")
        self.bundle = Path(bundle)
        self.threads = threads
        self.name = name or f"nomoat {self.bundle.name}"
        self.prompt_lookup = prompt_lookup
        self.ort_options = dict(ort_options or {})
        self.model = None
        self._stats = None  # the last run's GenerationStats, for draft_counts

    def import_library(self) -> None:
        import onnxruntime  # noqa: F401

        from . import model  # noqa: F401

    def prepare(self) -> None:
        from .model import Model

        self.model = Model.load(self.bundle, threads=self.threads, ort_options=self.ort_options)

    def run(self, prompt_ids: Sequence[int], new_tokens: int) -> Iterator[int]:
        from .sampling import SamplingParams

        if self.prompt_lookup:
            from .model import GenerationStats

            self._stats = GenerationStats()
            yield from self.model.generate_tokens_lookahead(list(prompt_ids), new_tokens,
                                                            draft_tokens=self.prompt_lookup, ignore_eos=True,
                                                            stats=self._stats)
        else:
            yield from self.model.generate_tokens(list(prompt_ids), new_tokens, params=SamplingParams(),
                                                  ignore_eos=True)

    def reset(self) -> None:
        # The model reuses the cached prefix of a repeated prompt: without this, prefill is free.
        self.model.session.reset()

    def draft_counts(self) -> tuple[int, int] | None:
        """(drafted, accepted) tokens of the last run with prompt lookup; None for plain decoding."""
        if not self.prompt_lookup or self._stats is None:
            return None
        return self._stats.drafted_tokens, self._stats.accepted_tokens

    def weight_bytes_per_token(self) -> int | None:
        return self.model.manifest.onnx.weight_bytes_per_token  # None for bundles older than the count

    def threads_used(self) -> int:
        # Model.load's own rule: the request, else the bundle's target, else ONNX Runtime's
        # default of one thread per core.
        return self.threads or self.model.manifest.target.get("threads") or os.cpu_count() or 1

    def model_bytes(self) -> int | None:
        onnx = self.model.manifest.onnx
        files = [onnx.model_file, onnx.data_file] if onnx.data_file else [onnx.model_file]
        return sum((self.bundle / f).stat().st_size for f in files)
