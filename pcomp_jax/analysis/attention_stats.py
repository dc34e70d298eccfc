"""Where the last query tokens look: attention by relative position, per layer and head.

``attention_profiles`` runs rows through the model and records, in every layer, the
attention that the last ``r`` real tokens of each row give to every key, averaged over
those queries and binned by the key's relative position in the row (0 = first token,
1 = last). ``classify_layer`` names a layer's pattern with a documented rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..attention import causal_attention, query_probs
from ..calibrate import chunk_keep_fn
from ..model.config import ModelConfig
from ..model.llama import Weights, layer_kinds, prefill_forward, window_of_layer

PATTERNS = ("U-shaped", "mountain", "uniform")
EDGE_FRACTION = 0.1  # first and last 10% of the row are its "edges"
U_EDGE_MASS = 0.5  # U-shaped: the edges take at least half of the attention
UNIFORM_PEAK_RATIO = 2.0  # uniform: no bin gets more than twice the mean bin


def last_query_attention(q: jax.Array, k: jax.Array, row_lengths: jax.Array, r: int, key_keep=None,
                         window=None) -> jax.Array:
    """Attention of each row's last ``r`` real queries, averaged over them, per query head.

    q: ``[B, T, H, D]``; k: ``[B, T, KVH, D]``; row_lengths: ``[B]``; key_keep: optional
    ``[B, KVH, T]`` (calibration; a query always sees itself); window: optional sliding
    window of a local layer (the row's slots are its positions). Returns ``[B, H, T]``.
    """
    b, t, h, _ = q.shape
    q_pos = jnp.clip(row_lengths[:, None] - r + jnp.arange(r)[None, :], 0, t - 1)  # [B, r]
    keys = jnp.arange(t)
    visible = keys[None, None, :] <= q_pos[:, :, None]  # [B, r, T]
    if window is not None:
        visible = visible & (q_pos[:, :, None] - keys[None, None, :] < window)
    if key_keep is not None:
        visible = (visible[:, None] & key_keep[:, :, None, :]) | (keys[None, None, :] == q_pos[:, :, None])[:, None]
    probs = query_probs(jnp.take_along_axis(q, q_pos[:, :, None, None], axis=1), k, visible)  # [B, KVH, G, r, T]
    return probs.mean(axis=3).reshape(b, h, t)


@functools.partial(jax.jit, static_argnames=("cfg", "r", "rules"))
def _layer_attention(weights: Weights, cfg: ModelConfig, tokens, positions, row_lengths, r: int, rules: tuple):
    """Per-layer ``[L, B, H, T]`` attention of the last r queries (with the chunk-stage rules applied)."""
    keep_fn = chunk_keep_fn(rules, row_lengths, layer_kinds(cfg)[0]) if rules else None

    def emit(q, k, v, layer_index):
        keep = None if keep_fn is None else keep_fn(q, k, layer_index)
        return last_query_attention(q, k, row_lengths, r, keep, window_of_layer(cfg, layer_index))

    attention = causal_attention("auto", needs_key_mask=bool(rules), dtype=weights.embed.dtype,
                                 sliding=cfg.has_sliding_layers)
    _, per_layer = prefill_forward(
        weights, cfg, tokens, positions, logits_at=jnp.zeros((tokens.shape[0], 1), jnp.int32),
        attention=attention, emit=emit, key_keep=keep_fn,
    )
    return per_layer


def relative_position_bins(attention: np.ndarray, length: int, bins: int) -> np.ndarray:
    """Sums a row's attention ``[..., T]`` over ``bins`` equal slices of its first ``length`` keys."""
    edges = np.linspace(0, length, bins + 1).round().astype(int)
    return np.stack([attention[..., a:b].sum(-1) for a, b in zip(edges[:-1], edges[1:])], axis=-1)


def attention_profiles(weights, cfg, rows_tokens, rows_positions, row_lengths, r: int = 1, bins: int = 50, rules=()):
    """Mean attention by relative position: ``[L, H, bins]``, averaged over the rows.

    rows_*: ``[N, R]`` NumPy rows (``chunking.Rows`` or one full-attention row); row_lengths ``[N]``
    (rows of length 0 are skipped). Each row's profile sums to 1 per layer and head.
    """
    per_layer = np.asarray(
        _layer_attention(weights, cfg, jnp.asarray(rows_tokens), jnp.asarray(rows_positions), jnp.asarray(row_lengths), r, tuple(rules))
    )  # [L, N, H, T]
    profiles = [relative_position_bins(per_layer[:, i], int(n), bins) for i, n in enumerate(row_lengths) if n > 0]
    return np.mean(profiles, axis=0)


def classify_layer(profile: np.ndarray) -> dict:
    """Names the pattern of a profile ``[bins]`` (summing to 1).

    U-shaped: the first and last 10% of positions take >= 50% of the attention;
    uniform: otherwise, if no bin exceeds twice the mean bin; mountain: otherwise
    (a region inside the row attracts the attention).
    """
    bins = profile.shape[-1]
    edge = max(1, round(EDGE_FRACTION * bins))
    edge_mass = float(profile[:edge].sum() + profile[-edge:].sum())
    peak_ratio = float(profile.max() / max(profile.mean(), 1e-12))
    if edge_mass >= U_EDGE_MASS:
        pattern = "U-shaped"
    elif peak_ratio <= UNIFORM_PEAK_RATIO:
        pattern = "uniform"
    else:
        pattern = "mountain"
    return {"pattern": pattern, "edge_mass": edge_mass, "peak_ratio": peak_ratio,
            "peak_position": float((np.argmax(profile) + 0.5) / bins)}
