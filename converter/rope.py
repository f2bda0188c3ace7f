"""Rotary-embedding tables, computed the way transformers computes them."""

from __future__ import annotations

import math

import numpy as np

from .spec import ModelSpec


def inverse_frequencies(spec: ModelSpec) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/d), with Llama 3.x wavelength-dependent scaling when set."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float64) / d))
    s = spec.rope_scaling
    if s is None:
        return inv_freq
    # Same piecewise rule as transformers' _compute_llama3_parameters: long wavelengths are
    # divided by `factor`, short ones kept, the band between interpolated smoothly.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled)


def cos_sin_cache(spec: ModelSpec, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of shape [max_positions, head_dim/2] for GroupQueryAttention's do_rotary."""
    inv_freq = inverse_frequencies(spec).astype(np.float32)
    # transformers computes the angle product in fp32; doing the same keeps logits bit-close.
    angles = np.outer(np.arange(max_positions, dtype=np.float32), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
