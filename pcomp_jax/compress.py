"""Pure transforms that decide what is kept: chunk scores, chunk top-k, token eviction.

All functions are jittable and static-shape: selections are ``lax.top_k`` plus
gathers into fixed-size buffers, with validity masks where fewer items exist.

Scorers are small frozen dataclasses (hashable, so that ``jax.jit`` takes them as static
arguments, as it takes the attention backends): a ``ChunkScorer`` ranks chunks
(``QueryNLL``: lower = better), a ``TokenScorer`` ranks the tokens of every row per KV
head (``SnapKV``, ``RecentTokens``: higher = kept). A new scorer is one class; a
``methods.Method`` names the ones it uses.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from .attention import query_probs
from .errors import PcompError


def question_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of the scored question tokens, per row.

    logits: ``[N, Qb, V]`` (the logits that predict each Q token); targets: ``[N, Qb]``;
    mask: ``[N, Qb]`` bool. Returns ``[N]`` float32 (lower = the chunk explains Q better).
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def top_k_lowest(scores: jax.Array, valid: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the k lowest valid scores (best first) and whether each pick is valid.

    scores, valid: ``[N]``. Returns ``(indices [k] int32, picked_valid [k] bool)``; invalid
    entries (padding chunks) are never picked before a valid one.
    """
    if scores.shape[0] < k:  # fewer candidates than slots: pad with invalid ones
        pad = k - scores.shape[0]
        scores = jnp.concatenate([scores, jnp.zeros((pad,), scores.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
    keyed = jnp.where(valid, -scores, -jnp.inf)
    _, idx = jax.lax.top_k(keyed, k)
    return idx.astype(jnp.int32), valid[idx]


def document_order(chunk_ids: jax.Array, valid: jax.Array) -> jax.Array:
    """Permutation that sorts kept chunks by document position, invalid ones last. ``[k] -> [k]``."""
    big = jnp.iinfo(jnp.int32).max // 2
    return jnp.argsort(jnp.where(valid, chunk_ids, big + chunk_ids))


def relevance_order(scores: jax.Array, chunk_ids: jax.Array, valid: jax.Array) -> jax.Array:
    """Permutation that sorts kept chunks from the highest (least relevant) score to the
    lowest, so the best chunk comes last; ties in document order, invalid chunks last.
    ``[k] -> [k]``."""
    return jnp.lexsort((chunk_ids, -scores, ~valid))


def within_margin(scores: jax.Array, valid: jax.Array, margin: float) -> jax.Array:
    """``valid [k]`` narrowed to the chunks whose score is at most the best valid score plus
    ``margin`` (scores: ``[k]``, lower is better)."""
    best = jnp.min(jnp.where(valid, scores, jnp.inf))
    return valid & (scores <= best + margin)


def snapkv_token_scores(
    q: jax.Array, k: jax.Array, obs_end: jax.Array, obs_window: int, pool_kernel: int, content: jax.Array,
    window=None,
) -> jax.Array:
    """SnapKV importance of every key, one score per KV head.

    q: ``[B, T, H, D]`` rotated queries; k: ``[B, T, KVH, D]`` rotated keys; obs_end: ``[B]``,
    the row lengths (the observation window is the last ``obs_window`` real tokens);
    content: ``[B, T]`` bool, the tokens that may be kept (the chunk, not P or Q).
    A = softmax attention of each observation query over the keys it may see; s_t sums A
    over the window queries and over the query heads sharing a KV head; s is then
    max-pooled (kernel ``pool_kernel``, stride 1, same padding) within the content span.
    window: None, or a local layer's sliding window (traced; the row's slots are its
    positions): an observation query then sees only the keys less than ``window`` positions
    before it, so the keys none of them sees score 0 (before pooling).
    Returns ``[B, KVH, T]`` float32, -inf outside ``content``.
    """
    t = k.shape[1]
    obs_pos = jnp.clip(obs_end[:, None] - obs_window + jnp.arange(obs_window)[None, :], 0, t - 1)  # [B, w]
    q_obs = jnp.take_along_axis(q, obs_pos[:, :, None, None], axis=1)  # [B, w, H, D]
    visible = jnp.arange(t)[None, None, :] <= obs_pos[:, :, None]  # [B, w, T]
    if window is not None:
        visible = visible & (obs_pos[:, :, None] - jnp.arange(t)[None, None, :] < window)
    summed = query_probs(q_obs, k, visible).sum(axis=(2, 3))  # [B, KVH, T]
    summed = jnp.where(content[:, None, :], summed, -jnp.inf)
    pooled = jax.lax.reduce_window(
        summed, -jnp.inf, jax.lax.max, (1, 1, pool_kernel), (1, 1, 1), "SAME"
    )
    return jnp.where(content[:, None, :], pooled, -jnp.inf)


def pool_in_order(scores: jax.Array, members: jax.Array, pool_kernel: int) -> jax.Array:
    """Max-pool (kernel ``pool_kernel``, stride 1, same padding) over the members of a
    sequence taken in order, skipping non-members: scores, members ``[..., S]`` ->
    ``[..., S]`` (-inf at non-members). Neighbours are neighbouring members, however far
    apart their slots are (e.g. the kept tokens of a merged cache, with free slots between
    chunks)."""
    s = scores.shape[-1]
    slots = jnp.arange(s)
    order = jnp.argsort(jnp.where(members, slots, s + slots), axis=-1)  # members first, in slot order
    compact = jnp.take_along_axis(jnp.where(members, scores, -jnp.inf), order, axis=-1)
    window = (1,) * (scores.ndim - 1) + (pool_kernel,)
    pooled = jax.lax.reduce_window(compact, -jnp.inf, jax.lax.max, window, (1,) * scores.ndim, "SAME")
    back = jnp.argsort(order, axis=-1)
    return jnp.where(members, jnp.take_along_axis(pooled, back, axis=-1), -jnp.inf)


def keep_best_entries(token_scores: jax.Array, members: jax.Array, budget: int) -> jax.Array:
    """Keep-mask of the ``budget`` best-scored members per row: scores, members ``[..., S]``
    -> bool ``[..., S]`` (non-members are never kept; fewer members keep them all)."""
    scored = jnp.where(members, token_scores, -jnp.inf)
    _, idx = jax.lax.top_k(scored, min(budget, scored.shape[-1]))
    picked = jnp.zeros(scored.shape, bool)
    picked = jnp.put_along_axis(picked, idx, True, axis=-1, inplace=False)
    return picked & members


def keep_top_tokens(token_scores: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """The ``capacity`` best-scored tokens per KV head, in position order.

    token_scores: ``[B, KVH, T]`` (-inf = not keepable). Returns ``(indices [B, KVH, cap] int32,
    kept_valid [B, KVH, cap] bool)``; when fewer tokens are keepable the rest are invalid.
    """
    t = token_scores.shape[-1]
    if capacity > t:
        raise PcompError(f"capacity {capacity} exceeds the row length {t}; keep at most {t} tokens per row")
    values, idx = jax.lax.top_k(token_scores, capacity)
    valid = values > -jnp.inf
    order = jnp.argsort(jnp.where(valid, idx, t + idx), axis=-1)
    return jnp.take_along_axis(idx, order, -1).astype(jnp.int32), jnp.take_along_axis(valid, order, -1)


def gather_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
    """Per-KV-head gather. x: ``[B, T, KVH, D]``; indices: ``[B, KVH, cap]`` -> ``[B, cap, KVH, D]``."""
    xt = jnp.swapaxes(x, 1, 2)  # [B, KVH, T, D]
    picked = jnp.take_along_axis(xt, indices[..., None], axis=2)
    return jnp.swapaxes(picked, 1, 2)


class ChunkScorer:
    """How a chunk is scored from its row's logits at the question; lower = kept first.

    ``__call__(logits [N, Qb, V], targets [N, Qb], mask [N, Qb] bool) -> [N]`` float32.
    Subclasses are frozen dataclasses (static arguments of ``jax.jit``).
    """

    def __call__(self, logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class QueryNLL(ChunkScorer):
    """docs/algorithm.md stage 1: the mean NLL of the scored question tokens (``question_nll``)."""

    def __call__(self, logits, targets, mask):
        return question_nll(logits, targets, mask)


class TokenScorer:
    """How the tokens of a row are ranked for eviction, per KV head; higher = kept first.

    ``__call__(q [B, T, H, D], k [B, T, KVH, D], row_lengths [B], content [B, T] bool)
    -> [B, KVH, T]`` float32, ``-inf`` outside ``content`` (only the chunk's own tokens may
    be kept; P and Q never are). q and k are one layer's rotated queries and keys.
    The same scorer ranks what the optional evictions after the merge drop:
    ``merged_scores`` (stage eviction, the merged cache with the question's queries) and
    ``held_scores`` (decode eviction, the cache while decoding); both default to
    ``__call__`` on the cache read as one row.
    ``for_config(config)`` returns the scorer that acts under a ``ParallelCompConfig``:
    itself, so a scorer's own fields win over the config's (``ConfigSnapKV`` is the one
    built from the config's knobs). Subclasses are frozen dataclasses (static arguments of
    ``jax.jit``).
    """

    def for_config(self, config) -> "TokenScorer":
        return self

    def queries_read(self) -> int | None:
        """How many of the row's last queries the scores depend on (None: possibly all of
        them). A ``document.Document`` keeps only the chunks' keys and values, so it can
        score tokens only with a scorer that reads no further back than the question."""
        return None

    def decode_window(self) -> int:
        """How many of the newest queries' attention rows the cache keeps while decoding
        (``KVCache.attention_window``) for ``held_scores``; 0: none (the default)."""
        return 0

    def local_scores(self, q, k, row_lengths, content, window) -> jax.Array:
        """``__call__`` for a layer of a model with sliding-window layers: ``window`` (traced)
        is the layer's window (``model.llama.GLOBAL_WINDOW`` for a global layer); a query
        sees only the keys less than ``window`` positions before it (the row's slots are its
        positions). The default ignores it (right for a scorer that reads no attention)."""
        return self(q, k, row_lengths, content)

    def merged_scores(self, q, keys, valid, query_slots, query_len, candidates, window_visible=None) -> jax.Array:
        """Scores of a merged cache's entries for stage eviction.

        q: ``[B, Qb, H, D]`` the rotated queries of the tokens run on the cache (the
        question, real up to ``query_len``); keys: ``[B, S, KVH, D]`` the cache's keys (the
        question's own included); valid: ``[B, S, KVH]`` the entries each KV head holds;
        query_slots: ``[B, Qb]`` the slot of each query; candidates: ``[B, KVH, S]`` the
        entries that may be dropped (the kept chunks' tokens). window_visible: None, or for a
        model with sliding-window layers ``[B, KVH, Qb, S]``, which entries each query's
        window shows (all in a global layer). Returns ``[B, KVH, S]``.
        The default reads the cache as one row ending with the question: the queries at
        their slots (zero elsewhere) and ``content`` = the candidates of any KV head; it
        ignores ``window_visible``.
        """
        batch, slots = keys.shape[:2]
        real = jnp.arange(q.shape[1]) < query_len
        rows = jnp.arange(batch)[:, None]
        q_row = jnp.zeros((batch, slots, *q.shape[2:]), q.dtype)
        q_row = q_row.at[rows, jnp.where(real[None], query_slots, slots)].set(q, mode="drop")
        ends = query_slots[:, jnp.maximum(query_len - 1, 0)] + 1
        scores = self(q_row, keys, ends, candidates.any(axis=1))
        return jnp.where(candidates, scores, -jnp.inf)

    def held_scores(self, keys, attention_window, ends, candidates) -> jax.Array:
        """Scores of the entries a cache holds while decoding, for decode eviction.

        keys: ``[L, B, S, KVH, D]``; attention_window: ``[L, B, KVH, w, S]`` the attention
        of the newest ``decode_window()`` queries (None when that is 0); ends: ``[B]`` the
        slots in use; candidates: ``[L, B, KVH, S]`` the entries that may be dropped.
        Returns ``[L, B, KVH, S]``. The default scores each layer's keys as one row
        (``__call__`` with zero queries: the queries of past steps are not kept)."""
        per_layer = jax.vmap(lambda k, c: self(jnp.zeros_like(k), k, ends, c.any(axis=1)))
        return jnp.where(candidates, per_layer(keys, candidates), -jnp.inf)

    def __call__(self, q: jax.Array, k: jax.Array, row_lengths: jax.Array, content: jax.Array) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SnapKV(TokenScorer):
    """docs/algorithm.md stage 1b: attention of the last ``obs_window`` queries, max-pooled
    (``snapkv_token_scores``). Its own fields act wherever it is used; ``ConfigSnapKV``
    takes them from the config instead."""

    obs_window: int = 8
    pool_kernel: int = 7

    def queries_read(self) -> int:
        return self.obs_window

    def decode_window(self) -> int:
        return self.obs_window

    def merged_scores(self, q, keys, valid, query_slots, query_len, candidates, window_visible=None):
        """The attention of the question's last ``obs_window`` queries over the entries each
        KV head holds (in a local layer: those their windows show), summed over them and the
        KV head's query heads, max-pooled over neighbouring candidates in slot order
        (``pool_in_order``)."""
        slots = jnp.arange(keys.shape[1])
        question = (slots[None, None, :] == query_slots[:, :, None]).any(axis=1)  # [B, S]
        w = self.obs_window
        offsets = query_len - w + jnp.arange(w)  # the last w question tokens (fewer if Q is shorter)
        idx = jnp.clip(offsets, 0, q.shape[1] - 1)
        q_slot = query_slots[:, idx]  # [B, w]
        held = jnp.moveaxis(valid, 2, 1) | question[:, None, :]  # [B, KVH, S]
        seen = held[:, :, None, :] & (slots[None, None, :] <= q_slot[:, :, None])[:, None]
        if window_visible is not None:
            seen = seen & window_visible[:, :, idx]
        probs = query_probs(q[:, idx], keys, seen) * (offsets >= 0)[None, None, None, :, None]
        return pool_in_order(probs.sum(axis=(2, 3)), candidates, self.pool_kernel)

    def held_scores(self, keys, attention_window, ends, candidates):
        """The kept attention rows summed, max-pooled over neighbouring candidates in order."""
        return pool_in_order(attention_window.sum(axis=3), candidates, self.pool_kernel)

    def local_scores(self, q, k, row_lengths, content, window):
        return snapkv_token_scores(q, k, row_lengths, self.obs_window, self.pool_kernel, content, window)

    def __call__(self, q, k, row_lengths, content):
        return snapkv_token_scores(q, k, row_lengths, self.obs_window, self.pool_kernel, content)


@dataclasses.dataclass(frozen=True)
class ConfigSnapKV(TokenScorer):
    """``SnapKV`` with the ``obs_window`` and ``pool_kernel`` of the config it runs under:
    the built-in methods' scorer (``for_config`` returns the ``SnapKV`` that acts)."""

    def for_config(self, config) -> SnapKV:
        return SnapKV(config.obs_window, config.pool_kernel)

    def __call__(self, q, k, row_lengths, content):
        raise PcompError("ConfigSnapKV takes its knobs from a config: use for_config(config)")


@dataclasses.dataclass(frozen=True)
class RecentTokens(TokenScorer):
    """StreamingLLM's window: later content tokens score higher, so the most recent are kept."""

    def queries_read(self) -> int:
        return 0

    def __call__(self, q, k, row_lengths, content):
        slot = jnp.arange(content.shape[1], dtype=jnp.float32)[None, :]
        scores = jnp.where(content, slot, -jnp.inf)  # [B, T]
        return jnp.broadcast_to(scores[:, None, :], (k.shape[0], k.shape[2], content.shape[1]))
