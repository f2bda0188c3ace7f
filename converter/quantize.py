"""Quantize the fp32 decoder graph into MatMulNBits / GatherBlockQuantized.

Four algorithms for the linear weights, all packed into the exact block layout of ONNX
Runtime's MatMulNBits CPU kernel (uint8 codes, fp32 scale and uint8 zero point per block):

- "rtn": round-to-nearest with the block's min/max, as ONNX Runtime's MatMulNBitsQuantizer
  does by default. Kept as the reference point.
- "mse": for every block, search the scale (and the integer zero point it implies) that
  minimizes the squared error, then refit the scale by least squares. This is the piece we
  hand-wrote, because on SmolLM2-135M, whose weights arrive on llama.cpp's Q4_1 grid (float
  minimum per block), RTN's integer zero point cost +25.8 % perplexity, while ONNX Runtime's
  HQQ (float zero points) was accurate but fell off the fast kernels (2.7 tokens/s instead
  of ~46). Measured numbers are in the README.
- "imatrix" (default): the same search, with each input channel's error weighted by the mean
  square of the activation it multiplies (calibrate.py; llama.cpp's importance matrix idea).
- "gptq": each input channel's rounding error pushed onto the channels not yet quantized,
  weighted by the layer's X^T X (gptq.py), each block's grid from the imatrix search. Lower
  KL but higher perplexity than imatrix on SmolLM2-135M (README), so not the default.

Any of them can leave chosen layers symmetric (`symmetric` roles): no zero points stored, every
block centred on the middle code, which MatMulNBits runs faster (README "Symmetric blocks").

The embedding table becomes a GatherBlockQuantized: a tied table reads the LM head's codes
(stored once), an untied one goes through ONNX Runtime's quantizer (4-bit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConversionError

if TYPE_CHECKING:
    from .calibrate import Importance
    from .onnx_graph import Weights

QUANT_TYPES = ("fp32", "int8", "int4")
# imatrix: the MSE search with each channel's error weighted by its calibration activations
# (the calibrate stage); mse: the same search, all channels alike; rtn: min/max round-to-nearest.
# gptq: each channel's rounding error pushed onto the channels not yet quantized (gptq.py), with
# the imatrix search choosing each block's grid.
ALGORITHMS = ("imatrix", "gptq", "mse", "rtn")
SMOOTHING_ALGORITHMS = ("imatrix", "gptq")  # the ones with a calibration to smooth by
EMBEDDING_NODE = "embed_tokens"
LM_HEAD_NODE = "lm_head"
# The linear layers by role, as the graph names them (layers.N.attn.qkv_proj, ..., lm_head).
LINEAR_ROLES = ("qkv", "o", "gate_up", "down", "lm_head")


def linear_role(node_name: str) -> str:
    """'layers.3.mlp.gate_up_proj' -> 'gate_up'; 'lm_head' -> 'lm_head'."""
    return node_name.rsplit(".", 1)[-1].removesuffix("_proj")


def parse_symmetric(text: str) -> tuple[str, ...]:
    """The --symmetric value: a comma list of roles, or all / none."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if words == ["all"]:
        return LINEAR_ROLES
    if words in (["none"], []):
        return ()
    return tuple(dict.fromkeys(words))


@dataclass(frozen=True)
class QuantRecipe:
    """How the weights are stored; recorded in the manifest."""

    weights: str = "int4"  # fp32 | int8 | int4
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast where the ISA has int8 dot products)
    quantize_embedding: bool = True  # Gather -> GatherBlockQuantized (4-bit only)
    lm_head_bits: int | None = 4  # None = same as the other weights; never below them
    lm_head_block_size: int = 64  # for an 8-bit head: blocks of 64 ran ~30 % faster than 32 here, at the same accuracy
    algorithm: str = "imatrix"
    # AWQ-style input-channel scaling before rounding, with the calibration's importance (smooth.py);
    # only where there is one (imatrix, gptq) and only for 4-bit weights, where a block's grid is coarse.
    smoothing: bool = False
    # The linear layers stored without zero points (every block centred on the middle code; roles in
    # LINEAR_ROLES): MatMulNBits then skips its zero-point work. On SmolLM2-135M that made the gate|up
    # projections ~20 % faster for up to a point of perplexity; all layers cost ~5 points.
    symmetric: tuple[str, ...] = ("gate_up",)

    def __post_init__(self) -> None:
        if self.weights not in QUANT_TYPES:
            raise ConversionError(f"unknown quantization {self.weights!r}; choose one of {', '.join(QUANT_TYPES)}.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConversionError(f"block size {self.block_size} must be a power of two >= 16 (e.g. 32, 64, 128).")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConversionError(f"accuracy level {self.accuracy_level} must be 0..4 (see MatMulNBits).")
        if self.algorithm not in ALGORITHMS:
            raise ConversionError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}.")
        unknown = set(self.symmetric) - set(LINEAR_ROLES)
        if unknown:
            raise ConversionError(f"--symmetric {','.join(sorted(unknown))}: no such layer; choose from "
                                  f"{', '.join(LINEAR_ROLES)}, or all / none.")
        if self.lm_head_bits not in (None, 4, 8):
            raise ConversionError(f"--lm-head-bits {self.lm_head_bits} is not supported; use 4 or 8.")

    @property
    def smooths(self) -> bool:
        """Whether the smooth stage runs: it needs the calibration's importance, and 8 bits gain nothing."""
        return self.smoothing and self.weights == "int4" and self.algorithm in SMOOTHING_ALGORITHMS

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}[self.weights]

    def bits_for(self, node_name: str) -> int:
        if node_name == LM_HEAD_NODE and self.lm_head_bits:
            # The LM head maps to 49k+ logits and is the largest matmul of a small model: at 4 bits
            # it decodes faster, at 8 bits it keeps ~6 points of perplexity on SmolLM2-135M
            # (llama.cpp keeps it at 6-8 bits). An int8 model never gets a 4-bit head.
            return max(self.lm_head_bits, self.bits)
        return self.bits

    def is_symmetric(self, node_name: str) -> bool:
        return linear_role(node_name) in self.symmetric

    def block_size_for(self, node_name: str) -> int:
        if node_name == LM_HEAD_NODE and self.bits_for(node_name) == 8:
            # an 8-bit head's blocks are never below lm_head_block_size, nor below the model's --block-size
            return max(self.block_size, self.lm_head_block_size)
        return self.block_size

    def to_dict(self) -> dict:
        """The recipe as the graph was built with it, for the manifest: an int8 model's head is 8-bit whatever
        lm_head_bits says, only 4-bit models quantize the embedding, and fp32 rounds nothing."""
        if self.weights == "fp32":
            return {"weights": "fp32", "block_size": None, "accuracy_level": None, "quantize_embedding": False,
                    "lm_head_bits": None, "lm_head_block_size": None, "algorithm": None, "smoothing": False,
                    "symmetric": []}
        return {**self.__dict__, "symmetric": list(self.symmetric), "smoothing": self.smooths,
                "quantize_embedding": self.quantize_embedding and self.weights == "int4",
                "lm_head_bits": self.bits_for(LM_HEAD_NODE), "lm_head_block_size": self.block_size_for(LM_HEAD_NODE)}


@dataclass(frozen=True)
class BlockQuantized:
    """One weight in MatMulNBits layout, plus the squared error it cost."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N * k_blocks]
    # uint8, 4-bit: [N * ceil(k_blocks / 2)] two per byte; 8-bit: [N * k_blocks]. None: symmetric,
    # every block's zero point is the middle code (8 or 128), which MatMulNBits assumes when it has none.
    zero_points: np.ndarray | None
    mse: float


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int, algorithm: str = "imatrix",
                       importance: np.ndarray | None = None, gram: np.ndarray | None = None,
                       symmetric: bool = False) -> BlockQuantized:
    """Quantize a MatMul weight B [K, N] along K in blocks (an integer zero point per block, or
    with symmetric the middle code for all: no zero points stored).

    importance [K]: how much an error on each input channel costs (mean x^2 of the activation
    it multiplies); the MSE search then minimizes the weighted error. None weighs all alike.
    gram [K, K]: X^T X / tokens of that activation; "gptq" needs it (without it, it is "imatrix").
    """
    import torch

    k, n = w.shape
    k_blocks = -(-k // block_size)
    x = torch.zeros((n, k_blocks * block_size), dtype=torch.float32)
    x[:, :k] = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32))
    x = x.view(n, k_blocks, block_size)
    qmax = (1 << bits) - 1
    if algorithm == "rtn":
        # Symmetric rounding: one scale per sign, the block's reach on the grid's end (then refit).
        q, scale, zero = _symmetric_search(x, qmax, steps=1) if symmetric else _rtn(x, qmax)
    elif algorithm == "gptq" and gram is not None:
        from .gptq import gptq_blockwise

        q, scale, zero = gptq_blockwise(w, bits, block_size, gram, symmetric=symmetric)
    else:
        search = _symmetric_search if symmetric else _mse_search
        q, scale, zero = search(x, qmax, weight=_channel_weight(importance, k, k_blocks, block_size))
    # Padding columns (K not a multiple of the block) are zeros that quantize exactly.
    err = float(((q - zero) * scale - x).pow(2).sum()) / (n * k)
    codes = q.to(torch.uint8).numpy().reshape(n, k_blocks, block_size)
    scales = scale.numpy().reshape(-1).astype(np.float32)
    zp = zero.to(torch.uint8).numpy().reshape(n, k_blocks)
    if bits == 8:
        return BlockQuantized(codes, scales, None if symmetric else zp.reshape(-1), err)
    packed = np.ascontiguousarray(codes[:, :, 0::2] | (codes[:, :, 1::2] << 4))
    if symmetric:
        return BlockQuantized(packed, scales, None, err)
    zp_padded = np.zeros((n, 2 * -(-k_blocks // 2)), np.uint8)
    zp_padded[:, :k_blocks] = zp
    zp_packed = zp_padded[:, 0::2] | (zp_padded[:, 1::2] << 4)
    return BlockQuantized(packed, scales, zp_packed.reshape(-1), err)


def dequantize(q: BlockQuantized, shape: tuple[int, int], bits: int, block_size: int) -> np.ndarray:
    """The fp32 weight B [K, N] that MatMulNBits computes with: (code - zero point) * scale."""
    k, n = shape
    k_blocks = -(-k // block_size)
    codes = q.packed.astype(np.float32) if bits == 8 else \
        np.stack([q.packed & 15, q.packed >> 4], -1).reshape(n, k_blocks, block_size).astype(np.float32)
    zp = block_zero_points(q, bits, n, k_blocks).astype(np.float32)
    w = (codes - zp[:, :, None]) * q.scales.reshape(n, k_blocks, 1)
    return np.ascontiguousarray(w.reshape(n, k_blocks * block_size)[:, :k].T)


def block_zero_points(q: BlockQuantized, bits: int, n: int, k_blocks: int) -> np.ndarray:
    """uint8 [N, k_blocks]: each block's zero point, unpacked (the middle code when symmetric)."""
    if q.zero_points is None:
        return np.full((n, k_blocks), 1 << (bits - 1), np.uint8)
    if bits == 8:
        return q.zero_points.reshape(n, k_blocks)
    zp = q.zero_points.reshape(n, -1)
    return np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :k_blocks]


def _channel_weight(importance: np.ndarray | None, k: int, k_blocks: int, block_size: int):
    """[1, k_blocks, block_size] weights with mean 1 (padding 0), or None."""
    import torch

    if importance is None:
        return None
    h = torch.zeros(k_blocks * block_size, dtype=torch.float32)
    imp = torch.tensor(importance, dtype=torch.float32)  # a copy: the caller's array may be read-only
    # A floor keeps channels that were silent in calibration from being ignored entirely.
    imp = imp.clamp(min=float(imp.mean()) * 1e-3)
    h[:k] = imp / imp.mean()
    return h.view(1, k_blocks, block_size)


def _codes(x, scale, zero, qmax: int):
    import torch

    return torch.clamp(torch.round(x / scale) + zero, 0, qmax)


def _rtn(x, qmax: int):
    """Min/max round-to-nearest with 0 inside the range (what ONNX Runtime's quantizer does)."""
    import torch

    lo = torch.clamp(x.amin(-1, keepdim=True), max=0)
    hi = torch.clamp(x.amax(-1, keepdim=True), min=0)
    scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return _codes(x, scale, zero, qmax), scale, zero


def _symmetric_search(x, qmax: int, steps: int = 9, weight=None):
    """Per block, a zero point fixed at the middle code and a signed scale, searched like _mse_search.

    The grid is s * (code - mid) for codes 0..qmax: one more level on the side the scale's sign
    points to, so both signs are tried (llama.cpp's Q4_0 maps its largest magnitude to -8 the
    same way). Without a zero point per block MatMulNBits skips its zero-point work.
    """
    import torch

    mid = float((qmax + 1) // 2)
    w = torch.ones_like(x[:1]) if weight is None else weight
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    zero = torch.full_like(lo, mid)
    best_q = best_scale = best_err = None
    for sign, reach in ((1.0, torch.maximum(-lo / mid, hi / (qmax - mid))),
                        (-1.0, torch.maximum(hi / mid, -lo / (qmax - mid)))):
        base = torch.where(reach > 0, reach, torch.ones_like(reach)) * sign
        for factor in torch.linspace(1.0, 0.75, steps):  # 1.0 first: steps=1 is plain rounding
            scale = base * float(factor)
            q = _codes(x, scale, zero, qmax)
            c = q - zero
            denom = (w * c.pow(2)).sum(-1, keepdim=True)
            refit = torch.where(denom > 0, (w * x * c).sum(-1, keepdim=True) / denom.clamp(min=1e-12), scale)
            refit = torch.where(refit * sign > 0, refit, scale)
            for s in (scale, refit):
                qq = _codes(x, s, zero, qmax)
                err = (((qq - zero) * s - x).pow(2) * w).sum(-1, keepdim=True)
                if best_err is None:
                    best_q, best_scale, best_err = qq, s, err
                    continue
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, s, best_scale)
                best_q = torch.where(better, qq, best_q)
    return best_q, best_scale, zero


def _mse_search(x, qmax: int, steps: int = 7, weight=None):
    """Per block, try scales around (max-min)/qmax, refit each by (weighted) least squares, keep the best."""
    import torch

    w = torch.ones_like(x[:1]) if weight is None else weight
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    best_q, best_scale, best_zero = _rtn(x, qmax)
    best_err = (((best_q - best_zero) * best_scale - x).pow(2) * w).sum(-1, keepdim=True)
    for delta in torch.linspace(-1.0, 1.0, steps):
        scale = span / (qmax + float(delta))
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
        q = _codes(x, scale, zero, qmax)
        # Least-squares scale for these codes: argmin_s sum w (x - s (q - z))^2.
        c = q - zero
        denom = (w * c.pow(2)).sum(-1, keepdim=True)
        refit = torch.where(denom > 0, (w * x * c).sum(-1, keepdim=True) / denom.clamp(min=1e-12), scale)
        refit = torch.where(refit > 0, refit, scale)
        for s in (scale, refit):
            qq = _codes(x, s, zero, qmax)
            err = (((qq - zero) * s - x).pow(2) * w).sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_q = torch.where(better, qq, best_q)
    return best_q, best_scale, best_zero


def quantize_graph(model, recipe: QuantRecipe, progress=None, importance: Importance | None = None,
                   weights: Weights | None = None):
    """Return the ModelProto with MatMuls (and the embedding Gather) block-quantized.

    importance (the calibrate stage's) weighs each MatMul's rounding errors by its input activations.
    weights: the fp32 arrays of the graph's placeholder initializers (onnx_graph.build_graph). Each is
    made, rounded and dropped in turn, so one fp32 weight is alive at a time; what stays unquantized
    (an int8 model's embedding table) is left in it for the export to write.
    """
    if recipe.weights == "fp32":
        return model
    from onnx import helper, numpy_helper

    from .onnx_graph import Weights

    weights = Weights() if weights is None else weights
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    if progress is not None:
        progress.reset(total=len(matmuls))
    tied_head = None
    for node in matmuls:
        w = _fp32(inits[node.input[1]], weights)
        bits = recipe.bits_for(node.name)
        block_size = recipe.block_size_for(node.name)
        q = quantize_blockwise(w, bits, block_size, recipe.algorithm,
                               importance.for_node(node.name) if importance is not None else None,
                               importance.gram_for(node.name) if importance is not None else None,
                               symmetric=recipe.is_symmetric(node.name))
        if node.name == LM_HEAD_NODE and _is_embedding_transposed(graph, inits, weights, w):
            tied_head = (f"{node.input[1]}_Q{bits}", q, bits, block_size, w.shape[0])
        name = node.input[1]
        _drop(graph, inits, weights, name)
        inputs = [node.input[0], f"{name}_Q{bits}", f"{name}_scales"]
        graph.initializer.extend([numpy_helper.from_array(q.packed, inputs[1]),
                                  numpy_helper.from_array(q.scales, inputs[2])])
        if q.zero_points is not None:
            inputs.append(f"{name}_zero_points")
            graph.initializer.append(numpy_helper.from_array(q.zero_points, inputs[3]))
        new = helper.make_node(
            "MatMulNBits", inputs,
            list(node.output), name=node.name, domain="com.microsoft", K=w.shape[0], N=w.shape[1], bits=bits,
            block_size=block_size, accuracy_level=recipe.accuracy_level,
        )
        del w, q  # the fp32 copy goes before the next weight's is made
        idx = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(idx, new)
        if progress is not None:
            progress.update(1)
    if recipe.quantize_embedding and recipe.weights == "int4":
        if tied_head is not None:
            _gather_from_lm_head(graph, inits, weights, *tied_head)
        else:
            # ONNX Runtime's quantizer reads the table from the graph: fill its placeholder first.
            table = _embedding_node(graph).input[0]
            if table in weights:
                inits[table].CopyFrom(weights.tensor(table))
                del weights[table]
            model = _quantize_embedding(model, recipe)
    return model


def _fp32(tensor, weights: Weights) -> np.ndarray:
    """An initializer's fp32 array: made from the checkpoint for a placeholder, else read from the graph."""
    from onnx import numpy_helper

    return weights.array(tensor.name) if tensor.name in weights else numpy_helper.to_array(tensor)


def _drop(graph, inits, weights: Weights, name: str) -> None:
    """Remove an fp32 initializer that its quantized form replaces (and its maker, if a placeholder)."""
    graph.initializer.remove(inits.pop(name))
    weights.pop(name, None)


def _embedding_node(graph):
    return next(n for n in graph.node if n.name == EMBEDDING_NODE)


def _is_embedding_transposed(graph, inits, weights: Weights, lm_head_w: np.ndarray) -> bool:
    """True when the LM head is the embedding table transposed (tied weights)."""
    table = _fp32(inits[_embedding_node(graph).input[0]], weights)
    return table.shape == lm_head_w.shape[::-1] and np.array_equal(table, lm_head_w.T)


def _gather_from_lm_head(graph, inits, weights: Weights, codes_name: str, q: BlockQuantized, bits: int,
                         block_size: int, hidden: int) -> None:
    """Tied weights, stored once: the embedding lookup reads the LM head's quantized codes.

    GatherBlockQuantized takes MatMulNBits' codes [vocab, k_blocks, block*bits/8] as they are
    (quantize_axis 2, one block per row of the last axis) and yields [..., k_blocks, block]; a
    Reshape folds that back to [..., k_blocks * block], and when the blocks do not tile the hidden
    size (576 in blocks of 128), a Slice drops the padding the last block holds. The per-block
    scales and zero points are tensors of their own, in the rank GatherBlockQuantized wants: the
    scales' bytes are the LM head's, so save_model stores them once; the zero points (a byte per
    block here, two per byte there) are stored a second time (~1/16 of the codes' size).
    """
    from onnx import helper, numpy_helper

    node = _embedding_node(graph)
    vocab, k_blocks = q.packed.shape[0], q.packed.shape[1]
    # MatMulNBits packs two blocks' zero points per byte; here each block has its own byte.
    zero_points = block_zero_points(q, bits, vocab, k_blocks)
    prefix = node.input[0]
    _drop(graph, inits, weights, prefix)
    graph.initializer.extend([
        numpy_helper.from_array(q.scales.reshape(vocab, k_blocks, 1), f"{prefix}_scales"),
        numpy_helper.from_array(np.ascontiguousarray(zero_points).reshape(vocab, k_blocks, 1), f"{prefix}_zero_points"),
        numpy_helper.from_array(np.array([0, 0, k_blocks * block_size], np.int64), f"{prefix}_shape"),
    ])
    blocks_out = f"{node.output[0]}_blocks"
    gather = helper.make_node("GatherBlockQuantized", [codes_name, node.input[1], f"{prefix}_scales",
                                                      f"{prefix}_zero_points"], [blocks_out],
                              name=node.name, domain="com.microsoft", gather_axis=0, quantize_axis=2,
                              block_size=block_size, bits=bits)
    padded = k_blocks * block_size != hidden
    rows_out = f"{node.output[0]}_padded" if padded else node.output[0]
    new_nodes = [gather, helper.make_node("Reshape", [blocks_out, f"{prefix}_shape"], [rows_out],
                                          name=f"{node.name}.reshape")]
    if padded:
        graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), f"{prefix}_slice_start"),
                                  numpy_helper.from_array(np.array([hidden], np.int64), f"{prefix}_slice_end"),
                                  numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}_slice_axis")])
        new_nodes.append(helper.make_node("Slice", [rows_out, f"{prefix}_slice_start", f"{prefix}_slice_end",
                                                    f"{prefix}_slice_axis"], list(node.output),
                                          name=f"{node.name}.slice"))
    idx = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(new_nodes):
        graph.node.insert(idx + offset, new)


def _quantize_embedding(model, recipe: QuantRecipe):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=recipe.block_size, is_symmetric=False, accuracy_level=recipe.accuracy_level,
        op_types_to_quantize=("Gather",),
        quant_axes=(("Gather", 1),),  # blocks along the hidden axis of the [vocab, hidden] table
        bits=4,
    )
    # The quantizer logs one INFO line per weight; keep the user's terminal for our progress.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    others = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name != EMBEDDING_NODE]
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=others)
    quantizer.process()
    return quantizer.model.model
