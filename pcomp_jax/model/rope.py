"""Rotary position embeddings with explicit position ids (Hugging Face's half-split layout).

Every token's rotation depends only on its own position id, which is what lets
ParallelComp restart positions at 0 in every chunk row.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig, RopeConfig


def base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """Unscaled inverse frequencies ``theta ** (-2i / dim)``, shape ``[dim // 2]``."""
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def _llama3_inv_freq(inv_freq: np.ndarray, cfg: ModelConfig, r: RopeConfig) -> np.ndarray:
    """Llama 3.1 frequency scaling: long wavelengths divided by ``factor``, smooth in between."""
    old_window = r.original_window or cfg.window
    low_wavelen = old_window / r.low_freq_factor
    high_wavelen = old_window / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (old_window / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq(cfg: ModelConfig, positions: jnp.ndarray, rope: RopeConfig | None = None) -> jnp.ndarray:
    """Inverse frequencies for one call, shape ``[head_dim // 2]`` (float32).

    ``positions`` matters only for ``dynamic`` NTK scaling, which (like transformers)
    rescales the base from the largest position id of the call when it exceeds the window.
    rope: the rotary parameters (default ``cfg.rope``, the global layers'; Gemma 3's local
    layers use ``cfg.local_rope``).
    """
    r = cfg.rope if rope is None else rope
    dim = cfg.head_dim
    freqs = base_inv_freq(r.theta, dim)
    if r.type == "linear":
        freqs = freqs / r.factor
    elif r.type == "llama3":
        freqs = _llama3_inv_freq(freqs, cfg, r)
    if r.freq_factors is not None:
        freqs = freqs / np.asarray(r.freq_factors, np.float32)
    if r.type != "dynamic":
        return jnp.asarray(freqs)
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, float(cfg.window))
    base = r.theta * ((r.factor * seq_len / cfg.window) - (r.factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base**exponents)


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray, rope: RopeConfig | None = None
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables for ``positions [B, T]``, each ``[B, T, 1, head_dim]`` (float32);
    rope: as in ``inv_freq``."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq(cfg, positions, rope)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def layer_rope_tables(cfg: ModelConfig, positions: jnp.ndarray):
    """The tables a scanned layer stack reads: ``rope_tables(cfg, positions)``, or, when the
    local layers rotate with their own frequencies (``cfg.has_local_rope``), both sets
    stacked on a leading axis (0: global, 1: local) for the layers to index by their kind."""
    cos, sin = rope_tables(cfg, positions)
    if not cfg.has_local_rope:
        return cos, sin
    local_cos, local_sin = rope_tables(cfg, positions, cfg.local_rope)
    return jnp.stack([cos, local_cos]), jnp.stack([sin, local_sin])


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates ``x [B, T, heads, head_dim]`` by the tables of ``rope_tables``; keeps x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)
