"""A functional Llama-family decoder in JAX (Llama, Mistral, Qwen2, Qwen3, Gemma 3, SmolLM2).

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

The families' differences are static config fields (``ModelConfig``): QK-norm, post norms,
the embedding scale, the MLP activation, the query scale. Gemma 3's two layer kinds are
data the scan carries, not Python branches: each layer's sliding window (an int32, 0 for
a global layer) and which of two precomputed RoPE table sets it reads (``layer_kinds``).
A model without local layers carries neither, and its program has no window masks.
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
from .rope import apply_rope, layer_rope_tables


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
    q_norm: jax.Array | None = axes_field("layers", "head_dim", optional=True)  # [L, D] (QK-norm) or None
    k_norm: jax.Array | None = axes_field("layers", "head_dim", optional=True)  # [L, D] or None
    post_attn_norm: jax.Array | None = axes_field("layers", "embed", optional=True)  # [L, E] (Gemma 3) or None
    post_mlp_norm: jax.Array | None = axes_field("layers", "embed", optional=True)  # [L, E] or None


@flax.struct.dataclass
class Weights:
    """All model weights. ``lm_head`` is None when the output reuses ``embed`` (tied)."""

    embed: jax.Array = axes_field("vocab", "embed")  # [V, E]
    layers: LayerWeights = flax.struct.field()
    final_norm: jax.Array = axes_field("embed")  # [E]
    lm_head: jax.Array | None = axes_field("embed", "vocab")  # [E, V] or None


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, returned in x's dtype. (Gemma's
    norms scale by ``1 + w``; its loaders store ``1 + w``, so one norm serves every family.)"""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf.astype(x.dtype) * scale).astype(x.dtype)


def dot(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` in mixed precision: inputs in the weights' dtype, products
    accumulated and returned in float32 (``preferred_element_type``), as GPU and TPU matrix
    units and CPUs with bfloat16 dot instructions compute them. For float32 weights: a plain
    float32 einsum."""
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def embed(weights: Weights, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Token embeddings ``[B, T, E]``, times ``cfg.embed_scale`` (in the weights' dtype) when set."""
    x = weights.embed[tokens]
    if cfg.embed_scale is not None:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    return x


def layer_kinds(cfg: ModelConfig):
    """Per-layer data the layer scan carries: ``(windows, rope_sets)``, ``windows`` an int32
    ``[L]`` of sliding windows (``GLOBAL_WINDOW`` for a global layer) or None when no layer
    is local, ``rope_sets`` an int32 ``[L]`` (0: the global RoPE tables, 1: the local ones)
    or None when both kinds rotate alike."""
    if not cfg.has_sliding_layers:
        return None, None
    windows = jnp.asarray([w if w > 0 else GLOBAL_WINDOW for w in cfg.sliding_windows], jnp.int32)
    rope_sets = jnp.asarray([int(w > 0) for w in cfg.sliding_windows], jnp.int32) if cfg.has_local_rope else None
    return windows, rope_sets


GLOBAL_WINDOW = 2**30  # a global layer's window: larger than any position difference


def window_of_layer(cfg: ModelConfig, layer_index):
    """The sliding window of layer ``layer_index`` (an int or traced index) as an int32
    scalar (``GLOBAL_WINDOW`` for a global layer), or None when the model has no local
    layers (what a scanned layer's hooks compare positions with)."""
    windows, _ = layer_kinds(cfg)
    return None if windows is None else windows[layer_index]


def _layer_tables(cos, sin, rope_set):
    """The RoPE tables of one layer: the only set, or the set ``rope_set`` of ``layer_rope_tables``."""
    if rope_set is None:
        return cos, sin
    return cos[rope_set], sin[rope_set]


def _qkv(x, lw: LayerWeights, cos, sin, cfg: ModelConfig):
    """Projects ``x [B, T, E]`` to rotated q ``[B,T,H,D]`` and rotated k, plain v ``[B,T,KVH,D]``,
    in x's dtype (projections accumulated, biases added, QK-norm and RoPE applied in float32).
    With ``cfg.query_scale`` q comes out multiplied by ``query_scale * sqrt(D)``, so that the
    attention backends' ``D ** -0.5`` gives the model's score scale."""
    h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
    q, k, v = (dot("bte,ehd->bthd", h, w) for w in (lw.wq, lw.wk, lw.wv))
    if lw.bq is not None:
        q, k, v = q + lw.bq, k + lw.bk, v + lw.bv
    if cfg.qk_norm:
        q, k = rms_norm(q, lw.q_norm, cfg.rms_norm_eps), rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    if cfg.query_scale is not None:
        q = q * (cfg.query_scale * cfg.head_dim**0.5)
    return q.astype(x.dtype), apply_rope(k, cos, sin).astype(x.dtype), v.astype(x.dtype)


def _finish_layer(x, attn_out, lw: LayerWeights, cfg: ModelConfig):
    """Output projection, residual, gated MLP (SwiGLU, or GELU for Gemma) and residual, with
    Gemma's norms on both outputs when ``cfg.post_norms``. x: ``[B, T, E]``; the residual
    stream stays in x's dtype, the MLP's activations in float32 until the down projection."""
    attn = dot("bthd,hde->bte", attn_out, lw.wo)
    if cfg.post_norms:
        attn = rms_norm(attn.astype(x.dtype), lw.post_attn_norm, cfg.rms_norm_eps)
    x = (x + attn).astype(x.dtype)
    h = rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
    gate = dot("bte,ef->btf", h, lw.w_gate)
    gate = jax.nn.silu(gate) if cfg.mlp_activation == "silu" else jax.nn.gelu(gate, approximate=True)
    up = dot("bte,ef->btf", h, lw.w_up)
    out = dot("btf,fe->bte", gate * up, lw.w_down)
    if cfg.post_norms:
        out = rms_norm(out.astype(x.dtype), lw.post_mlp_norm, cfg.rms_norm_eps)
    return (x + out).astype(x.dtype)


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
    A model with sliding-window layers calls ``attention(q, k, v, keep, window=w,
    positions=positions)`` with each layer's window (traced; global layers get one larger
    than any row), which dense and blockwise take.
    """
    x = embed(weights, tokens, cfg)
    cos, sin = layer_rope_tables(cfg, positions)
    windows, rope_sets = layer_kinds(cfg)

    def layer(x, layer_in):
        lw, index, window, rope_set = layer_in
        q, k, v = _qkv(x, lw, *_layer_tables(cos, sin, rope_set), cfg)
        keep = None if key_keep is None else key_keep(q, k, index)
        if window is None:
            out = attention(q, k, v, keep)
        else:
            out = attention(q, k, v, keep, window=window, positions=positions)
        return _finish_layer(x, out, lw, cfg), emit(q, k, v, index)

    x, emitted = jax.lax.scan(layer, x, (weights.layers, jnp.arange(cfg.num_layers), windows, rope_sets))
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
    are ignored by this call and leave that layer's cache. A model with sliding-window
    layers also passes ``window_visible=`` ``[B, KVH, T, S]``: which slots each new token's
    window shows in this layer (all, in a global layer), so that a hook scores only what
    the layer's attention reads.
    When the cache keeps an ``attention_window``, the attention probabilities of the new
    tokens at ``observe_at`` (``[R]`` indices into T, -1 = an all-zero row; default all T)
    join it as its newest rows.
    Sliding-window layers compare ``positions`` with the cache entries' positions
    (``KVCache.positions``, or each slot's index when the cache carries none); a cache
    carrying ``positions`` gets the new ones written, in every layer and KV head.
    Returns ``(logits [B, T, V] float32, updated cache)``.
    """
    t = tokens.shape[1]
    slots = jnp.arange(cache.capacity)
    new_slots = cache.end[:, None] + jnp.arange(t)[None, :]  # [B, T]
    written = (slots[None, None, :] == new_slots[:, :, None]).any(axis=1)  # [B, S]
    causal = slots[None, None, :] <= new_slots[:, :, None]  # [B, T, S]
    x = embed(weights, tokens, cfg)
    cos, sin = layer_rope_tables(cfg, positions)
    windows, rope_sets = layer_kinds(cfg)
    cache_positions = cache.positions
    if cache_positions is not None:
        new_positions = jnp.broadcast_to(positions[:, :, None], (*positions.shape, cache.keys.shape[3]))
        cache_positions = jax.vmap(lambda c: write_layer(c[..., None], new_positions[..., None], cache.end)[..., 0]
                                   )(cache_positions)  # [L, B, S, KVH]
    if windows is not None and cache_positions is None:
        distance = positions[:, :, None] - slots[None, None, :]  # [B, T, S]: slots are positions

    observe_at = jnp.arange(t) if observe_at is None else observe_at

    def layer(x, layer_in):
        lw, k_cache, v_cache, valid, window, index, sliding, rope_set, key_positions = layer_in
        q, k, v = _qkv(x, lw, *_layer_tables(cos, sin, rope_set), cfg)
        k_cache = write_layer(k_cache, k, cache.end)
        v_cache = write_layer(v_cache, v, cache.end)
        sees = None  # a local layer's window: [B, 1 or KVH, T, S]
        if sliding is not None and key_positions is None:
            sees = (distance < sliding)[:, None]
        elif sliding is not None:
            per_head = positions[:, None, :, None] - jnp.moveaxis(key_positions, 2, 1)[:, :, None, :]
            sees = per_head < sliding  # [B, KVH, T, S]
        if drop_from_cache is not None and sees is None:
            valid = drop_from_cache(q, k_cache, valid, index, new_slots)
        elif drop_from_cache is not None:
            shape = (*valid.shape[:1], valid.shape[2], t, cache.capacity)
            valid = drop_from_cache(q, k_cache, valid, index, new_slots, window_visible=jnp.broadcast_to(sees, shape))
        valid = valid | written[:, :, None]  # [B, S, KVH]
        mask = jnp.moveaxis(valid, 2, 1)[:, :, None, :] & causal[:, None]  # [B, KVH, T, S]
        if sees is not None:
            mask = mask & sees
        if window is not None:
            rows = jnp.clip(observe_at, 0, t - 1)
            probs = query_probs(q[:, rows], k_cache, mask[:, :, rows]).sum(axis=2)  # [B, KVH, R, S]
            probs = jnp.where((observe_at >= 0)[None, None, :, None], probs, 0.0)
            window = jnp.concatenate([window, probs], axis=2)[:, :, -window.shape[2]:]
        out = _finish_layer(x, attention(q, k_cache, v_cache, mask), lw, cfg)
        return out, (k_cache, v_cache, valid, window)

    layers_in = (weights.layers, cache.keys, cache.values, cache.valid, cache.attention_window,
                 jnp.arange(cfg.num_layers), windows, rope_sets, None if windows is None else cache_positions)
    x, outputs = jax.lax.scan(layer, x, layers_in)
    keys, values, valid, window = outputs
    new_cache = KVCache(keys=keys, values=values, valid=valid, end=cache.end + t, attention_window=window,
                        positions=cache_positions)
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
    cache_positions: jax.Array | None = None,
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
    cache_positions: optional ``[B, S]`` RoPE positions of the cache's slots, which
    sliding-window layers compare with ``positions`` (default: each slot's index).
    """
    x = embed(weights, tokens, cfg)
    cos, sin = layer_rope_tables(cfg, positions)
    windows, rope_sets = layer_kinds(cfg)
    seen = cache_valid[:, None, :]  # [B, 1, S]: every new token sees the same slots
    among_new = causal_mask(tokens.shape[1])
    if windows is not None:
        if cache_positions is None:
            cache_positions = jnp.broadcast_to(jnp.arange(cache_keys.shape[2], dtype=jnp.int32), cache_valid.shape)
        to_cache = positions[:, :, None] - cache_positions[:, None, :]  # [B, T, S]
        to_new = positions[:, :, None] - positions[:, None, :]  # [B, T, T]

    def layer(x, layer_in):
        lw, k_cache, v_cache, index, window, rope_set = layer_in
        q, k, v = _qkv(x, lw, *_layer_tables(cos, sin, rope_set), cfg)
        if window is None:
            parts = ((k_cache, v_cache, seen), (k, v, among_new))
        else:
            parts = ((k_cache, v_cache, seen & (to_cache < window)), (k, v, among_new & (to_new < window)))
        out = dense_attention_parts(q, parts)
        return _finish_layer(x, out, lw, cfg), emit(q, k, v, k_cache, v_cache, index)

    x, emitted = jax.lax.scan(layer, x, (weights.layers, cache_keys, cache_values, jnp.arange(cfg.num_layers),
                                         windows, rope_sets))
    return _logits(weights, x, cfg), emitted
