"""Estimate peak memory on the device before exporting, and compare it with the budget.

peak = weights as stored + KV cache at max context + activations of one prefill chunk
       + runtime overhead (ONNX Runtime, Python, tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConversionError
from .spec import ModelSpec
from .targets import Recipe, Target

MiB = 2**20
# Measured on this machine: the Python runtime with onnxruntime, numpy and tokenizers
# imported and a session open, before any weights, sits around this RSS.
RUNTIME_OVERHEAD_BYTES = 90 * MiB


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    budget: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_dict(self) -> dict[str, int]:
        return {"weights_bytes": self.weights, "kv_cache_bytes": self.kv_cache,
                "activations_bytes": self.activations, "overhead_bytes": self.overhead,
                "total_bytes": self.total, "budget_bytes": self.budget}


def _matrix_bytes(rows: int, cols: int, recipe: Recipe) -> int:
    """Stored size of a [rows, cols] weight quantized along cols in blocks."""
    if recipe.weights == "fp32":
        return rows * cols * 4
    bits = 8 if recipe.weights == "int8" else 4
    blocks = rows * -(-cols // recipe.block_size)
    # packed codes + one fp32 scale per block + a packed zero point per block
    return rows * cols * bits // 8 + blocks * 4 + blocks * bits // 8 + blocks % 2


def weight_bytes(spec: ModelSpec, recipe: Recipe) -> int:
    h, i, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * hd
    per_layer = (_matrix_bytes(qkv, h, recipe) + _matrix_bytes(h, spec.num_heads * hd, recipe)
                 + _matrix_bytes(2 * i, h, recipe) + _matrix_bytes(h, i, recipe) + 2 * h * 4)
    embed = (_matrix_bytes(spec.vocab_size, h, recipe) if recipe.quantize_embedding and recipe.weights == "int4"
             else spec.vocab_size * h * 4)
    lm_head = _matrix_bytes(spec.vocab_size, h, recipe)
    return spec.num_layers * per_layer + embed + lm_head + h * 4


def kv_cache_bytes(spec: ModelSpec, max_context: int) -> int:
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * max_context * 4


def activation_bytes(spec: ModelSpec, chunk: int) -> int:
    """Largest live tensors of one prefill chunk (fp32): hidden states, q|k|v, gate|up, attention scores."""
    per_token = 4 * (3 * spec.hidden_size + (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
                     + 3 * spec.intermediate_size)
    scores = 4 * spec.num_heads * chunk * chunk
    return chunk * per_token + scores + spec.vocab_size * 4


def estimate_memory(spec: ModelSpec, recipe: Recipe, target: Target, prefill_chunk: int = 512) -> MemoryEstimate:
    return MemoryEstimate(
        weights=weight_bytes(spec, recipe),
        kv_cache=kv_cache_bytes(spec, recipe.max_context),
        activations=activation_bytes(spec, min(prefill_chunk, recipe.max_context)),
        overhead=RUNTIME_OVERHEAD_BYTES,
        budget=target.memory_budget_bytes,
    )


def largest_fitting_context(spec: ModelSpec, recipe: Recipe, target: Target) -> int:
    """The largest power-of-two-ish context (multiple of 256) whose estimate fits, or 0."""
    best, ctx = 0, 256
    while ctx <= recipe.max_context:
        est = estimate_memory(spec, Recipe(**{**recipe.__dict__, "max_context": ctx}), target)
        if not est.fits:
            break
        best, ctx = ctx, ctx + 256
    return best


def check_fit(spec: ModelSpec, recipe: Recipe, target: Target) -> MemoryEstimate:
    est = estimate_memory(spec, recipe, target)
    if est.fits:
        return est
    over = est.total - est.budget
    hints = []
    ctx = largest_fitting_context(spec, recipe, target)
    if ctx:
        hints.append(f"--max-context {ctx} (or --fit shrink-context)")
    if recipe.weights != "int4":
        hints.append("--quant int4")
    hints.append("a smaller model")
    raise ConversionError(
        f"the model does not fit {target.name}: estimated peak {est.total / MiB:.0f} MiB (weights "
        f"{est.weights / MiB:.0f}, KV cache {est.kv_cache / MiB:.0f} at {recipe.max_context} tokens, activations "
        f"{est.activations / MiB:.0f}, runtime {est.overhead / MiB:.0f}) exceeds the budget of "
        f"{est.budget / MiB:.0f} MiB by {over / MiB:.0f} MiB. Try {', or '.join(hints)}."
    )
