"""A document's jitted passes: reading chunk rows into caches, and one question's pass over them.

``read_group`` runs a group of chunk rows ``P + chunk`` through every layer and keeps their
keys and values (``ChunkCaches``, without the chunk's last token); ``question_group`` runs
that last token and a question part Q on top of the caches (``QuestionPass``: the chunk
scores and the slots each layer keeps); ``kept_selection`` gathers the chosen chunks' kept
tokens into the ``prefill.ChunkSelection`` that stage 2 merges.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from ..axes import axes_field, static_field
from ..cache import write_layer
from ..model.config import ModelConfig
from ..model.llama import Weights, appended_forward, prefill_forward, window_of_layer
from ..prefill import ChunkSelection, PrefillSpec, chunk_scores, chunk_selection, content_slots, kept_slots


@flax.struct.dataclass
class ChunkCaches:
    """One group of G chunk rows ``P + chunk`` through every layer, without the chunk's last token.

    keys, values: ``[L, G, R0, KVH, D]`` (rotated at row positions); stored_lengths: ``[G]``
    ``len(P) + len(chunk) - 1`` (0 for padding rows); last_tokens: ``[G]`` each chunk's last
    token id; chunk_lengths: ``[G]`` (0: padding row); chunk_ids: ``[G]`` document index.
    Static: prefix_len. Device arrays, or NumPy when the document is kept on the host.
    """

    keys: jax.Array = axes_field("layers", "chunk", "row", "kv_heads", "head_dim")
    values: jax.Array = axes_field("layers", "chunk", "row", "kv_heads", "head_dim")
    stored_lengths: jax.Array = axes_field("chunk")
    last_tokens: jax.Array = axes_field("chunk")
    chunk_lengths: jax.Array = axes_field("chunk")
    chunk_ids: jax.Array = axes_field("chunk")
    prefix_len: int = static_field()


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def read_group(weights: Weights, cfg: ModelConfig, rows, spec: PrefillSpec) -> ChunkCaches:
    """The caches of a group of G rows ``P + chunk`` (``chunking.Rows`` with an empty
    question), with ``spec``'s attention backend."""
    g = rows.tokens.shape[0]
    _, (keys, values) = prefill_forward(weights, cfg, rows.tokens, rows.positions,
                                        logits_at=jnp.zeros((g, 1), jnp.int32),
                                        attention=spec.attention_fn(weights.embed.dtype, cfg.has_sliding_layers))
    ends = rows.prefix_len + rows.chunk_lengths
    last = jnp.take_along_axis(rows.tokens, jnp.maximum(ends - 1, 0)[:, None], axis=1)[:, 0]
    stored = jnp.where(rows.chunk_lengths > 0, ends - 1, 0).astype(jnp.int32)
    return ChunkCaches(keys, values, stored, last, rows.chunk_lengths, rows.chunk_ids, prefix_len=rows.prefix_len)


@flax.struct.dataclass
class QuestionPass:
    """What one question keeps of a group's question pass (``question_group``), for G rows.

    scores: ``[G]`` the chunk scores (+inf for padding rows); kept_positions: ``[L, G, KVH,
    cap]`` the row slots each layer keeps (``prefill.kept_slots``), or None when the
    capacity holds every chunk token (all are kept, in order); last_keys, last_values:
    ``[L, G, KVH, D]`` the chunk's last token, which the document does not store.
    """

    scores: jax.Array = axes_field("chunk")
    kept_positions: jax.Array | None = axes_field("layers", "chunk", "kv_heads", "kept_tokens")
    last_keys: jax.Array = axes_field("layers", "chunk", "kv_heads", "head_dim")
    last_values: jax.Array = axes_field("layers", "chunk", "kv_heads", "head_dim")


@flax.struct.dataclass
class AskedQuestion:
    """A question part Q as a document's question pass reads it.

    tokens: ``[Qb]`` zero-padded Q ids (real up to ``length``, ``[]``); scored: ``[Qb]`` the
    tokens the chunk score averages (``chunking.scored_question``).
    """

    tokens: jax.Array = axes_field("question")
    length: jax.Array = axes_field()
    scored: jax.Array = axes_field("question")


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "capacity", "keeps_all"))
def question_group(weights: Weights, cfg: ModelConfig, caches: ChunkCaches, asked: AskedQuestion,
                   spec: PrefillSpec, capacity: int, keeps_all: bool) -> QuestionPass:
    """Stage 1 + 1b of G chunk rows from their caches: each chunk's last token and the
    question run on top of its cache (``appended_forward``: the cache is only read,
    positions continue the row).

    The logits at the last chunk token and Q score the
    chunk (``spec.chunk_scorer``); each layer picks the ``capacity`` content tokens it keeps
    by ``spec.token_scorer`` over the whole row (``prefill.kept_slots``), given the queries
    of the tokens run here (the others are zero: ``TokenScorer.queries_read`` must not
    reach them). keeps_all (static): the capacity holds every chunk's tokens, so all are
    kept and no token is scored. The kept keys and values are gathered later, for the
    chosen chunks only (``kept_selection``).
    """
    question, question_len, scored = asked.tokens, asked.length, asked.scored
    num_layers, g, stored_width, _, _ = caches.keys.shape
    steps = question.shape[0] + 1
    width = max(stored_width + steps, capacity)
    tokens = jnp.concatenate([caches.last_tokens[:, None], jnp.broadcast_to(question[None], (g, steps - 1))], axis=1)
    positions = caches.stored_lengths[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
    cache_valid = jnp.arange(stored_width)[None, :] < caches.stored_lengths[:, None]
    row_lengths = jnp.where(caches.chunk_lengths > 0, caches.stored_lengths + 1 + question_len, 0)
    content = content_slots(caches.prefix_len, caches.chunk_lengths, width)

    def emit(q, k, v, k_cache, v_cache, layer_index):
        last = (k[:, 0], v[:, 0])
        if keeps_all:
            return last
        k_row = write_layer(jnp.pad(k_cache, ((0, 0), (0, width - stored_width), (0, 0), (0, 0))), k,
                            caches.stored_lengths)
        q_row = write_layer(jnp.zeros((g, width, *q.shape[2:]), q.dtype), q, caches.stored_lengths)
        return last + (kept_slots(spec, capacity, q_row, k_row, row_lengths, content,
                                  window_of_layer(cfg, layer_index)),)

    logits, emitted = appended_forward(weights, cfg, tokens.astype(jnp.int32), positions, caches.keys,
                                       caches.values, cache_valid, emit)
    scores = chunk_scores(spec, logits[:, : steps - 1], question[None], scored[None], caches.chunk_lengths)
    return QuestionPass(scores, None if keeps_all else emitted[2], emitted[0], emitted[1])


@functools.partial(jax.jit, static_argnames=("capacity",))
def kept_selection(rows: ChunkCaches, kept: QuestionPass, picked_valid: jax.Array, capacity: int) -> ChunkSelection:
    """The ``ChunkSelection`` of K chosen rows: the stored caches of the rows (``ChunkCaches``
    with K rows) and their question passes (``QuestionPass`` of K rows), each layer's kept
    tokens gathered from the row (its last token from the pass). picked_valid: ``[K]``
    False where a pick is no chunk (fewer chunks than K)."""
    num_layers, k, width, kvh, _ = rows.keys.shape
    if kept.kept_positions is None:
        slots = rows.prefix_len + jnp.arange(capacity, dtype=jnp.int32)
        kept = kept.replace(kept_positions=jnp.broadcast_to(slots, (num_layers, k, kvh, capacity)))
    slots = kept.kept_positions  # [L, K, KVH, cap]
    is_last = (slots == rows.stored_lengths[None, :, None, None])[..., None]

    def gather(stored, last):  # [L, K, W, KVH, D], [L, K, KVH, D] -> [L, K, cap, KVH, D]
        picked = jnp.take_along_axis(jnp.swapaxes(stored, 2, 3), jnp.minimum(slots, width - 1)[..., None], axis=3)
        return jnp.swapaxes(jnp.where(is_last, last[:, :, :, None, :], picked), 2, 3)

    lengths = jnp.where(picked_valid, rows.chunk_lengths, 0)
    return chunk_selection(gather(rows.keys, kept.last_keys), gather(rows.values, kept.last_values), slots,
                           jnp.where(picked_valid, kept.scores, jnp.inf), lengths, rows.chunk_ids, rows.prefix_len,
                           capacity)
