"""A functional Llama-family decoder in JAX (Llama, Mistral, Qwen2, SmolLM2).

Weights are ``flax.struct`` dataclass pytrees; each array declares its logical axes
next to its shape (``logical_axes``), and ``pcomp_jax.sharding`` maps them to mesh
axes. The layer stack runs as one ``jax.lax.scan`` over weights stacked on a leading
``layers`` axis, so compile time does not grow with depth.

Two entry points share one layer body:
  ``prefill_forward``: causal attention inside each row of a batch; returns logits
    (optionally only at chosen positions) and every layer's rotated keys and values.
  ``cached_forward``: new tokens appended to a ``KVCache`` and attending to its valid slots.
A third, ``appended_forward``, runs new tokens on top of a cache it only reads (a read
document's question pass), so that no cache is copied or written.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from ..attention import causal_mask, dense_attention, dense_attention_parts, dense_causal_attention, query_probs
from ..axes import axes_field, logical_axes  # noqa: F401  (logical_axes: re-exported)
from ..cache import KVCache, write_layer
from .config import ModelConfig
from .rope import apply_rope, rope_tables


@flax.struct.dataclass
class LayerWeights:
    """One decoder layer's weights, stacked over layers (leading axis L)."""

    attn_norm: jax.Array = axes_field("layers", "embed")  # [L, E]
    wq: jax.Array = axes_field("layers", "embed", "q_heads", "head_dim")  # [L, E, H, D]
    wk: jax.Array = axes_field("layers", "embed", "kv_heads", "head_dim")  # [L, E, KVH, D]
    wv: jax.Array = axes_field("layers", "embed", "kv_heads", "head_dim")  # [L, E, KVH, D]
    wo: jax.Array = axes_field("layers", "q_heads", "head_dim", "embed")  # [L, H, D, E]
    mlp_norm: jax.Array = axes_field("layers", "embed")  # [L, E]
    w_gate: jax.Array = axes_field("layers", "embed", "mlp")  # [L, E, F]
    w_up: jax.Array = axes_field("layers", "embed", "mlp")  # [L, E, F]
    w_down: jax.Array = axes_field("layers", "mlp", "embed")  # [L, F, E]
    bq: jax.Array | None = axes_field("layers", "q_heads", "head_dim")  # [L, H, D] (Qwen2) or None
    bk: jax.Array | None = axes_field("layers", "kv_heads", "head_dim")  # [L, KVH, D] or None
    bv: jax.Array | None = axes_field("layers", "kv_heads", "head_dim")  # [L, KVH, D] or None


@flax.struct.dataclass
class Weights:
    """All model weights. ``lm_head`` is None when the output reuses ``embed`` (tied)."""

    embed: jax.Array = axes_field("vocab", "embed")  # [V, E]
    layers: LayerWeights = flax.struct.field()
    final_norm: jax.Array = axes_field("embed")  # [E]
    lm_head: jax.Array | None = axes_field("embed", "vocab")  # [E, V] or None


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf.astype(x.dtype) * scale).astype(x.dtype)


def dot(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` in mixed precision: inputs in the weights' dtype, products
    accumulated and returned in float32 (``preferred_element_type``), as GPU and TPU matrix
    units and CPUs with bfloat16 dot instructions compute them. For float32 weights: a plain
    float32 einsum."""
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _qkv(x, lw: LayerWeights, cos, sin, cfg: ModelConfig):
    """Projects ``x [B, T, E]`` to rotated q ``[B,T,H,D]`` and rotated k, plain v ``[B,T,KVH,D]``,
    in x's dtype (projections accumulated, biases added and RoPE applied in float32)."""
    h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
    q, k, v = (dot("bte,ehd->bthd", h, w) for w in (lw.wq, lw.wk, lw.wv))
    if lw.bq is not None:
        q, k, v = q + lw.bq, k + lw.bk, v + lw.bv
    return apply_rope(q, cos, sin).astype(x.dtype), apply_rope(k, cos, sin).astype(x.dtype), v.astype(x.dtype)


def _finish_layer(x, attn_out, lw: LayerWeights, cfg: ModelConfig):
    """Output projection, residual, SwiGLU MLP and residual. x: ``[B, T, E]``; the residual
    stream stays in x's dtype, the MLP's activations in float32 until the down projection."""
    x = (x + dot("bthd,hde->bte", attn_out, lw.wo)).astype(x.dtype)
    h = rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
    gate = jax.nn.silu(dot("bte,ef->btf", h, lw.w_gate))
    up = dot("bte,ef->btf", h, lw.w_up)
    return (x + dot("btf,fe->bte", gate * up, lw.w_down)).astype(x.dtype)


def _logits(weights: Weights, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and output projection: ``[B, P, E] -> [B, P, V]`` float32."""
    h = rms_norm(x, weights.final_norm, cfg.rms_norm_eps)
    if weights.lm_head is None:
        return dot("bpe,ve->bpv", h, weights.embed)
    return dot("bpe,ev->bpv", h, weights.lm_head)


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]  # (q, k, v, mask)
CausalAttentionFn = Callable[..., jax.Array]  # (q, k, v, key_keep=None), causal per row


def emit_keys_values(q, k, v, layer_index):
    """Default per-layer output of ``prefill_forward``: the rotated keys and the values."""
    return k, v


def prefill_forward(
    weights: Weights,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    logits_at: jax.Array | None = None,
    attention: CausalAttentionFn = dense_causal_attention,
    emit: Callable = emit_keys_values,
    key_keep: Callable | None = None,
):
    """Causal forward pass over independent rows.

    tokens, positions: ``[B, T]`` int32. Each row attends causally to its own tokens
    only; padding placed after a row's real tokens is hidden by causality.
    logits_at: optional ``[B, P]`` indices into T; logits are computed only there.
    attention: a causal backend ``(q, k, v, key_keep) -> out`` (see ``pcomp_jax.attention``).
    key_keep(q, k, layer_index): optional per-layer ``[B, KVH, T]`` mask of the keys the
      layer's attention may use (calibration); the default keeps all.
    emit(q, k, v, layer_index): what each layer hands out, from its rotated queries
      ``[B, T, H, D]``, rotated keys and values ``[B, T, KVH, D]``; the default hands out
      ``(k, v)``. KV eviction plugs in here, so that a full row cache is never stacked.
    Returns ``(logits [B, P or T, V] float32, emitted)``, where ``emitted`` stacks each
    layer's output on a leading axis L (by default ``(keys, values)``, each ``[L, B, T, KVH, D]``).
    """
    x = weights.embed[tokens]
    cos, sin = rope_tables(cfg, positions)

    def layer(x, layer_in):
        lw, index = layer_in
        q, k, v = _qkv(x, lw, cos, sin, cfg)
        keep = None if key_keep is None else key_keep(q, k, index)
        return _finish_layer(x, attention(q, k, v, keep), lw, cfg), emit(q, k, v, index)

    x, emitted = jax.lax.scan(layer, x, (weights.layers, jnp.arange(cfg.num_layers)))
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    return _logits(weights, x, cfg), emitted


def cached_forward(
    weights: Weights,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    attention: AttentionFn = dense_attention,
    drop_from_cache: Callable | None = None,
    observe_at: jax.Array | None = None,
):
    """Appends ``tokens [B, T]`` (at ``positions [B, T]``) to ``cache`` and runs the model.

    The new tokens go to slots ``cache.end[b] .. + T``; each attends to every valid slot
    up to its own. drop_from_cache(q, keys, valid, layer_index, query_slots): optional hook
    returning a reduced ``valid [B, S, KVH]`` (calibration over the cache); dropped slots
    are ignored by this call and leave that layer's cache.
    When the cache keeps an ``attention_window``, the attention probabilities of the new
    tokens at ``observe_at`` (``[R]`` indices into T, -1 = an all-zero row; default all T)
    join it as its newest rows.
    Returns ``(logits [B, T, V] float32, updated cache)``.
    """
    t = tokens.shape[1]
    slots = jnp.arange(cache.capacity)
    new_slots = cache.end[:, None] + jnp.arange(t)[None, :]  # [B, T]
    written = (slots[None, None, :] == new_slots[:, :, None]).any(axis=1)  # [B, S]
    causal = slots[None, None, :] <= new_slots[:, :, None]  # [B, T, S]
    x = weights.embed[tokens]
    cos, sin = rope_tables(cfg, positions)

    observe_at = jnp.arange(t) if observe_at is None else observe_at

    def layer(x, layer_in):
        lw, k_cache, v_cache, valid, window, index = layer_in
        q, k, v = _qkv(x, lw, cos, sin, cfg)
        k_cache = write_layer(k_cache, k, cache.end)
        v_cache = write_layer(v_cache, v, cache.end)
        if drop_from_cache is not None:
            valid = drop_from_cache(q, k_cache, valid, index, new_slots)
        valid = valid | written[:, :, None]  # [B, S, KVH]
        mask = jnp.moveaxis(valid, 2, 1)[:, :, None, :] & causal[:, None]  # [B, KVH, T, S]
        if window is not None:
            rows = jnp.clip(observe_at, 0, t - 1)
            probs = query_probs(q[:, rows], k_cache, mask[:, :, rows]).sum(axis=2)  # [B, KVH, R, S]
            probs = jnp.where((observe_at >= 0)[None, None, :, None], probs, 0.0)
            window = jnp.concatenate([window, probs], axis=2)[:, :, -window.shape[2]:]
        out = _finish_layer(x, attention(q, k_cache, v_cache, mask), lw, cfg)
        return out, (k_cache, v_cache, valid, window)

    layers_in = (weights.layers, cache.keys, cache.values, cache.valid, cache.attention_window,
                 jnp.arange(cfg.num_layers))
    x, outputs = jax.lax.scan(layer, x, layers_in)
    keys, values, valid, window = outputs
    new_cache = KVCache(keys=keys, values=values, valid=valid, end=cache.end + t, attention_window=window)
    return _logits(weights, x, cfg), new_cache


def appended_forward(
    weights: Weights,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache_keys: jax.Array,
    cache_values: jax.Array,
    cache_valid: jax.Array,
    emit: Callable,
):
    """New tokens on top of a cache that is only read, never written or copied.

    tokens, positions: ``[B, T]``; cache_keys, cache_values: ``[L, B, S, KVH, D]``;
    cache_valid: ``[B, S]`` bool, the slots every new token sees. Each new token attends to
    the valid cache slots and causally to the new tokens (``dense_attention_parts``), as if
    they were written right after the valid slots (``positions`` say where).
    emit(q, k, v, cache_keys, cache_values, layer_index): each layer's output, from the new
    tokens' rotated queries ``[B, T, H, D]``, keys and values ``[B, T, KVH, D]`` and the
    layer's cache ``[B, S, KVH, D]``. Returns ``(logits [B, T, V] float32, emitted)``,
    ``emitted`` stacked on a leading axis L.
    """
    x = weights.embed[tokens]
    cos, sin = rope_tables(cfg, positions)
    seen = cache_valid[:, None, :]  # [B, 1, S]: every new token sees the same slots
    among_new = causal_mask(tokens.shape[1])

    def layer(x, layer_in):
        lw, k_cache, v_cache, index = layer_in
        q, k, v = _qkv(x, lw, cos, sin, cfg)
        out = dense_attention_parts(q, ((k_cache, v_cache, seen), (k, v, among_new)))
        return _finish_layer(x, out, lw, cfg), emit(q, k, v, k_cache, v_cache, index)

    x, emitted = jax.lax.scan(layer, x, (weights.layers, cache_keys, cache_values, jnp.arange(cfg.num_layers)))
    return _logits(weights, x, cfg), emitted
