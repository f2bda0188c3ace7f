"""Estimate peak memory on the device before exporting, and compare it with the budget.

    peak = runtime (Python, ONNX Runtime, tokenizer)
         + weights as stored in model.onnx.data (ONNX Runtime holds them in RAM, pre-packed),
           except the embedding table: after loading, the runtime hands the file's pages back
           and only the rows a prompt looks up return (at most a page per row per table)
         + max(the load transient, KV cache at max context + activations of one prefill chunk)

Every term is computed from the model's shape and the recipe; the constants below were
measured on this machine with nomoat.runtime: VmHWM of a fresh process that loads the bundle
and fills its whole context (a prompt of max_context - 64 tokens, then 64 new ones). For
SmolLM2-135M at 2048 tokens, estimate vs measured peak: int4 283 vs 285 MiB (-1 %), int8 343
vs 345 MiB (-1 %), fp32 720 vs 699 MiB (+3 %). tests/test_targets_real.py checks +-25 % on
host. The estimate is for a full context: a short chat touches only the part of the
preallocated KV cache and of the arena it uses, and sits well below it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import ConversionError
from .quantize import LM_HEAD_NODE, QuantRecipe
from .spec import ModelSpec
from .targets import Recipe, Target

MiB = 2**20

# Python + numpy + onnxruntime imported and an InferenceSession open, before any weights:
# 68 MiB after Model.load of a tiny model, 77 MiB once it has run (ONNX Runtime's arena and
# thread pool). Measured with the tiny test model, whose weights and tokenizer are negligible.
RUNTIME_BASE_BYTES = 77 * MiB

# The `tokenizers` library keeps the vocabulary and the merges in hash maps: SmolLM2's
# tokenizer.json (49,152 entries, merges as strings: converter/tokenizer_json.py) keeps 12.8 MiB
# once the heap is trimmed, ~275 bytes per entry. Its parse peaks at 20 MiB, but at load, before
# the KV cache fills, so the full-context peak sees only what it keeps.
TOKENIZER_BYTES_PER_TOKEN = 280

# The runtime prefills a prompt PREFILL_CHUNK tokens at a time (runtime/model.py), so ONNX
# Runtime's arena holds one chunk's activations, not the whole prompt's. Per chunk token:
# ARENA_FACTOR x the fp32 values a layer holds at once (_live_floats_per_token: 7,296 floats =
# 29 KB for SmolLM2), a factor measured (with one-pass prefills of 256 to 2,040 tokens) for the
# arena's bins, the kernels' scratch and the int8 copies of matmul inputs at accuracy level 4;
# plus GroupQueryAttention's score scratch, which is sized by the KV capacity, not the prompt:
# heads x chunk x max_context floats.
ARENA_FACTOR = 1.8

# After loading, the runtime hands the weight file's pages back to the kernel (runtime/pages.py);
# of the embedding table only the pages of rows a prompt looks up come back, a page per row of
# each table at most (Linux >= 5.4; measured for SmolLM2 at a full context: README, "Memory fit").
PAGE_BYTES = 4096

# What loading costs above the resident weights, in LM heads (see estimate_memory).
LOAD_TRANSIENT_FACTOR = 1.5


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # every initializer, as stored
    resident_weights: int  # what a full context keeps of them: the embedding only where looked up
    kv_cache: int
    activations: int
    load_transient: int  # the largest weight's copies while ONNX Runtime repacks it at load
    runtime: int
    budget: int
    max_context: int

    @property
    def total(self) -> int:
        return self.runtime + self.resident_weights + max(self.load_transient, self.kv_cache + self.activations)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_dict(self) -> dict[str, int]:
        return {"weights_bytes": self.weights, "resident_weights_bytes": self.resident_weights,
                "kv_cache_bytes": self.kv_cache,
                "activations_bytes": self.activations, "load_transient_bytes": self.load_transient,
                "runtime_bytes": self.runtime, "total_bytes": self.total, "budget_bytes": self.budget,
                "max_context": self.max_context}

    def summary(self) -> str:
        return (f"{self.total / MiB:.0f} MiB of {self.budget / MiB:.0f} MiB budget "
                f"(weights {self.resident_weights / MiB:.0f}, "
                f"KV cache {self.kv_cache / MiB:.0f} at {self.max_context} tokens, activations "
                f"{self.activations / MiB:.0f}, runtime {self.runtime / MiB:.0f})")


# --- weights as stored (mirrors the layouts quantize.py and ONNX Runtime write) ---------------


def matmul_nbits_bytes(n: int, k: int, bits: int, block_size: int, symmetric: bool = False) -> int:
    """MatMulNBits B of K inputs x N outputs: codes [N, k_blocks, block*bits/8], fp32 scale and
    uint8 zero point per block (4-bit zero points two per byte, each row padded to a byte; none
    when symmetric)."""
    k_blocks = -(-k // block_size)
    codes = n * k_blocks * block_size * bits // 8
    zero_points = 0 if symmetric else n * (k_blocks if bits == 8 else -(-k_blocks // 2))
    return codes + n * k_blocks * 4 + zero_points


def gather_block_quantized_bytes(vocab: int, hidden: int, block_size: int) -> int:
    """ONNX Runtime's 4-bit GatherBlockQuantized table: uint4 codes, fp32 scales, uint4 zero points."""
    blocks = vocab * -(-hidden // block_size)
    return -(-vocab * hidden // 2) + blocks * 4 + -(-blocks // 2)


def _linear_bytes(n: int, k: int, quant: QuantRecipe, role: str) -> int:
    if quant.weights == "fp32":
        return n * k * 4
    return matmul_nbits_bytes(n, k, quant.bits, quant.block_size, symmetric=role in quant.symmetric)


def weight_bytes(spec: ModelSpec, quant: QuantRecipe, max_context: int, kv_dtype: str = "float32") -> int:
    """Bytes of every initializer of the exported graph (model.onnx.data plus the small inline ones).
    The rotary tables feed the attention, so they are stored in the KV cache's element type."""
    h, i, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * hd
    per_layer = (_linear_bytes(qkv, h, quant, "qkv") + _linear_bytes(h, spec.num_heads * hd, quant, "o")
                 + _linear_bytes(2 * i, h, quant, "gate_up") + _linear_bytes(h, i, quant, "down")
                 + 2 * h * 4 + (qkv * 4 if spec.attention_bias else 0) + 16)  # norms, q|k|v bias, split sizes
    return (spec.num_layers * per_layer + _embedding_bytes(spec, quant) + lm_head_bytes(spec, quant)
            + h * 4 + 2 * max_context * (hd // 2) * _itemsize(kv_dtype))  # final norm, rotary cos/sin


def _embedding_bytes(spec: ModelSpec, quant: QuantRecipe) -> int:
    tables = sum(_stored_embedding_tables(spec, quant).values())
    if not _reads_lm_head_codes(spec, quant):
        return tables
    # int64 shapes: the Reshape's target; when blocks do not tile the hidden size, a Slice's start, end, axis
    shapes = 3 if spec.hidden_size % quant.block_size_for(LM_HEAD_NODE) == 0 else 6
    return tables + shapes * 8


def _stored_embedding_tables(spec: ModelSpec, quant: QuantRecipe) -> dict[str, int]:
    """_embedding_tables without what model.onnx.data holds once for the LM head too: a tied
    lookup's scales are the head's bytes (export_onnx.save_model stores equal bytes once)."""
    tables = _embedding_tables(spec, quant)
    if _reads_lm_head_codes(spec, quant):
        del tables["scales"]
    return tables


def _reads_lm_head_codes(spec: ModelSpec, quant: QuantRecipe) -> bool:
    return quant.quantize_embedding and quant.weights == "int4" and spec.tie_word_embeddings


def _embedding_tables(spec: ModelSpec, quant: QuantRecipe) -> dict[str, int]:
    """Bytes of each table stored for the embedding lookup alone."""
    v, h = spec.vocab_size, spec.hidden_size
    # Only the int4 recipe quantizes the table; otherwise it stays fp32.
    if not (quant.quantize_embedding and quant.weights == "int4"):
        return {"table": v * h * 4}
    if _reads_lm_head_codes(spec, quant):
        # The lookup reads the LM head's codes and its own scales (the head's bytes, in another
        # rank) and zero points (a byte per block), plus the reshape's target shape
        # (quantize._gather_from_lm_head).
        blocks = v * -(-h // quant.block_size_for(LM_HEAD_NODE))
        return {"scales": blocks * 4, "zero_points": blocks}
    blocks = v * -(-h // quant.block_size)
    return {"codes": -(-v * h // 2), "scales": blocks * 4, "zero_points": -(-blocks // 2)}


def resident_weight_bytes(spec: ModelSpec, quant: QuantRecipe, max_context: int, kv_dtype: str = "float32") -> int:
    """weight_bytes with each table the embedding lookup reads counted only for the pages of the
    rows a full context can look up (the pages of a row per table: one for rows up to a page, more
    for wider ones, e.g. an fp32 row of 2,048 values is two)."""
    rows = min(spec.vocab_size, max_context)
    read = dict(_embedding_tables(spec, quant))
    if _reads_lm_head_codes(spec, quant):
        # Those codes are also the LM head's, counted once (its packed copy); their file pages
        # come back where rows are looked up.
        block = quant.block_size_for(LM_HEAD_NODE)
        padded_row = -(-spec.hidden_size // block) * block
        read["lm_head_codes"] = spec.vocab_size * padded_row * quant.bits_for(LM_HEAD_NODE) // 8
    stored_only = sum(_stored_embedding_tables(spec, quant).values())
    looked_up = sum(min(size, rows * _pages_per_row(size, spec.vocab_size) * PAGE_BYTES) for size in read.values())
    return weight_bytes(spec, quant, max_context, kv_dtype) - stored_only + looked_up


def _pages_per_row(table_bytes: int, rows: int) -> int:
    return max(1, -(-table_bytes // rows // PAGE_BYTES))


def lm_head_bytes(spec: ModelSpec, quant: QuantRecipe) -> int:
    """The LM head is its own tensor even when tied, at lm_head_bits (an 8-bit head in its own block size)."""
    if quant.weights == "fp32":
        return spec.vocab_size * spec.hidden_size * 4
    return matmul_nbits_bytes(spec.vocab_size, spec.hidden_size, quant.bits_for(LM_HEAD_NODE),
                              quant.block_size_for(LM_HEAD_NODE), symmetric=quant.is_symmetric(LM_HEAD_NODE))


# --- what grows with the context -------------------------------------------------------------


def kv_cache_bytes(spec: ModelSpec, max_context: int, kv_dtype: str = "float32") -> int:
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * max_context * _itemsize(kv_dtype)


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _live_floats_per_token(spec: ModelSpec) -> int:
    """fp32 values per token alive at once inside a layer: the residual stream, its normed copy
    and the attention output; packed q|k|v; and the SwiGLU trio (gate, up, their product)."""
    return 3 * spec.hidden_size + (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim + 3 * spec.intermediate_size


def activation_bytes(spec: ModelSpec, max_context: int) -> int:
    """Arena footprint of one prefill chunk at a full KV cache, plus one row of logits."""
    from nomoat.runtime.model import PREFILL_CHUNK

    chunk = min(PREFILL_CHUNK, max_context)
    layer_values = int(chunk * 4 * _live_floats_per_token(spec) * ARENA_FACTOR)
    attention_scores = spec.num_heads * chunk * max_context * 4
    return layer_values + attention_scores + spec.vocab_size * 4


def runtime_bytes(spec: ModelSpec) -> int:
    return RUNTIME_BASE_BYTES + spec.vocab_size * TOKENIZER_BYTES_PER_TOKEN


def estimate_memory(spec: ModelSpec, recipe: Recipe, target: Target) -> MemoryEstimate:
    """Peak memory of the bundle on the target when a prompt fills the whole context."""
    quant = recipe.quant_recipe()
    return MemoryEstimate(
        weights=weight_bytes(spec, quant, recipe.max_context, recipe.kv_dtype),
        resident_weights=resident_weight_bytes(spec, quant, recipe.max_context, recipe.kv_dtype),
        kv_cache=kv_cache_bytes(spec, recipe.max_context, recipe.kv_dtype),
        activations=activation_bytes(spec, recipe.max_context),
        # ONNX Runtime repacks each MatMulNBits weight into a new buffer and then frees the
        # original: for a moment the largest one (the LM head) exists twice, and more: measured
        # (VmHWM of a load at a short context, 2026-12-07) 1.3-1.5x the head on top of the
        # resident weights (int4 29.5 MiB for a 20 MiB head, int8 44 for 33.7).
        load_transient=int(LOAD_TRANSIENT_FACTOR * lm_head_bytes(spec, quant)),
        runtime=runtime_bytes(spec),
        budget=target.memory_budget_bytes,
        max_context=recipe.max_context,
    )


# --- the decision ---------------------------------------------------------------------------

CONTEXT_STEP = 256  # shrink-context picks a multiple of this


def largest_fitting_context(spec: ModelSpec, recipe: Recipe, target: Target) -> int:
    """The largest context (a multiple of CONTEXT_STEP, at most the recipe's) that fits, or 0."""
    best = 0
    for ctx in range(CONTEXT_STEP, recipe.max_context + 1, CONTEXT_STEP):
        if not estimate_memory(spec, replace(recipe, max_context=ctx), target).fits:
            break  # the estimate grows with the context
        best = ctx
    return best


def check_fit(spec: ModelSpec, recipe: Recipe, target: Target) -> MemoryEstimate:
    """The estimate if it fits the target's budget; otherwise a ConversionError saying by how much
    and what would fit instead."""
    est = estimate_memory(spec, recipe, target)
    if est.fits:
        return est
    hints = "; or ".join(_what_would_fit(spec, recipe, target))
    raise ConversionError(
        f"the model does not fit {target.name}: estimated peak {est.summary()}; over by "
        f"{(est.total - est.budget) / MiB:.0f} MiB. What would fit: {hints}."
    )


def _what_would_fit(spec: ModelSpec, recipe: Recipe, target: Target) -> list[str]:
    hints = []
    ctx = largest_fitting_context(spec, recipe, target)
    if ctx:
        hints.append(f"--max-context {ctx} (or --fit shrink-context)")
    if recipe.weights != "int4":
        int4 = recipe.with_overrides(weights="int4")
        est = estimate_memory(spec, int4, target)
        if est.fits:
            hints.append(f"--quant int4 ({est.total / MiB:.0f} MiB)")
        elif ctx4 := largest_fitting_context(spec, int4, target):
            hints.append(f"--quant int4 --max-context {ctx4}")
    hints.append(_smaller_model_hint(spec, recipe, target))
    return hints


def _smaller_model_hint(spec: ModelSpec, recipe: Recipe, target: Target) -> str:
    """How much room the budget leaves, against what this model needs at int4 (and at most 2048 tokens)."""
    int4 = replace(recipe, weights="int4", max_context=min(recipe.max_context, 2048))
    est = estimate_memory(spec, int4, target)
    room = target.memory_budget_bytes - est.runtime
    return (f"a smaller model (the budget leaves {max(room, 0) / MiB:.0f} MiB beside the runtime; this one needs "
            f"{(est.total - est.runtime) / MiB:.0f} MiB at int4 with {int4.max_context} tokens)")
