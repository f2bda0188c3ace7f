"""The oldest ONNX Runtime release that runs an exported graph; the manifest carries it.

A bundle outlives the ONNX Runtime it was made with: the Android app ships its own copy, a Pi
may have an older one. Without this number an old runtime fails deep inside ONNX Runtime
("com.microsoft:GatherBlockQuantized(-1) is not a registered function/op", "Only 4b
quantization is supported for MatMulNBits"); with it, a runtime refuses the bundle up front
and names the release to install.

Each floor below was found by running every kind of bundle this converter writes on the
releases before it (CPU kernels; 2026-11-27) and comparing the tokens: a release that loads a
graph can still compute it wrong. tests/test_ort_floor.py runs them again.
"""

from __future__ import annotations

from typing import Any

from nomoat.runtime.manifest import RUNTIME_ONNXRUNTIME_FLOOR, version_tuple

# What every graph holds: ONNX opset 21 (1.17 stops at 20), GroupQueryAttention with a KV buffer
# shared by past and present and rotary inside, the skip/simplified layer norms, 4-bit MatMulNBits.
# 1.18 and 1.19 load all that, and GroupQueryAttention computes a run of several new tokens on top
# of a filled cache wrong (found 2026-12-07; the floors below were checked with one short prompt,
# which never does that). The runtime does it for every prompt longer than a prefill chunk, every
# later turn of a chat and every prompt-lookup check, so no graph runs right before 1.20. The runtime
# holds the number: it refuses 1.18 and 1.19 also for bundles whose manifests name 1.18.0.
BASE_FLOOR = RUNTIME_ONNXRUNTIME_FLOOR
GATHER_FLOOR = "1.20.0"  # GatherBlockQuantized (the 4-bit embedding table) is not registered before
INT8_MATMUL_FLOOR = "1.22.0"  # MatMulNBits with bits=8 (earlier kernels accept 4 only)
# GatherBlockQuantized over uint8-packed 4-bit codes (the tied table, quantize_axis=2): 1.23 loads
# it, but up to 1.26 the zero points come out wrong once a row has more than two blocks (SmolLM2's
# 576-wide rows: wrong embeddings, nonsense text, while a 64-wide test model looked right).
PACKED_GATHER_FLOOR = "1.27.0"
# GroupQueryAttention with local_window_size (a sliding-window Mistral whose window is shorter than
# the cache): 1.20-1.23 run it and attend to one position more than the window (a sliding_window of
# 8 saw 9 positions); 1.24.1, the first 1.24 on PyPI, counts it as transformers does.
WINDOW_FLOOR = "1.24.1"
# GroupQueryAttention in fp16 (a float16 KV cache, `--kv-dtype float16`) needs nothing newer: the
# base floor computes it as 1.32 does (checked like the floors above).


def required_onnxruntime(model: Any) -> str:
    """The oldest release of ONNX Runtime whose CPU kernels run `model` (an onnx.ModelProto) right."""
    import onnx

    initializer_type = {t.name: t.data_type for t in model.graph.initializer}
    floors = [BASE_FLOOR]
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and _int_attribute(node, "bits", 4) == 8:
            floors.append(INT8_MATMUL_FLOOR)
        if node.op_type == "GroupQueryAttention" and _int_attribute(node, "local_window_size", -1) >= 0:
            floors.append(WINDOW_FLOOR)
        if node.op_type == "GatherBlockQuantized":
            packed = initializer_type.get(node.input[0]) == onnx.TensorProto.UINT8
            floors.append(PACKED_GATHER_FLOOR if packed else GATHER_FLOOR)
    return max(floors, key=version_tuple)


def _int_attribute(node: Any, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)
