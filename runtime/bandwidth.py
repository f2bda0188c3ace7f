"""Memory read bandwidth, for the ceiling decode cannot pass.

Decoding one token of a small model reads (nearly) every weight once, so tokens/s can never
exceed  read bandwidth / bytes of weights read per token.  This module measures the first on
the machine it runs on (a workstation, a Pi over ssh); the converter counts the second into
the bundle's manifest (converter/weight_bytes.py).

`threads` Python threads each reduce their own slice of a buffer far larger than the last-level
cache (numpy's reductions release the GIL, so the threads run on the cores in parallel). Best of
several passes and of several reductions: the ceiling, not a typical value. One reduction is not
enough: on an AMD EPYC (Zen 5) one core sums float64 at 20 GB/s, bound by the additions, while
a bitwise OR or a max over the same bytes reads 36-38 GB/s.

    python -m nomoat.runtime.bandwidth 1 2     # {"1": bytes/s, "2": bytes/s} on one line
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Far past any last-level cache this runtime meets (32 MB on the x86 hosts measured, 2 MB on a
# Pi 5), and small enough for a board with 1 GB.
DEFAULT_MEGABYTES = 256


def _sum(chunk: np.ndarray) -> None:
    np.sum(chunk)


def _bitwise_or(chunk: np.ndarray) -> None:
    np.bitwise_or.reduce(chunk.view(np.uint64))


def _max(chunk: np.ndarray) -> None:
    np.max(chunk)


# Reductions that do little work a byte, so one of them is bound by the memory on any CPU: a
# float sum carries a chain of dependent additions, an integer OR and a max do not.
READ_KERNELS = (_sum, _bitwise_or, _max)


def read_bandwidth(threads: int, megabytes: int = DEFAULT_MEGABYTES, passes: int = 5,
                   kernels=READ_KERNELS) -> float:
    """Bytes/s that `threads` threads read from memory (best of `passes` of each kernel)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if megabytes < 1:
        raise ValueError(f"megabytes must be >= 1, got {megabytes}")
    data = np.ones(megabytes * 2**20 // 8, np.float64)  # written once, so the pages are real
    slices = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for kernel in kernels:
            for _ in range(passes):
                start = time.perf_counter()
                list(pool.map(kernel, slices))
                best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nomoat.runtime.bandwidth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("threads", type=int, nargs="+", help="thread counts to measure with")
    parser.add_argument("--megabytes", type=int, default=DEFAULT_MEGABYTES, help="buffer size (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.threads) < 1:
        parser.error("thread counts must be >= 1")
    if args.megabytes < 1:
        parser.error(f"--megabytes must be >= 1 (got {args.megabytes}); the buffer should be far larger than the "
                     f"last-level cache, e.g. the default {DEFAULT_MEGABYTES}")
    print(json.dumps({str(t): read_bandwidth(t, args.megabytes) for t in args.threads}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
