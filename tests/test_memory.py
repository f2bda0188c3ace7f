"""Runtime memory levers: chunked prefill and handing back the weight file's pages."""

from __future__ import annotations

import gc
import mmap
import os
import sys

import numpy as np
import pytest
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.runtime import Model
from nomoat.runtime.manifest import read_manifest
from nomoat.runtime.model import GenerationStats
from nomoat.runtime.pages import release_file_pages, resident_bytes_of
from tiny_models import make_tiny_hf_dir

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    hf = make_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")
    out = {}
    for quant in ("fp32", "int4"):
        out[quant] = convert(ConvertOptions(model=str(hf), out=tmp_path_factory.mktemp(quant) / "bundle",
                                            quant=quant, max_context=256, progress=False, skip_verify=True))
    return out


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_chunked_prefill_gives_the_logits_of_one_pass(bundles, quant):
    whole = Model.load(bundles[quant], prefill_chunk=4096)
    chunked = Model.load(bundles[quant], prefill_chunk=7)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 200, size=50)]
    runs = []
    forward = chunked.session.forward
    chunked.session.forward = lambda chunk, **kw: runs.append(len(chunk)) or forward(chunk, **kw)
    a = whole._prefill(ids, GenerationStats())
    b = chunked._prefill(ids, GenerationStats())
    assert runs == [7] * 7 + [1]  # 50 tokens: seven chunks of 7, then the last one
    assert chunked.session.tokens == ids
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    # And generation continues from the same cache.
    assert list(whole.generate_tokens(ids, 8)) == list(chunked.generate_tokens(ids, 8))


def test_prefill_chunk_must_be_positive(bundles):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Model.load(bundles["fp32"], prefill_chunk=0)


def _write_synced(path, data: bytes) -> None:
    # Pages still waiting to be written back are not reclaimed; a bundle is synced when written.
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _pageout_works(tmp_path) -> bool:
    path = tmp_path / "probe.bin"
    _write_synced(path, b"\1" * (1 << 20))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as m:
        sum(m[i] for i in range(0, len(m), 4096))
        return release_file_pages(path) > 0 and resident_bytes_of(path) == 0


@linux_only
def test_released_pages_leave_rss_and_no_data_is_lost(tmp_path):
    if not _pageout_works(tmp_path):
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(1).integers(0, 255, size=4 << 20, dtype=np.uint8).tobytes()
    _write_synced(path, data)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as m:
        assert m[:] == data  # every page read once, as pre-packing does
        assert resident_bytes_of(path) >= len(data)
        m[4096:4100] = b"COW!"  # a page the process wrote: private to it, must survive
        assert release_file_pages(path) >= len(data)
        assert resident_bytes_of(path) <= 4096  # at most the written page stays
        assert m[4096:4100] == b"COW!"
        assert m[:4096] == data[:4096] and m[8192:] == data[8192:]  # clean pages come back from the file


@linux_only
@pytest.mark.parametrize("drop_cache", [True, False])
def test_pages_touched_after_release_come_back_one_at_a_time(tmp_path, monkeypatch, drop_cache):
    """Looking up a few rows of a released table (the embedding while generating) must not map
    back the large page-cache folios the load read the file into."""
    if not _pageout_works(tmp_path):
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    import nomoat.runtime.pages as pages

    if not drop_cache:  # what the runtime did before: shows this kernel maps folios back whole
        monkeypatch.setattr(pages, "_drop_cached_pages", lambda path: None)
    path = tmp_path / "table.bin"
    data = np.random.default_rng(2).integers(0, 255, size=16 << 20, dtype=np.uint8).tobytes()
    _write_synced(path, data)
    with open(path, "rb") as f:
        assert f.read() == data  # the load's checksum check reads the whole file into the page cache
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as m:
        assert m[: 1 << 20] == data[: 1 << 20]  # and pre-packing reads tensors through the mapping
        pages.release_file_pages(path)
        assert resident_bytes_of(path) == 0
        rows = [(3 << 20) + 100, (9 << 20) + 5000, (14 << 20) + 77]
        assert [m[i] for i in rows] == [data[i] for i in rows]
        back = resident_bytes_of(path)
    if drop_cache:
        assert back <= len(rows) * 2 * 4096, f"{back} bytes came back for {len(rows)} touched pages"
    elif back <= len(rows) * 2 * 4096:
        pytest.skip("this kernel maps touched pages back one at a time anyway")


@linux_only
def test_model_load_hands_back_the_weight_file_pages(bundles, tmp_path):
    if not _pageout_works(tmp_path):
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    from nomoat.runtime.onnx_session import DecoderSession, SessionOptions

    bundle = bundles["int4"]
    manifest = read_manifest(bundle)
    data_file = bundle / manifest.onnx.data_file
    session = DecoderSession(bundle, manifest, SessionOptions(release_file_pages=False))
    held = resident_bytes_of(data_file)
    assert held > 0, "pre-packing read the weight file: its pages should be resident"
    kept_logits = session.forward([5, 6, 7]).copy()
    # The kernel leaves a page alone while two mappings share it, so the first session goes first.
    del session
    gc.collect()
    released = Model.load(bundle)  # the default: hands its pages back
    assert resident_bytes_of(data_file) < held / 4
    np.testing.assert_array_equal(released.session.forward([5, 6, 7]), kept_logits)


@linux_only
def test_trim_heap_gives_back_freed_holes():
    import ctypes
    import re

    from nomoat.runtime.pages import trim_heap

    def rss_mb():
        return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 KB blocks come from the heap (below malloc's mmap threshold); the last one pins its top,
    # so free() alone cannot shrink it: the freed blocks are holes, as after parsing a tokenizer.
    blocks = [libc.malloc(64 << 10) for _ in range(1200)]
    for b in blocks:
        ctypes.memset(b, 1, 64 << 10)
    for b in blocks[:-1]:
        libc.free(b)
    before = rss_mb()
    if not trim_heap():
        libc.free(blocks[-1])
        pytest.skip("this C library has no malloc_trim")
    after = rss_mb()
    libc.free(blocks[-1])
    assert before - after > 40  # ~75 MB of holes handed back
