"""Give back the file pages ONNX Runtime read while it loaded the weights.

ONNX Runtime memory-maps the bundle's weight file, reads every tensor once to pre-pack it for
its kernels (the packed copy lives on the heap), and keeps the mapping. The pages it read stay
resident and count in the process's RSS, which is what a phone's low-memory killer looks at:
on SmolLM2-135M ~32 MB (the LM head's codes, which the embedding lookup shares, and every
block's scales), of which generation brings ~2 MB back (see below).

MADV_PAGEOUT (Linux >= 5.4) asks the kernel to reclaim them now. It never loses data: clean
file pages are re-read from the file on the next touch, and a page the process has written
(copy-on-write) is only ever swapped, never dropped. Where it is not available (another OS,
an older kernel, a file the user does not own, a page another mapping shares, such as a second
model of the same bundle in the process) it does nothing, and nothing else changes.

What comes back while generating (embedding rows, rotary table rows) should come back a page
at a time. Two things stand in the way: read-ahead around each touch, and the page cache still
holding the file in the large folios the load read it into, each of which a touch maps whole
(one embedding row brought back ~1 MB). So the mappings are also marked MADV_RANDOM, and the
file's now unmapped clean pages are dropped from the page cache (POSIX_FADV_DONTNEED: a page
that another process maps, or that is dirty, stays). SmolLM2 after 256 tokens: 2 MB of the file
resident instead of 9 (measured). The cost: a token's first lookup reads its row from storage.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

MADV_RANDOM = 1
MADV_PAGEOUT = 21


def release_file_pages(path: str | Path) -> int:
    """Advise the kernel to reclaim this process's resident pages of the mapped file `path`.

    Returns the bytes of mappings advised (0 where unsupported).
    """
    if not sys.platform.startswith("linux"):
        return 0
    target = os.path.realpath(path)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end in _mappings_of(target):
        madvise(start, end - start, MADV_RANDOM)  # only a hint: nothing to do if refused
        if madvise(start, end - start, MADV_PAGEOUT) != 0:
            return advised  # EINVAL: this kernel has no MADV_PAGEOUT; no point trying the rest
        advised += end - start
    if advised:
        _drop_cached_pages(target)
    return advised


def _drop_cached_pages(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass  # only advice: the pages then simply come back as the kernel caches them
    finally:
        os.close(fd)


def resident_bytes_of(path: str | Path) -> int:
    """RSS of this process that comes from mappings of `path` (from /proc/self/smaps)."""
    target = os.path.realpath(path)
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    inside = _mapped_path(line) == target
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def _mappings_of(target: str) -> list[tuple[int, int]]:
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if _mapped_path(line) == target:
                    start, end = (int(x, 16) for x in line.split(" ", 1)[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def _mapped_path(maps_line: str) -> str | None:
    fields = maps_line.rstrip("\n").split(maxsplit=5)
    return fields[5] if len(fields) == 6 else None


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc's malloc_trim); False where there is none.

    Loading leaves freed holes in the middle of the heap that free() alone never gives back:
    parsing tokenizer.json (~6 MB for SmolLM2's, ~14 MB with pair merges) and ONNX Runtime's load-time buffers (~5 MB).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim(0)
    return True
