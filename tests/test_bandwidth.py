"""The bandwidth-ceiling arithmetic of benchmarks/bandwidth.py (numbers, not speed)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.weight_bytes import int8_packed_size
from nomoat.runtime.bandwidth import read_bandwidth
from nomoat.runtime.manifest import GRAPH_IO, OnnxBackend, read_manifest
from tiny_models import make_tiny_hf_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bandwidth import bytes_per_token, ceiling_table  # noqa: E402


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
    # MatMulNBits weights count as ONNX Runtime pre-packs them for int8 activations: 24 bytes a
    # 32-weight block (codes, float32 scale, float32 block sum) in place of the file's codes,
    # scales and zero points.
    model_nodes = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.node
    matmuls = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} | {"inputs": n.input[1:4]}
               for n in model_nodes if n.op_type == "MatMulNBits"]
    assert matmuls and all(m["accuracy_level"] == 4 and m["block_size"] == 32 for m in matmuls)
    file_bytes = sum(sizes[i] for m in matmuls for i in m["inputs"] if i)
    packed_bytes = sum(m["N"] * (m["K"] // 32) * 24 for m in matmuls)
    expected = sum(sizes.values()) - sum(sizes[n] for n in lookup_only) - file_bytes + packed_bytes
    assert bytes_per_token(bundle) == expected
    # the converter writes the same count into the manifest, for devices without the onnx package
    assert read_manifest(bundle).onnx.weight_bytes_per_token == expected
    assert packed_bytes > file_bytes  # the block sums cost more than the zero points they replace


def _matmul_nbits(**attrs) -> onnx.NodeProto:
    return onnx.helper.make_node("MatMulNBits", ["a", "b", "s", "z"], ["y"], domain="com.microsoft", **attrs)


def test_packed_size_of_one_matmul():
    # N=8 outputs, K=100 inputs in blocks of 32: 4 blocks a row (the last one padded), 24 bytes each.
    node = _matmul_nbits(K=100, N=8, bits=4, block_size=32, accuracy_level=4)
    assert int8_packed_size(node) == 8 * 4 * 24
    # Blocks of 64: 32 bytes of codes and 8 of scale and sum.
    assert int8_packed_size(_matmul_nbits(K=128, N=3, bits=4, block_size=64, accuracy_level=4)) == 3 * 2 * 40
    # float activations (level 0) and 8-bit codes keep their file layout
    assert int8_packed_size(_matmul_nbits(K=64, N=8, bits=4, block_size=32)) is None
    assert int8_packed_size(_matmul_nbits(K=64, N=8, bits=8, block_size=32, accuracy_level=4)) is None


def test_ceiling_table_divides_bandwidth_by_bytes():
    results = [{"system": "a", "threads": 2, "summary": {"decode_tps": {"median": 50.0}}}]
    table = ceiling_table(results, {"a": 100_000_000}, {2: 10e9})
    assert "| a | 2 | 10.0 | 100 | 100 | 50.0 | 50% |" in table


def test_read_bandwidth_is_a_plausible_rate():
    bw = read_bandwidth(1, megabytes=64, passes=2)
    assert 1e8 < bw < 1e12  # between 0.1 GB/s and 1 TB/s


def test_read_bandwidth_takes_the_fastest_pass_of_the_fastest_kernel(monkeypatch):
    # A kernel bound by its own arithmetic must not set the ceiling, nor a pass that something else slowed:
    # fakes that take known times on a fake clock (exact, whatever else the machine is doing).
    import nomoat.runtime.bandwidth as bandwidth

    now = [0.0]
    monkeypatch.setattr(bandwidth, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def taking(*seconds: float):
        times = itertools.cycle(seconds)

        def kernel(chunk):
            now[0] += next(times)
        return kernel

    # Binary fractions of a second, so the clock's sums are exact. The fast kernel's second pass is the best,
    # whether that kernel runs first or last.
    for slow_first in (True, False):
        slow, fast = taking(0.5), taking(0.25, 0.0625, 0.125)
        kernels = (slow, fast) if slow_first else (fast, slow)
        assert read_bandwidth(1, megabytes=8, passes=3, kernels=kernels) == 8 * 2**20 / 0.0625


def test_bandwidth_command_prints_one_json_line(capsys):
    from nomoat.runtime.bandwidth import main

    assert main(["1", "2", "--megabytes", "8"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    rates = json.loads(out)
    assert list(rates) == ["1", "2"] and all(1e8 < r < 1e12 for r in rates.values())
    with pytest.raises(SystemExit):
        main(["0"])


# Every graph name the runtime binds (the KV ones per layer), as the converter writes them.
IO = {name: f"{name}.{{layer}}" if name.startswith(("past", "present")) else name for name in GRAPH_IO}


@pytest.mark.parametrize("bad", [0, -5, "90 MB", 1.5, True])
def test_manifest_refuses_a_count_that_is_not_bytes(bad):
    d = {"model_file": "model.onnx", "data_file": None, "io": IO, "weight_bytes_per_token": bad}
    with pytest.raises(ValueError, match="weight_bytes_per_token"):
        OnnxBackend.from_dict(d)


def test_manifest_without_the_count_is_an_older_bundle():
    d = {"model_file": "model.onnx", "data_file": None, "io": IO}
    assert OnnxBackend.from_dict(d).weight_bytes_per_token is None
    assert OnnxBackend.from_dict({**d, "weight_bytes_per_token": 101_525_240}).weight_bytes_per_token == 101_525_240
