"""Pre-packed weights into huge pages: fully resident ranges only, and no memory added."""

from __future__ import annotations

import mmap
import subprocess
import sys

import pytest
from nomoat.runtime.huge_pages import _huge_page_size, collapse_resident_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _smaps_of(address: int) -> dict[str, int]:
    """The kB fields of the mapping that holds `address`."""
    fields: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(" ", 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.rstrip().endswith(" kB"):
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0])
    return fields


def _anonymous(size: int) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    import ctypes

    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


@pytest.fixture
def huge():
    """The huge page size, where this kernel can collapse memory into huge pages (else skip)."""
    import ctypes

    size = _huge_page_size()
    if not size:
        pytest.skip("transparent huge pages are off here")
    probe, at = _anonymous(2 * size)
    probe[:] = b"\1" * len(probe)
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    supported = madvise(-(-at // size) * size, size, 25) == 0  # MADV_COLLAPSE, Linux >= 6.1
    probe.close()
    if not supported:
        pytest.skip("this kernel cannot collapse memory into huge pages (MADV_COLLAPSE, Linux >= 6.1)")
    return size


def test_fully_resident_ranges_move_to_huge_pages_and_nothing_else(huge):
    full, full_at = _anonymous(4 * huge)  # like pre-packed weights: every page written
    full[:] = b"\1" * len(full)
    sparse, sparse_at = _anonymous(4 * huge)  # like the KV cache: a few positions written
    for offset in range(0, len(sparse), 16 * 4096):
        sparse[offset] = 1
    rss_before = {at: _smaps_of(at)["Rss"] for at in (full_at, sparse_at)}
    assert collapse_resident_memory() >= 3 * huge
    # (The two mappings may have merged into one: the kernel keeps these counts per mapping.)
    assert {at: _smaps_of(at)["Rss"] for at in (full_at, sparse_at)} == rss_before  # no page added
    huge_kb = {at: _smaps_of(at)["AnonHugePages"] for at in (full_at, sparse_at)}
    assert huge_kb[full_at] >= 3 * huge // 1024  # the aligned huge pages inside it
    assert sum(set(huge_kb.values())) <= 4 * huge // 1024  # none in the sparse one
    assert full[:] == b"\1" * len(full)  # the data moved with the pages
    full.close()
    sparse.close()


def test_model_load_puts_the_weights_in_huge_pages(tmp_path, huge):
    from nomoat.converter.convert import ConvertOptions, convert
    from tiny_models import make_tiny_hf_dir

    # Tiny weights would not fill a huge page: this model's pre-packed weights take ~8 MB.
    hf = make_tiny_hf_dir(tmp_path / "hf", hidden_size=512, intermediate_size=1536, num_hidden_layers=2)
    bundle = convert(ConvertOptions(model=str(hf), out=tmp_path / "b", quant="int4", max_context=64,
                                    progress=False, skip_verify=True))
    # In a fresh process: this one has loaded and freed other models' weights.
    code = ("import sys\n"
            "def huge(): return next(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') "
            "if l.startswith('AnonHugePages:'))\n"
            "from nomoat.runtime import Model\n"
            "before = huge(); model = Model.load(sys.argv[1]); after = huge()\n"
            "assert next(model.generate_tokens([1, 2, 3], 3, ignore_eos=True)) >= 0\n"
            "print(before, after)")
    result = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    assert after - before >= huge // 1024
