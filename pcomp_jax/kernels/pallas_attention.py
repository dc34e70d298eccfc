"""Causal flash attention as a Pallas kernel (Triton lowering on GPU, ``interpret`` on CPU).

One program per (query block, batch row, query head). The program keeps its query block
in registers and walks the key blocks up to the diagonal with an online softmax. Grouped
query attention costs no copy: the key/value block spec of query head ``h`` points at KV
head ``h // group`` of the same arrays. An optional key-keep mask (calibration) removes
keys per KV head; a query always sees itself. An optional sliding window (Gemma 3's local
layers) comes as two ``[B, T]`` int32 arrays, the keys' positions and each query's lowest
visible key position (its position - window + 1), so that the window may be traced.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from . import NEG_INF


def _windowed_kernel(q_ref, k_ref, v_ref, keep_ref, key_pos_ref, lowest_ref, o_ref, **kw):
    """``_kernel`` with a sliding window: key_pos_ref, lowest_ref: ``[T]`` int32 (the keys'
    positions; per query, the lowest key position it sees)."""
    _kernel(q_ref, k_ref, v_ref, keep_ref, o_ref, window_refs=(key_pos_ref, lowest_ref), **kw)


def _kernel(q_ref, k_ref, v_ref, keep_ref, o_ref, *, block_q: int, block_k: int, scale: float, window_refs=None):
    """q_ref/o_ref: ``[block_q, D]``; k_ref/v_ref: ``[T, D]`` of this KV head; keep_ref: ``[T]`` int32."""
    i = pl.program_id(0)
    q = q_ref[...]
    q_idx = i * block_q + jnp.arange(block_q)
    if window_refs is not None:
        lowest = window_refs[1][pl.ds(i * block_q, block_q)]

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * block_k, block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        keep = keep_ref[keys] != 0
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        k_idx = j * block_k + jnp.arange(block_k)
        visible = (k_idx[None, :] <= q_idx[:, None]) & (keep[None, :] | (k_idx[None, :] == q_idx[:, None]))
        if window_refs is not None:
            visible = visible & (window_refs[0][keys][None, :] >= lowest[:, None])
        s = jnp.where(visible, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc * correction[:, None] + pv, m_new, l * correction + p.sum(axis=1)

    d = q.shape[-1]
    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), NEG_INF, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    upper = jax.lax.div((i + 1) * block_q + block_k - 1, block_k)
    acc, _, l = jax.lax.fori_loop(0, upper, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def pallas_causal_attention(q, k, v, key_keep=None, key_positions=None, lowest_positions=None, block_q: int = 64,
                            block_k: int = 64, interpret: bool = False):
    """Causal attention inside each row. q: ``[B, T, H, D]``; k, v: ``[B, T, KVH, D]``;
    key_keep: optional ``[B, KVH, T]`` bool. Returns ``[B, T, H, D]`` in q's dtype.
    key_positions, lowest_positions: an optional sliding window, both ``[B, T]`` int32: a
    query sees a key only if the key's position is at least the query's lowest position.

    T is padded to a multiple of the block sizes (padding keys sit after every real
    query, so causality hides them). ``interpret=True`` runs the kernel on any backend.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    step = math.lcm(block_q, block_k)
    padded = step * math.ceil(t / step)
    if padded != t:
        widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
    keep = jnp.ones((b, kvh, t), jnp.int32) if key_keep is None else key_keep.astype(jnp.int32)
    keep = jnp.pad(keep, ((0, 0), (0, 0), (0, padded - t)))
    squeezed = pl.squeezed
    in_specs = [
        pl.BlockSpec((squeezed, block_q, squeezed, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((squeezed, padded, squeezed, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((squeezed, padded, squeezed, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((squeezed, squeezed, padded), lambda i, bi, hi: (bi, hi // group, 0)),
    ]
    inputs = [q, k, v, keep]
    if key_positions is None:
        kernel = functools.partial(_kernel, block_q=block_q, block_k=block_k, scale=d**-0.5)
    else:
        kernel = functools.partial(_windowed_kernel, block_q=block_q, block_k=block_k, scale=d**-0.5)
        row = lambda x: jnp.pad(x.astype(jnp.int32), ((0, 0), (0, padded - t)))  # padding: after every real query
        inputs += [row(key_positions), row(lowest_positions)]
        in_specs += [pl.BlockSpec((squeezed, padded), lambda i, bi, hi: (bi, 0))] * 2
    out = pl.pallas_call(
        kernel,
        grid=(padded // block_q, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((squeezed, block_q, squeezed, d), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2),  # Triton, not Mosaic GPU
        name="pcomp_causal_attention",
    )(*inputs)
    return out[:, :t]
