"""Stage 1c: attention-bias calibration as per-layer keep-masks.

In parallel chunks attention collapses onto a few tokens (first and last: U-shaped;
a middle region: mountain). A ``CalibrationRule`` removes, in a range of layers, the
tokens of one region whose mean attention from the last ``last_queries`` query tokens
exceeds ``threshold``. The mean is over those queries and over the query heads that
share a KV head, so the result is one keep-mask per KV head, of static shape.

Two stages (``stage``): ``chunk`` masks keys inside every row during the parallel
prefill (the row's outputs and chunk scores change); ``merged`` masks entries of the
merged cache during the question prefill (they leave that layer's cache). Rules are
static config; which rules act in a layer is decided from the traced layer index inside
the scanned layer stack, not by Python branches per layer.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from .attention import query_probs
from .config import PRESETS, REGIONS, STAGES, CalibrationRule  # noqa: F401  (re-exported)
from .errors import ConfigError

def scale_layer(layer_of_32: int, num_layers: int) -> int:
    """Maps a layer index of a 32-layer model to the same relative depth of ``num_layers``."""
    return min(num_layers - 1, round(layer_of_32 * num_layers / 32))


def preset_rules(name: str, num_layers: int, stage: str = "merged", threshold: float = 0.1) -> tuple[CalibrationRule, ...]:
    """The rules of preset ``name`` with layer ranges scaled to a model of ``num_layers`` layers."""
    if name not in PRESETS:
        raise ConfigError(f"calibration preset {name!r} is unknown; choose one of: {', '.join(PRESETS)}")
    return tuple(
        CalibrationRule(
            layers=(scale_layer(a, num_layers), scale_layer(b, num_layers)), region=region, stage=stage, threshold=threshold
        )
        for a, b, region in PRESETS[name]
    )


def check_rules_fit(rules, num_layers: int) -> None:
    """Rejects rules whose layer range lies outside a model of ``num_layers`` layers."""
    for i, rule in enumerate(rules):
        if rule.layers[1] >= num_layers:
            raise ConfigError(
                f"calibration rule {i}: layers {list(rule.layers)} lie outside the model's {num_layers} layers "
                f"(allowed: 0 to {num_layers - 1})"
            )


def mean_last_query_attention(q_last: jax.Array, k: jax.Array, visible: jax.Array) -> jax.Array:
    """Mean attention of a few queries per KV head.

    q_last: ``[B, r, H, D]`` rotated queries; k: ``[B, S, KVH, D]`` rotated keys;
    visible: ``[B, r, S]`` or per KV head ``[B, KVH, r, S]``, which keys each query may see.
    Returns ``[B, KVH, S]``: the softmax probabilities averaged over the r queries and the
    query heads of each KV head.
    """
    return query_probs(q_last, k, visible).mean(axis=(2, 3))


def in_region(rank: jax.Array, count: jax.Array, region: str, size: int) -> jax.Array:
    """Whether an item of ``rank`` (0-based, -1 = not part of the sequence) in a sequence of
    ``count`` items lies in ``region``. rank: ``[..., S]``; count broadcastable to ``rank[..., :1]``."""
    member = rank >= 0
    if region == "sink":
        return member & (rank < size)
    if region == "recent":
        return member & (rank >= count - size)
    if region == "middle":
        return member & (rank >= size) & (rank < count - size)
    return member


def removed_by_rules(rules, layer_index, mean_for, rank, count) -> jax.Array:
    """Union of what the rules active in ``layer_index`` remove, ``[B, KVH, S]`` bool.

    mean_for(r) -> ``[B, KVH, S]`` mean attention of the last r queries; rank, count: as in
    ``in_region``. A rule acts when ``first <= layer_index <= last`` (traced).
    """
    removed = jnp.zeros(rank.shape, bool)
    for rule in rules:
        active = (layer_index >= rule.layers[0]) & (layer_index <= rule.layers[1])
        hit = in_region(rank, count, rule.region, rule.region_size) & (mean_for(rule.last_queries) > rule.threshold)
        removed = removed | (active & hit)
    return removed


def chunk_keep_fn(rules, row_lengths: jax.Array, windows: jax.Array | None = None):
    """``key_keep`` hook for ``prefill_forward``: stage ``chunk`` rules inside each row.

    row_lengths: ``[B]``. The sequence is the row (rank = position, count = row length);
    the queries are the last r real tokens of the row. windows: None, or the per-layer
    sliding windows ``[L]`` of a model with local layers (``model.llama.layer_kinds``): a
    query's mean then covers only the keys its window shows.
    """

    def key_keep(q, k, layer_index):
        t = k.shape[1]
        positions = jnp.arange(t)

        def mean_for(r):
            q_pos = jnp.clip(row_lengths[:, None] - r + jnp.arange(r)[None, :], 0, t - 1)  # [B, r]
            q_last = jnp.take_along_axis(q, q_pos[:, :, None, None], axis=1)
            visible = positions[None, None, :] <= q_pos[:, :, None]
            if windows is not None:
                visible = visible & (q_pos[:, :, None] - positions[None, None, :] < windows[layer_index])
            return mean_last_query_attention(q_last, k, visible)

        rank = jnp.where(positions[None, :] < row_lengths[:, None], positions[None, :], -1)[:, None, :]
        return ~removed_by_rules(rules, layer_index, mean_for, rank, row_lengths[:, None, None])

    return key_keep


def merged_drop_fn(rules, question_len: jax.Array):
    """``drop_from_cache`` hook for ``cached_forward``: stage ``merged`` rules over the cache.

    The sequence of KV head g is its valid cache entries before the question, in slot
    order; the queries are the last r real question tokens, which see those entries and
    the question up to themselves (in a local layer: what their windows show,
    ``window_visible [B, KVH, Qb, S]``, passed by ``cached_forward`` for a model with
    sliding-window layers). Question tokens are never removed.
    """

    def drop(q, k_cache, valid, layer_index, query_slots, window_visible=None):
        s = k_cache.shape[1]
        slots = jnp.arange(s)
        question = (slots[None, None, :] == query_slots[:, :, None]).any(axis=1)  # [B, S]
        content_h = jnp.moveaxis(valid, 2, 1) & ~question[:, None, :]  # [B, KVH, S]

        def mean_for(r):
            idx = jnp.clip(question_len - r + jnp.arange(r), 0, q.shape[1] - 1)  # [r]
            q_slot = query_slots[:, idx]  # [B, r]
            causal = slots[None, None, :] <= q_slot[:, :, None]  # [B, r, S]
            seen = (content_h | question[:, None, :])[:, :, None, :] & causal[:, None]  # [B, KVH, r, S]
            if window_visible is not None:
                seen = seen & window_visible[:, :, idx]
            return mean_last_query_attention(q[:, idx], k_cache, seen)

        rank = jnp.where(content_h, jnp.cumsum(content_h, axis=-1) - 1, -1)
        count = content_h.sum(axis=-1, keepdims=True)
        removed = removed_by_rules(rules, layer_index, mean_for, rank, count)
        return valid & ~jnp.moveaxis(removed, 1, 2)

    return drop
