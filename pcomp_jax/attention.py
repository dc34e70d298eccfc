"""Attention over grouped-query heads.

Queries have ``H`` heads and keys/values ``KVH`` heads; each KV head serves
``H // KVH`` query heads without being copied (the query heads are grouped instead).
``dense_attention`` is the XLA reference: it materialises the ``[T, S]`` scores.

Prefill needs only causal attention inside each row (padding sits after the real tokens,
where causality hides it), so its backends share the signature
``(q, k, v, key_keep=None) -> out`` (``key_keep``: calibration's per-KV-head key mask);
a model with sliding-window layers (Gemma 3's local layers) also passes
``window=`` (the layer's window, traced) and ``positions=`` (the row's RoPE positions),
which dense, blockwise and our Pallas kernel take and the other kernels refuse by name:
``dense_causal_attention``, the flash-style ``blockwise_causal_attention`` (memory linear
in the row length), our Pallas kernel, cuDNN, and the kernels JAX ships (splash attention
for TPU, Mosaic GPU flash attention for Hopper). ``causal_attention(name, ...)`` picks one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .errors import ConfigError
from .kernels import NEG_INF


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


def query_probs(q: jnp.ndarray, k: jnp.ndarray, visible: jnp.ndarray) -> jnp.ndarray:
    """Attention probabilities of a few queries, zero where a key is not visible.

    q: ``[B, r, H, D]``; k: ``[B, S, KVH, D]``; visible: ``[B, r, S]`` or per KV head
    ``[B, KVH, r, S]``. Returns ``[B, KVH, G, r, S]`` float32. Used for the small O(r x S)
    products of SnapKV scores, calibration and the analyzer, apart from the attention kernels.
    """
    scores = grouped_scores(q, k)
    visible = visible[:, None, None] if visible.ndim == 3 else visible[:, :, None]
    return jnp.where(visible, jax.nn.softmax(jnp.where(visible, scores, NEG_INF), axis=-1), 0.0)


def dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Softmax attention with an explicit mask.

    q: ``[B, T, H, D]``; k, v: ``[B, S, KVH, D]``; mask: boolean (True = may attend),
    ``[T, S]``, ``[B, T, S]`` or per KV head ``[B, KVH, T, S]``. Returns ``[B, T, H, D]`` in q's dtype.
    """
    return dense_attention_parts(q, ((k, v, mask),))


def dense_attention_parts(q: jnp.ndarray, parts) -> jnp.ndarray:
    """Softmax attention over keys held in several arrays, without joining them (e.g. a
    read-only cache and the tokens being appended to it): one softmax over every part's keys.

    q: ``[B, T, H, D]``; parts: ``((k, v, mask), ...)``, each k, v ``[B, S_i, KVH, D]`` with a
    mask as ``dense_attention``'s for its ``S_i`` keys. Returns ``[B, T, H, D]`` in q's dtype.
    """
    b, t, h, d = q.shape
    scores = [jnp.where(expand_mask(mask, b, k.shape[2]), grouped_scores(q, k), NEG_INF) for k, _, mask in parts]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0.0, 0
    for k, v, _ in parts:
        part = probs[..., start: start + k.shape[1]].astype(v.dtype)
        out = out + jnp.einsum("bkgts,bskd->btkgd", part, v, preferred_element_type=jnp.float32)
        start += k.shape[1]
    return out.reshape(b, t, h, d).astype(q.dtype)


def window_mask(query_positions: jnp.ndarray, key_positions: jnp.ndarray, window) -> jnp.ndarray:
    """Sliding-window visibility: True where ``query position - key position < window``
    (causality is applied apart). query_positions: ``[B, T]``; key_positions: ``[B, S]``;
    window: an int (traced or not). Returns ``[B, T, S]`` bool."""
    return (query_positions[:, :, None] - key_positions[:, None, :]) < window


def dense_causal_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, key_keep=None, window=None,
                           positions=None) -> jnp.ndarray:
    """Causal attention inside each row with the dense reference. Shapes as ``dense_attention``.

    key_keep: optional ``[B, KVH, T]`` bool; False removes a key from every query of that
    KV head (calibration), except from its own position, which every query always sees.
    window: optional sliding window (an int, traced or not): a query then sees only the
    keys whose position is less than ``window`` before its own; positions: ``[B, T]``
    RoPE positions of the row (default ``0..T-1``).
    """
    mask = causal_mask(q.shape[1], k.shape[1])
    if window is not None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        mask = mask[None] & window_mask(positions, positions, window)  # [B, T, S]
    if key_keep is not None:
        diagonal = jnp.eye(q.shape[1], k.shape[1], dtype=bool)
        per_head = mask[None, None] if mask.ndim == 2 else mask[:, None]
        mask = (per_head & key_keep[:, :, None, :]) | diagonal
    return dense_attention(q, k, v, mask)


def even_blocks(length: int, max_block: int, multiple: int = 64) -> tuple[int, int]:
    """``(block, count)``: ``length`` split into the fewest blocks of at most ``max_block``,
    each rounded up to ``multiple`` (so a 1088-token row gets 3 blocks of 384, not 3 of 512)."""
    count = math.ceil(length / max_block)
    block = min(max_block, multiple * math.ceil(length / count / multiple))
    return block, math.ceil(length / block)


def blockwise_causal_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, key_keep=None, block: int = 512, window=None, positions=None
) -> jnp.ndarray:
    """Flash-style causal attention: online softmax over key blocks, one query block at a time.

    q: ``[B, T, H, D]``; k, v: ``[B, T, KVH, D]`` (same T: a row attending to itself).
    Key blocks past a query block's diagonal are skipped, so work is about half of dense
    and memory is ``O(T x block)`` instead of ``O(T^2)``. key_keep: as in
    ``dense_causal_attention``. ``block`` is the largest block; T is split into equal
    blocks no larger (``even_blocks``). Returns ``[B, T, H, D]``.

    Layout, chosen for XLA's CPU matmuls: rows go one at a time (``lax.map``), so a block's
    working set does not grow with the batch; the G query heads of a KV head are stacked
    along the query axis, so each block product is one ``[G*block, D] x [D, block]`` matmul
    per KV head; keys are stored transposed; only the diagonal block carries the causal
    mask (blocks below it see every key, up to calibration's additive key bias).
    window, positions: a sliding window as in ``dense_causal_attention``; each query block
    then starts at the first key block it can see, and every block carries the window mask.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    block, n = even_blocks(t, block, multiple=min(64, t))
    pad = n * block - t
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
    if key_keep is None:
        key_bias = jnp.zeros((b, kvh, n * block), jnp.float32)
    else:
        key_bias = jnp.where(jnp.pad(key_keep, ((0, 0), (0, 0), (0, pad))), 0.0, NEG_INF).astype(jnp.float32)
    if window is None:
        row = lambda args: _blockwise_row(*args, block=block)
        out = jax.lax.map(row, (q * d**-0.5, k, v, key_bias))
    else:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        positions = jnp.pad(positions.astype(jnp.int32), ((0, 0), (0, pad)))
        row = lambda args: _blockwise_row(*args[:4], block=block, positions=args[4], window=window)
        out = jax.lax.map(row, (q * d**-0.5, k, v, key_bias, positions))
    return out[:, :t].astype(q.dtype)


def _blockwise_row(q, k, v, key_bias, block: int, positions=None, window=None) -> jnp.ndarray:
    """One row of ``blockwise_causal_attention``. q: ``[T, H, D]`` (already scaled); k, v:
    ``[T, KVH, D]``; key_bias: ``[KVH, T]`` (0 or NEG_INF); T a multiple of ``block``;
    positions ``[T]`` and window: an optional sliding window. Returns ``[T, H, D]`` float32."""
    t, h, d = q.shape
    kvh = k.shape[1]
    g, n = h // kvh, t // block
    q_blocks = q.reshape(n, block, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(n, kvh, g * block, d)
    k_blocks = k.reshape(n, block, kvh, d).transpose(0, 2, 3, 1)  # [n, KVH, D, blk]
    v_blocks = v.reshape(n, block, kvh, d).transpose(0, 2, 1, 3)  # [n, KVH, blk, D]
    key_bias = key_bias.reshape(kvh, n, 1, block).transpose(1, 0, 2, 3)  # [n, KVH, 1, blk]
    causal = jnp.tile(jnp.where(causal_mask(block), 0.0, NEG_INF), (g, 1))  # [G*blk, blk]
    own_key = jnp.tile(jnp.eye(block, dtype=bool), (g, 1))  # query index = group * block + offset

    def accumulate(carry, qi, kj, vj, bias):
        m, l, acc = carry
        s = jnp.einsum("kqd,kds->kqs", qi, kj, preferred_element_type=jnp.float32) + bias
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        # p stays float32 (a bfloat16 copy of the [G*blk, blk] block costs more than the
        # dot gains on the CPU; the small value block is widened instead)
        pv = jnp.einsum("kqs,ksd->kqd", p, vj.astype(jnp.float32), preferred_element_type=jnp.float32)
        return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

    if window is not None:
        pos = positions.reshape(n, block)
        # key block j can matter to query block i only if some pair is inside the window
        seen = (pos.min(axis=1)[:, None] - pos.max(axis=1)[None, :]) < window  # [n, n]
        first = jnp.argmax(seen, axis=1)  # the first key block each query block sees

        def window_bias(i, j):  # [G*blk, blk], query index = group * block + offset
            inside = (pos[i][:, None] - pos[j][None, :]) < window
            return jnp.tile(jnp.where(inside, 0.0, NEG_INF), (g, 1))

    def query_block(i):
        qi = q_blocks[i]
        init = (
            jnp.full((kvh, g * block), NEG_INF, jnp.float32),
            jnp.zeros((kvh, g * block), jnp.float32),
            jnp.zeros((kvh, g * block, d), jnp.float32),
        )
        if window is None:
            below = jax.lax.fori_loop(
                0, i, lambda j, carry: accumulate(carry, qi, k_blocks[j], v_blocks[j], key_bias[j]), init
            )
            diagonal_bias = jnp.where(own_key, 0.0, key_bias[i] + causal)
        else:
            below = jax.lax.fori_loop(
                jnp.minimum(first[i], i), i,
                lambda j, carry: accumulate(carry, qi, k_blocks[j], v_blocks[j], key_bias[j] + window_bias(i, j)),
                init,
            )
            diagonal_bias = jnp.where(own_key, 0.0, key_bias[i] + causal + window_bias(i, i))
        _, l, acc = accumulate(below, qi, k_blocks[i], v_blocks[i], diagonal_bias)
        return acc / l[..., None]  # [KVH, G*blk, D]

    out = jax.lax.map(query_block, jnp.arange(n)).reshape(n, kvh, g, block, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(t, h, d)


def compiled_on(platforms: tuple[str, ...], kernel, *args):
    """``kernel(*args, interpret=False)`` where the program is lowered for one of ``platforms``,
    the interpreted kernel elsewhere (the CPU: ``causal_attention`` refuses a kernel on an
    accelerator it does not compile for). Decided when lowering (``jax.lax.platform_dependent``),
    not by the machine that traces: a program exported from the CPU for a GPU or TPU gets the kernel."""
    compiled = lambda *a: kernel(*a, interpret=False)
    return jax.lax.platform_dependent(*args, default=lambda *a: kernel(*a, interpret=True),
                                      **{platform: compiled for platform in platforms})


def no_window_message(name: str) -> str:
    """The refusal of sliding-window layers by kernel ``name``, naming the backends that take them."""
    return (f"the {name} attention backend takes no sliding window, and this model has sliding-window "
            f"(local) layers; use attention {', '.join(('auto',) + TAKES_WINDOW)}")


def _refuse_window(name: str, window) -> None:
    if window is not None:
        raise ConfigError(no_window_message(name))


def pallas_causal(q, k, v, key_keep=None, window=None, positions=None):
    """The Pallas kernel (``kernels.pallas_attention``): compiled with Triton for CUDA and ROCm,
    interpreted on the CPU; a sliding window (traced) as in ``dense_causal_attention``."""
    from .kernels.pallas_attention import pallas_causal_attention

    if key_keep is None:
        key_keep = jnp.ones((q.shape[0], k.shape[2], q.shape[1]), bool)
    if window is None:
        return compiled_on(("cuda", "rocm"), pallas_causal_attention, q, k, v, key_keep)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    positions = positions.astype(jnp.int32)
    return compiled_on(("cuda", "rocm"), pallas_causal_attention, q, k, v, key_keep, positions,
                       positions - window + 1)


def cudnn_causal_attention(q, k, v, key_keep=None, window=None, positions=None):
    """cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU only, no key masks)."""
    _refuse_window("cudnn", window)
    if key_keep is not None:
        raise ConfigError("the cudnn attention backend takes no calibration keep-mask; use blockwise or pallas")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def splash_causal(q, k, v, key_keep=None, window=None, positions=None):
    """JAX's splash attention (``kernels.library_kernels``): compiled for TPU, interpreted on the CPU."""
    from .kernels.library_kernels import splash_causal_attention

    _refuse_window("splash", window)
    if key_keep is not None:
        raise ConfigError(no_key_mask_message("splash"))
    return compiled_on(("tpu",), lambda q, k, v, interpret: splash_causal_attention(q, k, v, interpret=interpret),
                       q, k, v)


def mosaic_gpu_causal(q, k, v, key_keep=None, window=None, positions=None):
    """JAX's Mosaic GPU flash attention for Hopper (``kernels.library_kernels``)."""
    from .kernels.library_kernels import mosaic_gpu_causal_attention

    _refuse_window("mosaic_gpu", window)
    if q.shape[-1] % 64:
        raise ConfigError(f"the mosaic_gpu attention backend needs a head size that is a multiple of 64, this model's is "
                          f"{q.shape[-1]}; use attention cudnn or pallas")
    return mosaic_gpu_causal_attention(q, k, v, key_keep)


CAUSAL_BACKENDS = {
    "dense": dense_causal_attention,
    "blockwise": blockwise_causal_attention,
    "pallas": pallas_causal,
    "cudnn": cudnn_causal_attention,
    "splash": splash_causal,
    "mosaic_gpu": mosaic_gpu_causal,
}
NO_KEY_MASK = ("cudnn", "splash", "mosaic_gpu")  # kernels whose masks cannot vary per row and KV head
SIXTEEN_BIT = ("cudnn", "mosaic_gpu")  # kernels that take bfloat16 or float16 inputs only
KERNEL_PLATFORMS = {"pallas": ("gpu", "cpu"), "splash": ("tpu", "cpu"), "cudnn": ("gpu",), "mosaic_gpu": ("gpu",)}
TAKES_WINDOW = ("dense", "blockwise", "pallas")  # backends that take a sliding window (a traced per-layer value)


def no_key_mask_message(name: str) -> str:
    """The refusal of a key mask by kernel ``name``, naming the backends that take one here."""
    usable = "blockwise" if jax.default_backend() == "tpu" else "blockwise or pallas"
    return f"the {name} attention backend takes no calibration keep-mask; use {usable}"


def causal_attention(name: str, needs_key_mask: bool = False, dtype=None, sliding: bool = False):
    """The causal prefill backend called ``name``.

    sliding: the model has sliding-window layers (``ModelConfig.has_sliding_layers``):
    ``auto`` then picks Pallas on GPU and blockwise elsewhere, and a kernel that takes no
    window (cudnn, splash, mosaic_gpu) is refused.
    ``auto`` picks per platform: on GPU cuDNN for 16-bit inputs without a calibration
    key-mask, otherwise Pallas; on TPU splash attention without a key mask, otherwise
    blockwise; on the CPU blockwise at every length (measured: 4.4x faster than dense already
    for four 1088-token rows:
    ``python scripts/bench_attention_blocks.py --lengths 1088 --batch 4 --blocks 512``).
    A backend that cannot run this configuration raises ``ConfigError`` saying what to use.
    """
    platform = jax.default_backend()
    half = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        if sliding:
            name = "pallas" if platform == "gpu" else "blockwise"
        elif platform == "gpu":
            name = "cudnn" if half and not needs_key_mask else "pallas"
        elif platform == "tpu":
            name = "blockwise" if needs_key_mask else "splash"
        else:
            name = "blockwise"
    if name not in CAUSAL_BACKENDS:
        raise ConfigError(f"attention backend {name!r} is not available; choose one of: auto, {', '.join(CAUSAL_BACKENDS)}")
    if name in NO_KEY_MASK and needs_key_mask:
        raise ConfigError(no_key_mask_message(name))
    if sliding and name not in TAKES_WINDOW:
        raise ConfigError(no_window_message(name))
    if name == "cudnn" and platform != "gpu":
        raise ConfigError(f"the cudnn attention backend needs an NVIDIA GPU (this run is on {platform})")
    if name in KERNEL_PLATFORMS and platform not in KERNEL_PLATFORMS[name]:  # never an interpreted kernel on hardware
        raise ConfigError(f"the {name} attention kernel does not run on {platform} (it runs on "
                          f"{', '.join(KERNEL_PLATFORMS[name])}); use auto, blockwise or dense")
    if name == "mosaic_gpu":
        from .kernels.library_kernels import mosaic_gpu_available

        missing = mosaic_gpu_available()
        if missing:
            raise ConfigError(missing)
    if name in SIXTEEN_BIT and dtype is not None and not half:
        raise ConfigError(f"the {name} attention backend takes bfloat16 or float16 inputs, not {jnp.dtype(dtype).name}; "
                          "load the model with dtype bfloat16, or use attention pallas or blockwise")
    return CAUSAL_BACKENDS[name]
