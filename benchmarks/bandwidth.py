"""How close decode is to the memory-bandwidth ceiling: the bench's table of it.

The bandwidth is measured by nomoat.runtime.bandwidth and the bytes a token reads are counted by
nomoat.converter.weight_bytes (their docstrings say how); this module applies them to every
system of a bench run, ONNX Runtime GenAI's graph included, and counts a GGUF's tensors for llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

from nomoat.converter.weight_bytes import weight_bytes_per_token


def bytes_per_token(bundle: Path) -> int:
    """Weight bytes one decode step of the graph in a bundle (or GenAI's folder) reads."""
    return weight_bytes_per_token(Path(bundle) / "model.onnx")


def ceiling_table(results: list[dict], bytes_read: dict[str, int], bandwidth: dict[int, float]) -> str:
    """Markdown: each system's decode against bandwidth / bytes per token at its thread count (dashes for a
    system that was not timed: run.py times none that answered its check wrong)."""
    lines = ["| system | threads | read GB/s | MB read per token | ceiling t/s | decode t/s | of ceiling |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        bw, per_token = bandwidth[r["threads"]], bytes_read[r["system"]]
        ceiling = bw / per_token
        decode = r["summary"]["decode_tps"]["median"] if r.get("summary") else None
        measured = "– | –" if decode is None else f"{decode:.1f} | {decode / ceiling:.0%}"
        lines.append(f"| {r['system']} | {r['threads']} | {bw / 1e9:.1f} | {per_token / 1e6:.0f} | {ceiling:.0f} "
                     f"| {measured} |")
    return "\n".join(lines)


def gguf_tensor_bytes(gguf_file: Path) -> int:
    """The bytes of a GGUF's tensors: what a llama.cpp decode step can read, not the file's metadata (the
    vocabulary mostly: ~1.8 MB of SmolLM2's 92 MB file), which is read once, at load."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(gguf_file).tensors)
