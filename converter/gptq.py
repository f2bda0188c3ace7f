"""GPTQ: quantize a linear layer one input channel at a time, pushing each channel's rounding
error onto the channels not yet quantized, so the layer's *output* error is what gets small
(Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"). The weighting is the layer's input Gram matrix X^T X from the calibrate stage.

Hand-written (one function, ~40 lines of torch) rather than ONNX Runtime's GPTQ
(`GPTQWeightOnlyQuantConfig`) because that one re-runs the ONNX graph per calibration sample to
capture inputs (our graph's KV-cache inputs would need a reader of their own), returns
fake-quantized floats that are then re-rounded by min/max, and picks each block's scale by
min/max or an unweighted search. Here the Gram matrices come from the calibrate stage's forward
pass on the fp32 model, and each block's scale and zero point come from the same
importance-weighted search the "imatrix" algorithm uses, chosen on the block's error-updated
weights; the codes are MatMulNBits' layout as they are, never re-rounded.
"""

from __future__ import annotations

import numpy as np

DAMPING = 0.01  # fraction of the mean diagonal added to X^T X: keeps the inverse stable when calibration is short
# Columns updated together before the rest of the matrix sees their errors (same result, fewer passes).
LAZY_COLUMNS = 128


def gptq_blockwise(w: np.ndarray, bits: int, block_size: int, gram: np.ndarray, symmetric: bool = False):
    """Quantize B [K, N] along K in blocks; gram [K, K] = X^T X / tokens of the input it multiplies.

    Returns codes, scales and zero points as torch tensors shaped [N, k_blocks, block_size],
    [N, k_blocks, 1], [N, k_blocks, 1] (K padded with zero channels up to whole blocks).
    symmetric: every block's zero point is the middle code (see quantize._symmetric_search).
    """
    import torch

    from .quantize import _channel_weight, _mse_search, _symmetric_search

    k, n = w.shape
    qmax = (1 << bits) - 1
    k_blocks = -(-k // block_size)
    width = k_blocks * block_size
    weights = torch.zeros((n, width), dtype=torch.float32)
    weights[:, :k] = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32))
    hessian = torch.eye(width, dtype=torch.float64)
    hessian[:k, :k] = torch.from_numpy(np.asarray(gram, np.float64))
    dead = torch.diagonal(hessian) == 0  # a channel never active in calibration: nothing to fit
    hessian[dead, dead] = 1.0
    weights[:, dead] = 0.0
    hessian += DAMPING * float(torch.diagonal(hessian)[:k].mean()) * torch.eye(width, dtype=torch.float64)
    # Upper Cholesky factor of H^-1: row i holds how channel i's error spreads onto channels > i.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True).float()
    search_weight = _channel_weight(np.diagonal(gram), k, k_blocks, block_size)

    codes = torch.zeros((n, width), dtype=torch.float32)
    scales = torch.zeros((n, k_blocks), dtype=torch.float32)
    zeros = torch.zeros((n, k_blocks), dtype=torch.float32)
    lazy = max(block_size, LAZY_COLUMNS // block_size * block_size)
    for start in range(0, width, lazy):
        end = min(start + lazy, width)
        part = weights[:, start:end].clone()
        errors = torch.zeros_like(part)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            block = column // block_size
            if column % block_size == 0:
                # The block's grid is chosen on its weights as the earlier errors left them.
                group = part[:, i:i + block_size].reshape(n, 1, block_size)
                search = _symmetric_search if symmetric else _mse_search
                _, s, z = search(group, qmax, weight=search_weight[:, block:block + 1])
                scales[:, block], zeros[:, block] = s.view(n), z.view(n)
            s, z = scales[:, block], zeros[:, block]
            q = torch.clamp(torch.round(part[:, i] / s) + z, 0, qmax)
            codes[:, column] = q
            error = (part[:, i] - (q - z) * s) / inv[i, i]
            part[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        weights[:, end:] -= errors @ inverse[start:end, end:]
    return (codes.view(n, k_blocks, block_size), scales.view(n, k_blocks, 1), zeros.view(n, k_blocks, 1))
