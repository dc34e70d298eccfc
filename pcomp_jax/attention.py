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

    q: ``[B, T, H, D]``; k, v: ``[B, S, KVH, D]``; mask: ``[B, T, S]`` or ``[T, S]`` boolean
    (True = may attend). Returns ``[B, T, H, D]`` in q's dtype.
    """
    b, t, h, d = q.shape
    scores = grouped_scores(q, k)
    mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
