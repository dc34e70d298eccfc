"""The static-shape KV cache pytree used for decoding.

Slots are filled left to right; ``valid`` says, per layer and KV head, which slots hold
a token that attention may use (after KV eviction each head keeps its own tokens; after
calibration a layer may drop some) and ``end`` is where each batch row writes next. Keys are stored already rotated by RoPE
at their own position, so a slot's content never changes once written.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from .axes import axes_field
from .errors import PcompError


@flax.struct.dataclass
class KVCache:
    """keys, values: ``[L, B, S, KVH, D]``; valid: ``[L, B, S, KVH]`` bool; end: ``[B]`` int32.

    attention_window: None, or ``[L, B, KVH, w, S]`` float32: the attention probabilities
    of the last w queries over the slots, summed over each KV head's query heads, as they
    were when those queries ran (zero for slots written later); decode-time eviction
    (``decode.DecodeEviction``) scores the cache by it, and ``cached_forward`` keeps it.
    positions: None, or ``[L, B, S, KVH]`` int32 (as ``valid``: a compressed cache keeps
    other tokens per layer and KV head in one slot): the RoPE position of each entry's
    token, which sliding-window layers compare with a query's; ``cached_forward`` writes
    the new tokens' positions into it. None means a slot's position is its index (a cache
    filled from position 0 on, as ``cache_from_prefill`` makes for one prompt); a cache
    whose slots sit at other positions (chunks laid out in parallel, kept tokens) must
    carry them for a model with sliding-window layers. Models without them never read it.
    """

    keys: jax.Array = axes_field("layers", "batch", "cache_slots", "kv_heads", "head_dim")
    values: jax.Array = axes_field("layers", "batch", "cache_slots", "kv_heads", "head_dim")
    valid: jax.Array = axes_field("layers", "batch", "cache_slots", "kv_heads")
    end: jax.Array = axes_field("batch")
    attention_window: jax.Array | None = axes_field("layers", "batch", "kv_heads", "observed", "cache_slots",
                                                    optional=True)
    positions: jax.Array | None = axes_field("layers", "batch", "cache_slots", "kv_heads", optional=True)

    @property
    def capacity(self) -> int:
        """Number of slots S."""
        return self.keys.shape[2]


def cache_from_prefill(keys: jax.Array, values: jax.Array, lengths: jax.Array, capacity: int,
                       positions: jax.Array | None = None) -> KVCache:
    """Places a prefill's per-layer K/V into a cache with room for more tokens.

    keys, values: ``[L, B, T, KVH, D]`` from ``model.prefill_forward``; lengths: ``[B]``,
    the number of real (non-padding) tokens of each row, which sit at slots ``0..len-1``.
    positions: optional ``[B, T]`` RoPE positions of the prefill's tokens, kept in the
    cache for every layer and KV head (``KVCache.positions``; free slots get -1 until
    written); None: each slot's position is its index. Returns a cache of ``capacity >= T`` slots whose next write
    goes to slot ``len``.
    """
    num_layers, batch, t, kvh, d = keys.shape
    if capacity < t:
        raise PcompError(f"cache capacity {capacity} is smaller than the prefill length {t}")
    pad = ((0, 0), (0, 0), (0, capacity - t), (0, 0), (0, 0))
    lengths = jnp.asarray(lengths, jnp.int32)
    valid = jnp.arange(capacity)[None, :] < lengths[:, None]
    valid = jnp.broadcast_to(valid[None, :, :, None], (num_layers, batch, capacity, kvh))
    if positions is not None:
        positions = jnp.pad(jnp.asarray(positions, jnp.int32), ((0, 0), (0, capacity - t)), constant_values=-1)
        positions = jnp.broadcast_to(positions[None, :, :, None], valid.shape)
    return KVCache(jnp.pad(keys, pad), jnp.pad(values, pad), valid, lengths, positions=positions)


def write_layer(cache_layer: jax.Array, new: jax.Array, end: jax.Array) -> jax.Array:
    """Writes ``new [B, T, KVH, D]`` into ``cache_layer [B, S, KVH, D]`` at slots ``end[b]..``."""
    write_row = lambda c, x, e: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (e, 0, 0))
    return jax.vmap(write_row)(cache_layer, new, end)
