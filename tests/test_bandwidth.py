"""The bandwidth-ceiling arithmetic of benchmarks/bandwidth.py (numbers, not speed)."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
from nomoat.converter.convert import ConvertOptions, convert
from tiny_models import make_tiny_hf_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bandwidth import bytes_per_token, ceiling_table, read_bandwidth  # noqa: E402


def _sizes(bundle: Path) -> dict[str, int]:
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if ext else len(t.raw_data)
    return sizes


@pytest.mark.parametrize("tie", [False, True])
def test_a_token_reads_every_weight_but_the_embedding_table(tmp_path, tie):
    model = make_tiny_hf_dir(tmp_path / "m", tie=tie)
    bundle = convert(ConvertOptions(model=str(model), out=tmp_path / "b", quant="int4", max_context=64,
                                    progress=False, skip_verify=True))
    sizes = _sizes(bundle)
    # (the Reshape after a shared lookup has its own 24-byte shape; it counts, as any small constant)
    lookup_only = [n for n in sizes if n.startswith("model.embed_tokens.") and not n.endswith("_shape")]
    assert lookup_only  # scales and zero points at least
    if tie:  # the lookup reads the LM head's codes, which the LM head reads anyway
        assert "model.embed_tokens.weight_Q4" not in sizes
    assert bytes_per_token(bundle) == sum(sizes.values()) - sum(sizes[n] for n in lookup_only)


def test_ceiling_table_divides_bandwidth_by_bytes():
    results = [{"system": "a", "threads": 2, "summary": {"decode_tps": {"median": 50.0}}}]
    table = ceiling_table(results, {"a": 100_000_000}, {2: 10e9})
    assert "| a | 2 | 10.0 | 100 | 100 | 50.0 | 50% |" in table


def test_read_bandwidth_is_a_plausible_rate():
    bw = read_bandwidth(1, megabytes=64, passes=2)
    assert 1e8 < bw < 1e12  # between 0.1 GB/s and 1 TB/s
