"""The ParallelComp prefill: rows -> sharded chunk prefill -> selection -> merged cache.

Stage 1 (parallel chunk prefill and chunk scores), 1b (token eviction inside every chunk,
layer and KV head) and the merge of stage 2, as pure functions over pytrees:

    rows = chunking.build_rows(parts, chunk_len, window)        # Rows: P + chunk + Q per row
    spec = PrefillSpec(capacity=128)                            # static knobs (jit argument)
    prefix_keys, prefix_values = prefill_prefix(weights, cfg, parts.prefix)
    state = empty_selection(cfg, top_k, spec.kept_tokens(rows), dtype)
    for group in rows.groups(group_size):                       # streaming: bounded memory
        scored = prefill_group(weights, cfg, sharding.shard(group, mesh), spec)
        state = keep_best_chunks(state, scored, top_k)          # running top-k, static shapes
    cache, question_start = merge_selection(prefix_keys, prefix_values, state, room)

``select_chunks`` is exactly that loop (what ``pipeline.run_stage1`` runs); ``merge``
takes the selection (a ``merge.ContextCache`` with P's cache) on to the question prefill,
and ``decode`` to greedy decoding. ``merge_selection`` and the ``MergeLayout`` classes that
place the kept chunks stay here, beside the ``ChunkSelection`` they read.

Stage 1c (calibration): ``chunk`` rules act inside ``prefill_group`` through the model's
per-layer ``key_keep`` hook; ``merged`` rules act in the question prefill
(``merge.question_prefill``) through ``cached_forward``'s ``drop_from_cache`` hook.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ._startup import raise_if_interrupted
from .attention import causal_attention
from .axes import axes_field, axis_positions
from .cache import KVCache
from .calibrate import chunk_keep_fn
from .chunking import Rows
from .compress import (
    ChunkScorer,
    QueryNLL,
    SnapKV,
    TokenScorer,
    document_order,
    gather_tokens,
    keep_top_tokens,
    relevance_order,
    top_k_lowest,
    within_margin,
)
from .errors import ConfigError
from .model.config import ModelConfig
from .model.llama import Weights, layer_kinds, prefill_forward, window_of_layer
from .model.rope import apply_rope, layer_rope_tables
from .sharding import shard


@flax.struct.dataclass
class ChunkSelection:
    """Compressed caches of K chunks with their scores (the running top-k state).

    keys, values: ``[L, K, cap, KVH, D]`` (rotated at row positions); kept_positions:
    ``[L, K, KVH, cap]`` row positions of the kept tokens; token_valid: ``[K, cap]``;
    scores: ``[K]`` chunk scores (lower is better); chunk_ids: ``[K]`` document index;
    chunk_valid: ``[K]``; row_lengths: ``[K]`` ``len(P) + len(chunk)``.
    """

    keys: jax.Array = axes_field("layers", "kept_chunks", "kept_tokens", "kv_heads", "head_dim")
    values: jax.Array = axes_field("layers", "kept_chunks", "kept_tokens", "kv_heads", "head_dim")
    kept_positions: jax.Array = axes_field("layers", "kept_chunks", "kv_heads", "kept_tokens")
    token_valid: jax.Array = axes_field("kept_chunks", "kept_tokens")
    scores: jax.Array = axes_field("kept_chunks")
    chunk_ids: jax.Array = axes_field("kept_chunks")
    chunk_valid: jax.Array = axes_field("kept_chunks")
    row_lengths: jax.Array = axes_field("kept_chunks")

    def take(self, idx: jax.Array) -> "ChunkSelection":
        """The chunks at ``idx [K']`` (a gather along every field's chunk axis)."""
        return jax.tree.map(lambda x, axis: jnp.take(x, idx, axis=axis), self, _chunk_axes(self))


def _chunk_axes(selection: ChunkSelection) -> ChunkSelection:
    """Where each field of a ``ChunkSelection`` keeps its chunk axis (from the declared axes)."""
    return axis_positions(selection, "kept_chunks")


def concat_selections(a: ChunkSelection, b: ChunkSelection) -> ChunkSelection:
    """Chunks of ``a`` followed by those of ``b``."""
    return jax.tree.map(lambda x, y, axis: jnp.concatenate([x, y], axis=axis), a, b, _chunk_axes(a))


def empty_selection(cfg: ModelConfig, top_k: int, capacity: int, dtype) -> ChunkSelection:
    """A state of ``top_k`` invalid chunks (score +inf) to start the running top-k from.
    ``capacity``: tokens kept per chunk (``PrefillSpec.kept_tokens``)."""
    shape = (cfg.num_layers, top_k, capacity, cfg.num_kv_heads, cfg.head_dim)
    return ChunkSelection(
        keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
        kept_positions=jnp.zeros((cfg.num_layers, top_k, cfg.num_kv_heads, capacity), jnp.int32),
        token_valid=jnp.zeros((top_k, capacity), bool), scores=jnp.full((top_k,), jnp.inf, jnp.float32),
        chunk_ids=jnp.full((top_k,), -1, jnp.int32), chunk_valid=jnp.zeros((top_k,), bool),
        row_lengths=jnp.zeros((top_k,), jnp.int32),
    )


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
    """The static settings of the chunk prefill (hashable: a static argument of ``jax.jit``).

    capacity: tokens kept per chunk, layer and KV head (None: every token of the chunk);
    never more than a row holds (``kept_tokens``). token_scorer: ranks tokens for eviction
    (``compress.SnapKV``, ``compress.RecentTokens`` or your own ``TokenScorer``); when
    nothing is evicted every scorer keeps the same tokens. chunk_scorer: ranks chunks (``compress.QueryNLL``).
    attention: the causal backend by name (``auto``, ``dense``, ``blockwise``, ``pallas``,
    ``cudnn``, ``splash``, ``mosaic_gpu``; see ``attention.causal_attention``). chunk_rules: stage-``chunk``
    calibration rules (``calibrate.CalibrationRule``).
    """

    capacity: int | None = None
    token_scorer: TokenScorer = SnapKV()
    chunk_scorer: ChunkScorer = QueryNLL()
    attention: str = "auto"
    chunk_rules: tuple = ()

    def kept_tokens(self, rows: Rows) -> int:
        """Tokens kept per chunk for ``rows``: ``capacity`` (or the chunk length when None),
        at most the row length. A static shape: it depends on ``rows``' shapes only."""
        return self.kept_for(rows.chunk_len, rows.row_len)

    def kept_for(self, chunk_len: int, row_len: int) -> int:
        """``kept_tokens`` for rows of at most ``chunk_len`` context tokens and static length ``row_len``."""
        wanted = chunk_len if self.capacity is None else self.capacity
        return min(wanted, row_len)

    def attention_fn(self, dtype, sliding: bool = False):
        """The causal attention backend this spec names, for weights of ``dtype`` (sliding:
        the model has sliding-window layers, ``ModelConfig.has_sliding_layers``)."""
        return causal_attention(self.attention, needs_key_mask=bool(self.chunk_rules), dtype=dtype, sliding=sliding)


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill_prefix(weights: Weights, cfg: ModelConfig, prefix: jax.Array):
    """K/V of the prefix P, identical in every row: computed once. prefix: ``[P]`` ->
    ``(keys, values)`` each ``[L, P, KVH, D]``."""
    positions = jnp.arange(prefix.shape[0], dtype=jnp.int32)[None]
    _, (keys, values) = prefill_forward(weights, cfg, prefix[None], positions, logits_at=jnp.zeros((1, 1), jnp.int32))
    return keys[:, 0], values[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def prefill_group(weights: Weights, cfg: ModelConfig, rows: Rows, spec: PrefillSpec) -> ChunkSelection:
    """Stage 1 + 1b for a group of G chunk rows (``rows``: a ``chunking.Rows`` of G rows).

    Runs the rows in parallel (causal inside each row) with ``spec``'s attention backend,
    scores each chunk with ``spec.chunk_scorer`` from the logits at its question tokens, and
    keeps ``spec.kept_tokens(rows)`` content tokens per layer and KV head by
    ``spec.token_scorer``. Stage-``chunk`` calibration rules change the rows' attention;
    token scores still see plain causal attention. Returns a ``ChunkSelection`` of the G
    chunks (padding rows invalid, score +inf).
    """
    capacity = spec.kept_tokens(rows)
    content = content_slots(rows.prefix_len, rows.chunk_lengths, rows.row_len)

    def emit(q, k, v, layer_index):
        return compress_row(spec, capacity, q, k, v, rows.row_lengths, content, window_of_layer(cfg, layer_index))

    key_keep = chunk_keep_fn(spec.chunk_rules, rows.row_lengths, layer_kinds(cfg)[0]) if spec.chunk_rules else None
    logits, emitted = prefill_forward(
        weights, cfg, rows.tokens, rows.positions, logits_at=rows.score_at,
        attention=spec.attention_fn(weights.embed.dtype, cfg.has_sliding_layers), emit=emit, key_keep=key_keep,
    )
    keys, values, kept = emitted
    scores = chunk_scores(spec, logits, rows.question_targets, rows.question_mask, rows.chunk_lengths)
    return chunk_selection(keys, values, kept, scores, rows.chunk_lengths, rows.chunk_ids, rows.prefix_len, capacity)


def content_slots(prefix_len: int, chunk_lengths: jax.Array, width: int) -> jax.Array:
    """Which row slots hold the chunk's own tokens (after P, before Q): ``[G, width]`` bool."""
    slot = jnp.arange(width)[None, :]
    return (slot >= prefix_len) & (slot < prefix_len + chunk_lengths[:, None])


def compress_row(spec: PrefillSpec, capacity: int, q, k, v, row_lengths, content, window=None):
    """Stage 1b in one layer: the ``capacity`` content tokens per KV head that
    ``spec.token_scorer`` ranks best. q: ``[G, T, H, D]``; k, v: ``[G, T, KVH, D]`` (one layer
    of G rows P + chunk + Q); row_lengths: ``[G]``; content: ``[G, T]``; window: None, or the
    layer's sliding window for a model with local layers (``model.llama.window_of_layer``).
    Returns ``(keys, values [G, cap, KVH, D], kept row positions [G, KVH, cap])``."""
    idx = kept_slots(spec, capacity, q, k, row_lengths, content, window)
    return gather_tokens(k, idx), gather_tokens(v, idx), idx


def kept_slots(spec: PrefillSpec, capacity: int, q, k, row_lengths, content, window=None) -> jax.Array:
    """The row slots ``compress_row`` keeps: ``[G, KVH, cap]`` int32, in position order.
    With a ``window`` (a model with local layers) the scorer ranks by what the observation
    queries' windows show (``TokenScorer.local_scores``); a local layer still keeps
    ``capacity`` tokens: those no observation query sees rank last, fill the remaining
    slots, and the layer's window hides them in the merged stage as it would have."""
    if window is None:
        scores = spec.token_scorer(q, k, row_lengths, content)
    else:
        scores = spec.token_scorer.local_scores(q, k, row_lengths, content, window)
    idx, _ = keep_top_tokens(scores, capacity)
    return idx


def chunk_scores(spec: PrefillSpec, logits, targets, mask, chunk_lengths) -> jax.Array:
    """``spec.chunk_scorer`` of G rows: ``logits [G, Qb, V]`` at the positions that predict
    the question ``targets [G or 1, Qb]``, scored where ``mask [G or 1, Qb]``. Returns
    ``[G]``, +inf for padding rows (``chunk_lengths`` 0)."""
    targets = jnp.broadcast_to(targets, logits.shape[:2])
    mask = jnp.broadcast_to(mask, logits.shape[:2])
    return jnp.where(chunk_lengths > 0, spec.chunk_scorer(logits, targets, mask), jnp.inf)


def chunk_selection(keys, values, kept, scores, chunk_lengths, chunk_ids, prefix_len: int,
                    capacity: int) -> ChunkSelection:
    """A ``ChunkSelection`` of G chunks from their kept tokens (keys, values ``[L, G, cap,
    KVH, D]``, row slots ``kept [L, G, KVH, cap]``) and scores ``[G]``; rows with
    ``chunk_lengths`` 0 are invalid."""
    token_valid = jnp.arange(capacity)[None, :] < jnp.minimum(chunk_lengths, capacity)[:, None]
    return ChunkSelection(
        keys=keys, values=values, kept_positions=kept, token_valid=token_valid, scores=scores,
        chunk_ids=chunk_ids.astype(jnp.int32), chunk_valid=chunk_lengths > 0, row_lengths=prefix_len + chunk_lengths,
    )


@functools.partial(jax.jit, static_argnames=("top_k",))
def keep_best_chunks(state: ChunkSelection, new: ChunkSelection, top_k: int) -> ChunkSelection:
    """Running top-k: the ``top_k`` lowest-score chunks among ``state`` and ``new``."""
    both = concat_selections(state, new)
    idx, _ = top_k_lowest(both.scores, both.chunk_valid, top_k)
    return both.take(idx)


def to_host(x: jax.Array) -> np.ndarray:
    """A possibly sharded array as NumPy on every host (``process_allgather`` when it spans hosts)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def rows_per_group(group_size: int, num_chunks: int, mesh: Mesh) -> int:
    """Rows per prefill call: ``group_size`` (a multiple of the devices on the mesh's ``chunk``
    axis), but never more than the input needs, rounded up to that device count."""
    n = mesh.shape["chunk"]
    if group_size < 1 or group_size % n:
        raise ConfigError(
            f"group_size={group_size} must be a multiple of the number of devices on the chunk axis ({n}) "
            "so that every device gets the same number of chunk rows"
        )
    return min(group_size, n * math.ceil(num_chunks / n))


def select_chunks(
    weights: Weights,
    cfg: ModelConfig,
    rows: Rows,
    spec: PrefillSpec,
    top_k: int,
    mesh: Mesh,
    group_size: int,
    progress: bool = False,
) -> tuple[ChunkSelection, np.ndarray]:
    """Stages 1, 1b (and chunk-stage 1c) over every chunk row, in groups of rows sharded over
    ``mesh``'s ``chunk`` axis, with a running top-k of ``top_k`` chunks.

    weights: placed on ``mesh`` (``sharding.shard_weights``). group_size: rows per call
    (``rows_per_group``); memory grows with it, results do not. Returns the selection and
    the score of every real chunk, ``[num_chunks]`` in document order.
    """
    num_chunks = rows.num_chunks
    groups = rows.groups(rows_per_group(group_size, num_chunks, mesh))
    state = empty_selection(cfg, top_k, spec.kept_tokens(rows), weights.embed.dtype)
    score_group = lambda group: (prefill_group(weights, cfg, shard(group, mesh), spec),)
    ((state, scores),) = keep_best_of_groups(groups, score_group, (state,), top_k, num_chunks, progress)
    return state, scores


def keep_best_of_groups(groups, score_group, states: tuple, top_k: int, num_chunks: int,
                        progress: bool = False) -> list[tuple[ChunkSelection, np.ndarray]]:
    """Running top-k selections over groups of chunk rows, several at once: ``score_group(
    group) -> tuple of ChunkSelection``, one per state of ``states``, each kept with
    ``keep_best_chunks`` into its state (``top_k`` chunks). Returns, per state, the final
    selection and the score of the first ``num_chunks`` chunks ``[num_chunks]``."""
    scores = [[] for _ in states]

    def step(group):
        nonlocal states
        scored = score_group(group)
        for kept, new in zip(scores, scored):
            kept.append(new.scores)
        states = tuple(keep_best_chunks(state, new, top_k) for state, new in zip(states, scored))
        return states

    for_each_group(groups, step, progress)
    return [(state, np.concatenate([to_host(s) for s in kept])[:num_chunks]) for state, kept in zip(states, scores)]


def for_each_group(groups, step, progress: bool = False) -> None:
    """Runs ``step(group)`` for every group, at most two groups in flight.

    JAX dispatches asynchronously: without a wait the loop would place every group's rows
    at once. Group g+1 is dispatched, then what ``step`` returned for group g waited for,
    so memory stays flat in the input length, and the bar advances when a group's result is
    ready (its rate and ETA are the work's, not the dispatch's). A Ctrl-C is seen at a wait (and a command's Ctrl-C that Python dropped, after it: ``_startup``).
    """
    bar = tqdm(total=len(groups), desc="chunk groups", unit="group", disable=not progress)
    in_flight = None
    try:
        for group in groups:
            done = step(group)
            if in_flight is not None:
                jax.block_until_ready(in_flight)
                bar.update(1)
                raise_if_interrupted()
            in_flight = done
        jax.block_until_ready(in_flight)
        bar.update(1)
    finally:
        bar.close()


class MergeLayout:
    """Where the kept chunks sit in the merged cache: ``shifts(chunk_lengths [K], valid [K])
    -> [K]`` int32, the position shift of each kept chunk (document order) on top of its row
    positions. Subclasses are frozen dataclasses (static arguments of ``jax.jit``)."""

    moves_keys = False  # whether the shifts can be non-zero (the cached keys are rotated)
    reprefills = False  # whether the kept chunks are read again as one row instead of merged

    def shifts(self, chunk_lengths: jax.Array, valid: jax.Array) -> jax.Array:
        return jnp.zeros_like(chunk_lengths)


@dataclasses.dataclass(frozen=True)
class ParallelLayout(MergeLayout):
    """The paper's layout: every kept chunk at its own row positions (all start after P)."""


@dataclasses.dataclass(frozen=True)
class SequentialLayout(MergeLayout):
    """Kept chunks one after another: chunk j's keys are rotated on by the lengths of the kept
    chunks before it (one more RoPE rotation, exact when the rotation angle is linear in the
    position: every rope type but ``dynamic`` NTK, ``rope_shift_is_exact``)."""

    moves_keys = True

    def shifts(self, chunk_lengths, valid):
        lengths = jnp.where(valid, chunk_lengths, 0)
        return (jnp.cumsum(lengths) - lengths).astype(jnp.int32)


def rope_shift_is_exact(cfg: ModelConfig) -> bool:
    """Whether rotating a cached key by d equals computing it at its position + d (the angle
    is position x a fixed frequency; ``dynamic`` NTK frequencies depend on the positions),
    for the global layers' rope and, where local layers rotate with their own, theirs."""
    ropes = [cfg.rope] + ([cfg.local_rope] if cfg.has_local_rope else [])
    return all(r.type != "dynamic" for r in ropes)


def shift_keys(cfg: ModelConfig, keys: jax.Array, shifts: jax.Array) -> jax.Array:
    """Rotates kept keys ``[L, K, cap, KVH, D]`` on by ``shifts [K]`` positions (per chunk),
    each layer with its own rope (``cfg.local_rope`` in the local layers)."""
    num_layers, k, cap, kvh, d = keys.shape
    cos, sin = layer_rope_tables(cfg, shifts[None, :])  # [1, K, 1, D], or both sets: [2, 1, K, 1, D]
    _, rope_sets = layer_kinds(cfg)
    if rope_sets is not None:
        cos, sin = cos[rope_sets, 0], sin[rope_sets, 0]  # each layer's own: [L, K, 1, D]
    return apply_rope(keys.reshape(num_layers, k, cap * kvh, d), cos, sin).reshape(keys.shape)


CHUNK_ORDERS = ("document", "relevance")
CHUNK_ANSWERS = ("together", "each")


@dataclasses.dataclass(frozen=True)
class ChunkArrangement:
    """Which of the kept chunks stage 2 reads, and in what order it lays them.

    order: ``document`` (the paper's: document order) or ``relevance`` (from the highest
      score to the lowest: the most relevant chunk last, nearest the question). Only the
      layouts that lay chunks end to end (sequential, reprefill) see the order; in the
      parallel layout every chunk keeps its own positions and the order changes nothing.
    score_margin: read a kept chunk only when its score is at most the best kept chunk's
      plus this margin (query NLL: nats per scored question token); None reads all top-k.
    answers: ``together`` (the paper's: one stage 2 reads every chunk it keeps) or ``each``
      (one stage 2 per read chunk, that chunk alone, and the answer the model finds most
      likely kept: ``pipeline.answer_each_chunk``).
    """

    order: str = "document"
    score_margin: float | None = None
    answers: str = "together"

    def __post_init__(self):
        if self.order not in CHUNK_ORDERS:
            raise ConfigError(f"chunk_order={self.order!r} is not allowed; choose one of: {', '.join(CHUNK_ORDERS)}")
        if self.score_margin is not None and not self.score_margin >= 0:
            raise ConfigError(f"chunk_score_margin={self.score_margin} must be >= 0 (or null: no margin)")
        if self.answers not in CHUNK_ANSWERS:
            raise ConfigError(f"chunk_answers={self.answers!r} is not allowed; choose one of: {', '.join(CHUNK_ANSWERS)}")

    def apply(self, selection: ChunkSelection) -> ChunkSelection:
        """The chunks of ``selection`` [K] that stage 2 reads (the others invalid), in laying
        order, invalid ones last (traceable)."""
        valid = selection.chunk_valid
        if self.score_margin is not None:
            valid = within_margin(selection.scores, valid, self.score_margin)
        if self.order == "relevance":
            order = relevance_order(selection.scores, selection.chunk_ids, valid)
        else:
            order = document_order(selection.chunk_ids, valid)
        return selection.replace(chunk_valid=valid).take(order)

    def read_chunks(self, selection: ChunkSelection) -> list[int]:
        """The document indices of the chunks stage 2 reads, in laying order (on the host)."""
        laid = self.apply(selection)
        return [int(c) for c in to_host(laid.chunk_ids)[to_host(laid.chunk_valid)]]

    def each_alone(self, selection: ChunkSelection) -> list[ChunkSelection]:
        """For ``answers: each``: per chunk stage 2 reads, in laying order, ``selection`` [K]
        with that chunk its only valid one."""
        return [selection.replace(chunk_valid=selection.chunk_valid & (selection.chunk_ids == c))
                for c in self.read_chunks(selection)]


def merge_selection(
    prefix_keys, prefix_values, selection: ChunkSelection, room: int, layout: MergeLayout = ParallelLayout(),
    cfg: ModelConfig | None = None, arrangement: ChunkArrangement = ChunkArrangement(),
) -> tuple[KVCache, jax.Array]:
    """Stage 2 merge: P once, then the kept chunks as ``arrangement`` lays them (default: all
    top-k in document order), then ``room`` free slots.

    prefix_keys/values: ``[L, P, KVH, D]``. layout: where the chunks sit (``ParallelLayout``,
    the paper's, or ``SequentialLayout``, which needs ``cfg`` to rotate keys). Returns a
    batch-1 ``KVCache`` whose next write goes after the last chunk, and the question's
    first position: the end of the furthest kept chunk, ``max(len(P) + shift + len(chunk))``
    (in the parallel layout the longest kept row length). When ``cfg`` has sliding-window
    layers the cache carries every entry's position (``KVCache.positions``: P at 0..P-1,
    a kept token at its row position + its chunk's shift, free slots -1), which the local
    layers' windows compare with the question's and the answer's positions.
    """
    sel = arrangement.apply(selection)
    num_layers, k, cap, kvh, d = sel.keys.shape
    p = prefix_keys.shape[1]
    shifts = layout.shifts(sel.row_lengths - p, sel.chunk_valid)
    if layout.moves_keys:
        sel = sel.replace(keys=shift_keys(cfg, sel.keys, shifts))

    def lay_out(prefix, chunks):
        flat = chunks.reshape(num_layers, k * cap, kvh, d)
        free = jnp.zeros((num_layers, room, kvh, d), chunks.dtype)
        return jnp.concatenate([prefix.astype(chunks.dtype), flat, free], axis=1)[:, None]

    chunk_valid = (sel.token_valid & sel.chunk_valid[:, None]).reshape(k * cap)
    valid = jnp.concatenate([jnp.ones((p,), bool), chunk_valid, jnp.zeros((room,), bool)])
    valid = jnp.broadcast_to(valid[None, None, :, None], (num_layers, 1, valid.shape[0], kvh))
    positions = None
    if cfg is not None and cfg.has_sliding_layers:
        chunk_pos = jnp.swapaxes(sel.kept_positions + shifts[None, :, None, None], 2, 3)  # [L, K, cap, KVH]
        positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :, None], (num_layers, p, kvh)),
                                     chunk_pos.reshape(num_layers, k * cap, kvh).astype(jnp.int32),
                                     jnp.full((num_layers, room, kvh), -1, jnp.int32)], axis=1)[:, None]
    cache = KVCache(lay_out(prefix_keys, sel.keys), lay_out(prefix_values, sel.values), valid, jnp.array([p + k * cap]),
                    positions=positions)
    question_start = jnp.max(jnp.where(sel.chunk_valid, sel.row_lengths + shifts, p))
    return cache, question_start


@dataclasses.dataclass(frozen=True)
class Reprefill(MergeLayout):
    """No merged cache: the kept chunks, in document order, run again as one row
    P + chunks + Q with full attention (they must fit in the window together)."""

    reprefills = True


MERGE_LAYOUTS = {"parallel": ParallelLayout(), "sequential": SequentialLayout(), "reprefill": Reprefill()}

