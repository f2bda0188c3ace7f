"""Reading MatMulNBits' block layout back to floats, for tests that check what was stored."""

from __future__ import annotations

import numpy as np


def unpack_zero_points(zero_points: np.ndarray | None, n: int, k_blocks: int, bits: int) -> np.ndarray:
    """[n, k_blocks] zero points; 4-bit ones are stored two per byte, low nibble first; none stored
    means the middle code (MatMulNBits' default)."""
    if zero_points is None:
        return np.full((n, k_blocks), 1 << (bits - 1), np.uint8)
    if bits == 8:
        return zero_points.reshape(n, k_blocks)
    return np.stack([zero_points & 15, zero_points >> 4], -1).reshape(n, -1)[:, :k_blocks]


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block: int,
               k: int) -> np.ndarray:
    """W [N, K] from MatMulNBits codes [N, k_blocks, block*bits/8], scales and zero points."""
    n = packed.shape[0]
    codes = packed.reshape(n, -1, block) if bits == 8 else \
        np.stack([packed & 15, packed >> 4], -1).reshape(n, -1, block)
    k_blocks = codes.shape[1]
    zp = unpack_zero_points(zero_points, n, k_blocks, bits)
    w = (codes.astype(np.float32) - zp[:, :, None]) * scales.reshape(n, k_blocks, 1)
    return w.reshape(n, -1)[:, :k]
