"""How close decode is to the memory-bandwidth ceiling.

Decoding one token of a small model reads (nearly) every weight once, so tokens/s can never
exceed  read bandwidth / bytes read per token.  This module measures the first on this
machine and counts the second in a bundle.

- Bandwidth: `threads` Python threads each reduce their own slice of a buffer far larger than
  the last-level cache (numpy's reductions release the GIL, so the threads run on the cores in
  parallel). Best of several passes and of several reductions: the ceiling, not a typical value.
  One reduction is not enough: on an AMD EPYC (Zen 5) one core sums float64 at 20 GB/s, bound
  by the additions, while a bitwise OR or a max over the same bytes reads 36-38 GB/s.
- Bytes per token: every initializer of the bundle's graph except what only the embedding
  lookup reads (it touches one row per token), with each 4-bit MatMulNBits node counted as ONNX
  Runtime holds it after pre-packing, not as the file stores it: for int8 activations (accuracy
  level 4) MLAS keeps a float32 scale and a float32 block sum (the zero point folded in) beside
  each block's codes, 24 bytes a 32-weight block where the file has 20.5 (its layout on x86, and
  on ARM without KleidiAI). Counted from the file, a token would seem to read 15 % less.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _sum(chunk: np.ndarray) -> None:
    np.sum(chunk)


def _bitwise_or(chunk: np.ndarray) -> None:
    np.bitwise_or.reduce(chunk.view(np.uint64))


def _max(chunk: np.ndarray) -> None:
    np.max(chunk)


# Reductions that do little work a byte, so one of them is bound by the memory on any CPU: a
# float sum carries a chain of dependent additions, an integer OR and a max do not.
READ_KERNELS = (_sum, _bitwise_or, _max)


def read_bandwidth(threads: int, megabytes: int = 512, passes: int = 5, kernels=READ_KERNELS) -> float:
    """Bytes/s that `threads` threads read from memory (best of `passes` of each kernel)."""
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


def bytes_per_token(bundle: Path) -> int:
    """Weight bytes one decode step reads: the graph's initializers minus the embedding's own,
    MatMulNBits weights in ONNX Runtime's pre-packed layout (module docstring)."""
    import onnx

    model = onnx.load(str(Path(bundle) / "model.onnx"), load_external_data=False)
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
        if node.op_type == "MatMulNBits" and (size := _int8_packed_size(node)) is not None:
            packed |= {i for i in node.input[1:4] if i}  # codes, scales, zero points
            total += size
    for t in model.graph.initializer:
        if t.name in lookup_only or t.name in packed:
            continue
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if ext else len(t.raw_data)
    return total


def _int8_packed_size(node) -> int | None:
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


def ceiling_table(results: list[dict], bytes_read: dict[str, int], bandwidth: dict[int, float]) -> str:
    """Markdown: each system's decode against bandwidth / bytes per token at its thread count."""
    lines = ["| system | threads | read GB/s | MB read per token | ceiling t/s | decode t/s | of ceiling |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        bw, per_token = bandwidth[r["threads"]], bytes_read[r["system"]]
        ceiling = bw / per_token
        decode = r["summary"]["decode_tps"]["median"]
        lines.append(f"| {r['system']} | {r['threads']} | {bw / 1e9:.1f} | {per_token / 1e6:.0f} | {ceiling:.0f} "
                     f"| {decode:.1f} | {decode / ceiling:.0%} |")
    return "\n".join(lines)
