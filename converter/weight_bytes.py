"""Bytes of weights one decode step reads from memory, counted from an ONNX graph.

Every initializer except what only the embedding lookup reads (it touches one row per token),
with each 4-bit MatMulNBits node counted as ONNX Runtime holds it after pre-packing, not as the
file stores it: for int8 activations (accuracy level 4) MLAS keeps a float32 scale and a float32
block sum (the zero point folded in) beside each block's codes, 24 bytes a 32-weight block where
the file has 20.5. That is its layout on x86 and on ARM without KleidiAI; KleidiAI packs
symmetric blocks tighter, so there the count is a few percent high. Counted from the file, a
token would seem to read 15 % less. The bundle's manifest carries the count
(onnx.weight_bytes_per_token) so a device can set it against its own bandwidth
(runtime/bandwidth.py) without the onnx package.
"""

from __future__ import annotations

from pathlib import Path


def weight_bytes_per_token(model_file: str | Path) -> int:
    """Weight bytes one decode step of the graph in model_file reads (external data not loaded)."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    graph_inputs = {i.name for i in model.graph.input}
    lookup_only = set()
    nodes = list(model.graph.node)
    for k, node in enumerate(nodes):
        # The embedding lookup: a (quantized) Gather indexed by a graph input (the token ids).
        if node.op_type in ("Gather", "GatherBlockQuantized") and node.input[1] in graph_inputs:
            readers = nodes[:k] + nodes[k + 1:]
            # Inputs the lookup shares with another node (a tied LM head's codes) are read anyway.
            lookup_only |= {i for i in node.input if i and not any(i in n.input for n in readers)}
    packed, total = set(), 0
    for node in nodes:
        if node.op_type == "MatMulNBits" and (size := int8_packed_size(node)) is not None:
            packed |= {i for i in node.input[1:4] if i}  # codes, scales, zero points
            total += size
    for t in model.graph.initializer:
        if t.name in lookup_only or t.name in packed:
            continue
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if ext else len(t.raw_data)
    return total


def int8_packed_size(node) -> int | None:
    """Bytes of a 4-bit MatMulNBits node's weights as MLAS packs them for int8 activations: per
    block, the codes, a float32 scale and a float32 block sum. None for any other node."""
    attrs = {a.name: a for a in node.attribute}
    level = attrs["accuracy_level"].i if "accuracy_level" in attrs else 0
    bits = attrs["bits"].i if "bits" in attrs else 4
    if level != 4 or bits != 4:
        return None
    n, k, block = attrs["N"].i, attrs["K"].i, attrs["block_size"].i
    blocks = -(-k // block)
    return n * blocks * (block * bits // 8 + 4 + 4)
