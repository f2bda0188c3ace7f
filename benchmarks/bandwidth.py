"""How close decode is to the memory-bandwidth ceiling.

Decoding one token of a small model reads (nearly) every weight once, so tokens/s can never
exceed  read bandwidth / bytes read per token.  This module measures the first on this
machine and counts the second in a bundle.

- Bandwidth: `threads` Python threads each sum their own slice of a buffer far larger than
  the last-level cache (numpy's reductions release the GIL, so the threads run on the cores in
  parallel). Best of several passes: the ceiling, not a typical value.
- Bytes per token: every initializer of the bundle's graph except what only the embedding
  lookup reads (it touches one row per token). Measured on the file's layout; ONNX Runtime
  repacks MatMulNBits weights at load (adding per-block sums for int8 activations), so what it
  really streams is a few percent more and the ratio slightly understates our efficiency.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def read_bandwidth(threads: int, megabytes: int = 512, passes: int = 5) -> float:
    """Bytes/s that `threads` threads read from memory (best of `passes`)."""
    data = np.ones(megabytes * 2**20 // 8, np.float64)  # written once, so the pages are real
    slices = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            start = time.perf_counter()
            list(pool.map(np.sum, slices))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def bytes_per_token(bundle: Path) -> int:
    """Weight bytes one decode step reads: the graph's initializers minus the embedding's own."""
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
    total = 0
    for t in model.graph.initializer:
        if t.name in lookup_only:
            continue
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if ext else len(t.raw_data)
    return total


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
