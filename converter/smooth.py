"""Smooth stage: rescale the input channels of linear layers before they are rounded (AWQ's idea).

A linear layer y = x W can be rewritten y = (x / s) (s W) for any positive per-channel s, and
when x comes from something linear in it (an RMSNorm's gamma, the up projection inside
SwiGLU), the 1/s folds into that producer: the fp32 model computes the same function. What
changes is what 4-bit rounding sees: channels that carry loud activations get larger weights,
so a block's shared grid spends its resolution on them. The imatrix search only weighs the
rounding error; it cannot change which values share a grid.

Per layer, s = (importance / mean) ** alpha, with alpha picked from a small grid by the same
objective the imatrix search minimizes (sum over input channels of importance x squared error,
measured back in the original space); alpha 0 (no change) is always a candidate, so a layer
that would lose keeps its weights. Folded here (each exact in fp32):
- q|k|v (input: input_layernorm)      -> the norm's gamma divided by s;
- gate|up (input: post_attention_layernorm) -> that norm's gamma divided by s;
- down (input: silu(gate) * up)        -> the up projection's output rows divided by s.
The attention output projection is left alone: its input is shared by the query heads of a
key/value head, and the measured gain on SmolLM2-135M was nil (README "The graph").

Opt-in (`--smoothing`): on SmolLM2-135M it brings the int4 model much closer to the fp32 one
(KL -35 %, top-1 agreement +5 points) but not its perplexity on a LoRA-merged model, the
quality bar the project measures itself by (README "The graph" has the numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .calibrate import Importance
    from .quantize import QuantRecipe
    from .spec import Checkpoint

ALPHAS = (0.0, 0.1, 0.15, 0.2, 0.3)
# The alpha search quantizes each candidate; every 4th output column gives the same choice
# (the objective is a sum over output columns) at a quarter of the time.
SEARCH_COLUMN_STRIDE = 4


@dataclass(frozen=True)
class _Fold:
    node: str  # the ONNX MatMul node whose weight is scaled
    consumers: tuple[str, ...]  # HF weights [out, in] whose input channels are multiplied by s
    producer: str  # HF tensor whose channels (last axis for a norm, rows for a linear) are divided by s


def _folds(layer: int) -> tuple[_Fold, ...]:
    p = f"model.layers.{layer}."
    return (
        _Fold(f"layers.{layer}.attn.qkv_proj", tuple(p + f"self_attn.{w}_proj.weight" for w in "qkv"),
              p + "input_layernorm.weight"),
        _Fold(f"layers.{layer}.mlp.gate_up_proj", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
              p + "post_attention_layernorm.weight"),
        _Fold(f"layers.{layer}.mlp.down_proj", (p + "mlp.down_proj.weight",), p + "mlp.up_proj.weight"),
    )


def smooth(ckpt: Checkpoint, importance: Importance, recipe: QuantRecipe
           ) -> tuple[Checkpoint, Importance, dict[str, float]]:
    """Return a checkpoint computing the same function with smoothed linears, the importance
    (and Gram matrices) seen by the smoothed weights, and the alpha chosen per node."""
    import torch

    tensors = dict(ckpt.tensors)  # a new dict: the caller's checkpoint (and the fp32 reference) stay as they are
    channels, grams = dict(importance.channels), dict(importance.grams)
    chosen: dict[str, float] = {}
    for layer in range(ckpt.spec.num_layers):
        for fold in _folds(layer):
            imp = channels.get(fold.node)
            if imp is None:
                continue
            # The quantizer's weight layout: B [K, N] with K the input channels.
            w = torch.cat([tensors[c] for c in fold.consumers]).float().T.numpy()
            alpha, s = best_scale(w, imp, recipe.bits_for(fold.node), recipe.block_size_for(fold.node),
                                  symmetric=recipe.is_symmetric(fold.node))
            chosen[fold.node] = alpha
            if alpha == 0.0:
                continue
            st = torch.from_numpy(s.astype(np.float32))
            for c in fold.consumers:
                tensors[c] = tensors[c].float() * st[None, :]
            # Down's input channels are up's output rows; a norm's gamma is one vector.
            producer = tensors[fold.producer].float()
            tensors[fold.producer] = producer / (st[:, None] if producer.dim() == 2 else st)
            channels[fold.node] = (imp / s**2).astype(np.float32)
            if fold.node in grams:
                grams[fold.node] = grams[fold.node] / np.outer(s, s)
    return replace(ckpt, tensors=tensors), replace(importance, channels=channels, grams=grams), chosen


def best_scale(w: np.ndarray, importance: np.ndarray, bits: int, block_size: int,
               symmetric: bool = False) -> tuple[float, np.ndarray]:
    """(alpha, s) minimizing sum_k importance_k * |dequant(s W)_k / s_k - W_k|^2 over ALPHAS,
    with the blocks the layer will have (symmetric or not)."""
    from .quantize import dequantize, quantize_blockwise

    imp = np.maximum(np.asarray(importance, np.float64), 1e-12)
    cols = w[:, ::SEARCH_COLUMN_STRIDE]
    best = (np.inf, 0.0, np.ones_like(imp))
    for alpha in ALPHAS:
        s = (imp / imp.mean()) ** alpha
        s = s / np.exp(np.log(s).mean())  # geometric mean 1: the weights keep their overall scale
        # imatrix's search whatever the final algorithm: GPTQ would need a Gram matrix per candidate.
        q = quantize_blockwise((cols * s[:, None]).astype(np.float32), bits, block_size, "imatrix",
                               importance=(imp / s**2).astype(np.float32), symmetric=symmetric)
        err = float((((dequantize(q, cols.shape, bits, block_size) / s[:, None]) - cols) ** 2 * imp[:, None]).sum())
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]
