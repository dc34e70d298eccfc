"""The ParallelComp prefill: rows -> sharded chunk prefill -> selection -> merged cache.

Stage 1 (parallel chunk prefill and query-NLL chunk scores), 1b (SnapKV eviction inside
every chunk, layer and KV head) and the merge of stage 2, as pure jittable functions:

    rows = chunking.build_rows(parts, chunk_len, window, num_rows)
    prefix_keys, prefix_values = prefill_prefix(weights, cfg, parts.prefix)
    state = empty_selection(cfg, top_k, capacity, dtype)
    for each group of group_size rows:                     # streaming: bounded memory
        scored = prefill_group(weights, cfg, *group_arrays, prefix_len=..., capacity=..., ...)
        state = keep_best_chunks(state, scored, top_k)     # running top-k, static shapes
    cache, question_start = merge_selection(prefix_keys, prefix_values, state, room)

(``pipeline.prefill_context`` is exactly this loop, with the rows sharded over devices.)

Stage 1c (calibration): ``chunk`` rules act inside ``prefill_group`` through the model's
per-layer ``key_keep`` hook; ``merged`` rules act in the question prefill
(``pipeline.question_prefill``) through ``cached_forward``'s ``drop_from_cache`` hook.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from .attention import dense_causal_attention
from .calibrate import chunk_keep_fn
from .cache import KVCache
from .compress import document_order, gather_tokens, keep_top_tokens, question_nll, snapkv_token_scores, top_k_lowest
from .model.config import ModelConfig
from .model.llama import Weights, prefill_forward


@flax.struct.dataclass
class ChunkSelection:
    """Compressed caches of K chunks with their scores (the running top-k state).

    keys, values: ``[L, K, cap, KVH, D]`` (rotated at row positions); kept_positions:
    ``[L, K, KVH, cap]`` row positions of the kept tokens; token_valid: ``[K, cap]``;
    scores: ``[K]`` query NLL (lower is better); chunk_ids: ``[K]`` document index;
    chunk_valid: ``[K]``; row_lengths: ``[K]`` ``len(P) + len(chunk)``.
    """

    keys: jax.Array
    values: jax.Array
    kept_positions: jax.Array
    token_valid: jax.Array
    scores: jax.Array
    chunk_ids: jax.Array
    chunk_valid: jax.Array
    row_lengths: jax.Array

    def take(self, idx: jax.Array) -> "ChunkSelection":
        """The chunks at ``idx [K']`` (a gather along every field's chunk axis)."""
        along_1 = lambda x: jnp.take(x, idx, axis=1)
        along_0 = lambda x: jnp.take(x, idx, axis=0)
        return ChunkSelection(
            keys=along_1(self.keys), values=along_1(self.values), kept_positions=along_1(self.kept_positions),
            token_valid=along_0(self.token_valid), scores=along_0(self.scores), chunk_ids=along_0(self.chunk_ids),
            chunk_valid=along_0(self.chunk_valid), row_lengths=along_0(self.row_lengths),
        )


def concat_selections(a: ChunkSelection, b: ChunkSelection) -> ChunkSelection:
    """Chunks of ``a`` followed by those of ``b``."""
    axis = {"keys": 1, "values": 1, "kept_positions": 1}
    return ChunkSelection(
        **{name: jnp.concatenate([getattr(a, name), getattr(b, name)], axis=axis.get(name, 0))
           for name in ChunkSelection.__dataclass_fields__}
    )


def empty_selection(cfg: ModelConfig, top_k: int, capacity: int, dtype) -> ChunkSelection:
    """A state of ``top_k`` invalid chunks (score +inf) to start the running top-k from."""
    shape = (cfg.num_layers, top_k, capacity, cfg.num_kv_heads, cfg.head_dim)
    return ChunkSelection(
        keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
        kept_positions=jnp.zeros((cfg.num_layers, top_k, cfg.num_kv_heads, capacity), jnp.int32),
        token_valid=jnp.zeros((top_k, capacity), bool), scores=jnp.full((top_k,), jnp.inf, jnp.float32),
        chunk_ids=jnp.full((top_k,), -1, jnp.int32), chunk_valid=jnp.zeros((top_k,), bool),
        row_lengths=jnp.zeros((top_k,), jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill_prefix(weights: Weights, cfg: ModelConfig, prefix: jax.Array):
    """K/V of the prefix P, identical in every row: computed once. prefix: ``[P]`` ->
    ``(keys, values)`` each ``[L, P, KVH, D]``."""
    positions = jnp.arange(prefix.shape[0], dtype=jnp.int32)[None]
    _, (keys, values) = prefill_forward(weights, cfg, prefix[None], positions, logits_at=jnp.zeros((1, 1), jnp.int32))
    return keys[:, 0], values[:, 0]


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg", "prefix_len", "capacity", "obs_window", "pool_kernel", "attention", "chunk_rules", "token_scoring"
    ),
)
def prefill_group(
    weights: Weights,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    row_lengths: jax.Array,
    chunk_lengths: jax.Array,
    chunk_ids: jax.Array,
    question_targets: jax.Array,
    question_mask: jax.Array,
    score_at: jax.Array,
    *,
    prefix_len: int,
    capacity: int,
    obs_window: int,
    pool_kernel: int,
    attention=dense_causal_attention,
    chunk_rules: tuple = (),
    token_scoring: str = "snapkv",
) -> ChunkSelection:
    """Stage 1 + 1b for a group of G rows (arrays as in ``chunking.Rows``, G leading).

    Runs the rows in parallel (causal inside each row), scores each chunk by the mean NLL
    of its question tokens, and keeps ``capacity`` content tokens per layer and KV head
    by SnapKV. ``chunk_rules``: stage-``chunk`` calibration rules (the SnapKV scores still
    use plain causal attention). ``token_scoring``: ``snapkv`` (ALGORITHM.md stage 1b) or
    ``recent`` (StreamingLLM's window: the last ``capacity`` content tokens; P stays as the
    sinks). Returns a ``ChunkSelection`` of the G chunks (padding rows invalid).
    """
    r = tokens.shape[1]
    slot = jnp.arange(r)[None, :]
    content = (slot >= prefix_len) & (slot < prefix_len + chunk_lengths[:, None])  # [G, R]
    recent_scores = jnp.where(content, slot.astype(jnp.float32), -jnp.inf)  # later = higher

    def emit(q, k, v, layer_index):
        if token_scoring == "recent":
            token_scores = jnp.broadcast_to(recent_scores[:, None, :], (k.shape[0], k.shape[2], r))
        else:
            token_scores = snapkv_token_scores(q, k, row_lengths, obs_window, pool_kernel, content)
        idx, _ = keep_top_tokens(token_scores, capacity)
        return gather_tokens(k, idx), gather_tokens(v, idx), idx

    key_keep = chunk_keep_fn(chunk_rules, row_lengths) if chunk_rules else None
    logits, (keys, values, kept) = prefill_forward(
        weights, cfg, tokens, positions, logits_at=score_at, attention=attention, emit=emit, key_keep=key_keep
    )
    chunk_valid = chunk_lengths > 0
    scores = jnp.where(chunk_valid, question_nll(logits, question_targets, question_mask), jnp.inf)
    token_valid = jnp.arange(capacity)[None, :] < jnp.minimum(chunk_lengths, capacity)[:, None]
    return ChunkSelection(
        keys=keys, values=values, kept_positions=kept, token_valid=token_valid, scores=scores,
        chunk_ids=chunk_ids.astype(jnp.int32), chunk_valid=chunk_valid, row_lengths=prefix_len + chunk_lengths,
    )


@functools.partial(jax.jit, static_argnames=("top_k",))
def keep_best_chunks(state: ChunkSelection, new: ChunkSelection, top_k: int) -> ChunkSelection:
    """Running top-k: the ``top_k`` lowest-NLL chunks among ``state`` and ``new``."""
    both = concat_selections(state, new)
    idx, _ = top_k_lowest(both.scores, both.chunk_valid, top_k)
    return both.take(idx)


def merge_selection(prefix_keys, prefix_values, selection: ChunkSelection, room: int) -> tuple[KVCache, jax.Array]:
    """Stage 2 merge: P once, then the kept chunks in document order, then ``room`` free slots.

    prefix_keys/values: ``[L, P, KVH, D]``. Returns a batch-1 ``KVCache`` whose next write
    goes after the last chunk, and the question's first position: the longest kept row
    length ``max(len(P) + len(chunk))``.
    """
    sel = selection.take(document_order(selection.chunk_ids, selection.chunk_valid))
    num_layers, k, cap, kvh, d = sel.keys.shape
    p = prefix_keys.shape[1]

    def lay_out(prefix, chunks):
        flat = chunks.reshape(num_layers, k * cap, kvh, d)
        free = jnp.zeros((num_layers, room, kvh, d), chunks.dtype)
        return jnp.concatenate([prefix.astype(chunks.dtype), flat, free], axis=1)[:, None]

    chunk_valid = (sel.token_valid & sel.chunk_valid[:, None]).reshape(k * cap)
    valid = jnp.concatenate([jnp.ones((p,), bool), chunk_valid, jnp.zeros((room,), bool)])
    valid = jnp.broadcast_to(valid[None, None, :, None], (num_layers, 1, valid.shape[0], kvh))
    cache = KVCache(lay_out(prefix_keys, sel.keys), lay_out(prefix_values, sel.values), valid, jnp.array([p + k * cap]))
    question_start = jnp.max(jnp.where(sel.chunk_valid, sel.row_lengths, p))
    return cache, question_start
