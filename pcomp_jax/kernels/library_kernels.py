"""Causal prefill through the attention kernels that JAX itself ships, behind the same
``(q, k, v) -> out`` interface as ``pcomp_jax.attention``'s backends:

- ``splash_causal_attention``: splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``),
  the Pallas kernel for TPU; ``interpret=True`` runs it anywhere (the CPU tests);
- ``mosaic_gpu_causal_attention``: the Hopper flash attention written with Mosaic GPU
  (``jax.experimental.pallas.ops.gpu.attention_mgpu``; warpgroup matmuls, bulk tensor copies),
  16-bit inputs (computed in float16) on a compute-capability 9.x GPU only.

Both take grouped-query heads without copying K/V (the kernels map query head h to KV head
h // G) and no calibration key mask (their masks are fixed per kernel, not per row and KV
head; a key mask is refused at configuration time). Rows are padded at the end to the
kernels' block multiple; causality hides the padding from every real query. Neither kernel
scales the scores, so q is scaled by ``D ** -0.5`` first.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import jax
import jax.numpy as jnp

SPLASH_BLOCK = 512  # largest splash block; rows are padded to a multiple of 128 (a TPU lane)
MOSAIC_BLOCK_Q, MOSAIC_BLOCK_KV = 64, 128  # the kernel needs rows that are multiples of 2 * block_q and block_kv


def _pad_rows(x: jnp.ndarray, length: int) -> jnp.ndarray:
    """``[B, T, heads, D]`` padded with zeros to ``[B, length, heads, D]``."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
    """A splash kernel for ``heads`` query heads over causal rows of ``length`` (its mask
    tables are computed once per shape, in NumPy, when traced)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_causal_attention(q, k, v, key_keep=None, interpret: bool = False):
    """Causal attention inside each row with splash attention. q: ``[B, T, H, D]``; k, v:
    ``[B, T, KVH, D]``. Returns ``[B, T, H, D]`` in q's dtype. ``interpret``: run the Pallas
    kernel in the interpreter (any backend; slow)."""
    if key_keep is not None:
        raise ValueError("splash attention takes no calibration key mask")
    b, t, h, d = q.shape
    padded = 128 * math.ceil(t / 128)
    block = math.gcd(padded, SPLASH_BLOCK)  # a multiple of 128 that divides the row
    heads_first = lambda x: _pad_rows(x, padded).transpose(0, 2, 1, 3)  # [B, heads, T, D]
    kernel = _splash_kernel(h, padded, block, interpret)
    scaled = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)  # one rounding
    out = jax.vmap(kernel)(heads_first(scaled), heads_first(k), heads_first(v))
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)


def mosaic_gpu_available() -> str | None:
    """None when the Mosaic GPU flash attention can run here, else why not (one line)."""
    if importlib.util.find_spec("jax.experimental.pallas.ops.gpu.attention_mgpu") is None:
        return f"this jax ({jax.__version__}) ships no Mosaic GPU attention (jax.experimental.pallas.ops.gpu.attention_mgpu)"
    if jax.default_backend() != "gpu":
        return f"the mosaic_gpu attention backend needs an NVIDIA Hopper GPU (this run is on {jax.default_backend()})"
    capability = getattr(jax.devices()[0], "compute_capability", "")
    if not str(capability).startswith("9"):
        return (f"the mosaic_gpu attention backend needs a Hopper GPU (compute capability 9.x); "
                f"{jax.devices()[0].device_kind} has {capability or 'an unknown capability'}")
    return None


def mosaic_gpu_causal_attention(q, k, v, key_keep=None):
    """Causal attention inside each row with JAX's Mosaic GPU flash attention (Hopper).
    q: ``[B, T, H, D]`` bfloat16 or float16, D a multiple of 64; k, v: ``[B, T, KVH, D]``.
    Returns ``[B, T, H, D]``."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    if key_keep is not None:
        raise ValueError("the Mosaic GPU attention takes no calibration key mask")
    t, d = q.shape[1], q.shape[3]
    step = math.lcm(2 * MOSAIC_BLOCK_Q, MOSAIC_BLOCK_KV)
    padded = step * math.ceil(t / step)
    config = attention_mgpu.TuningConfig(block_q=MOSAIC_BLOCK_Q, block_kv=MOSAIC_BLOCK_KV, max_concurrent_steps=2,
                                         causal=True)
    # The kernel's shared-memory buffers are float16 (jax 0.11.2 refuses bfloat16 operands, seen on
    # an H100): bfloat16 is converted, which keeps more mantissa bits; values past +-65504 would
    # overflow (not seen in attention inputs of the models here).
    half = lambda x: _pad_rows(x, padded).astype(jnp.float16)
    out = attention_mgpu.attention(half(q.astype(jnp.float32) * d**-0.5), half(k), half(v), config)  # one rounding
    return out[:, :t].astype(q.dtype)
