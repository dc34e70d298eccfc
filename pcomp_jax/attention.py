"""Attention over grouped-query heads.

Queries have ``H`` heads and keys/values ``KVH`` heads; each KV head serves
``H // KVH`` query heads without being copied (the query heads are grouped instead).
``dense_attention`` is the XLA reference: it materialises the ``[T, S]`` scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so that a fully masked row gives zeros rather than NaN


def causal_mask(num_queries: int, num_keys: int | None = None) -> jnp.ndarray:
    """``[T, S]`` boolean mask, True where query t may see key s (s <= t, both from 0)."""
    num_keys = num_queries if num_keys is None else num_keys
    return jnp.arange(num_keys)[None, :] <= jnp.arange(num_queries)[:, None]


def expand_mask(mask: jnp.ndarray, batch: int, kv_heads: int) -> jnp.ndarray:
    """Brings a ``[T, S]``, ``[B, T, S]`` or ``[B, KVH, T, S]`` mask to ``[B, KVH, 1, T, S]``."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 3:
        mask = mask[:, None]
    t, s = mask.shape[-2:]
    return jnp.broadcast_to(mask, (batch, kv_heads, t, s))[:, :, None]


def grouped_scores(q: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
    """Scaled dot products, float32.

    q: ``[B, T, H, D]``; k: ``[B, S, KVH, D]``; returns ``[B, KVH, G, T, S]`` with G = H // KVH.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    return scores * (d**-0.5)


def dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Softmax attention with an explicit mask.

    q: ``[B, T, H, D]``; k, v: ``[B, S, KVH, D]``; mask: boolean (True = may attend),
    ``[T, S]``, ``[B, T, S]`` or per KV head ``[B, KVH, T, S]``. Returns ``[B, T, H, D]`` in q's dtype.
    """
    b, t, h, d = q.shape
    scores = grouped_scores(q, k)
    mask = expand_mask(mask, b, k.shape[2])
    probs = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
