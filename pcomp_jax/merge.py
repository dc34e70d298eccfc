"""Stage 2: the kept chunks merged into one cache, and tokens run on top of it.

Stage 1 ends in a ``ContextCache`` (P's keys and values and the ``prefill.ChunkSelection``
of the kept chunks); a static ``MergeSpec`` says how stage 2 treats it (where the chunks
sit, the merged-stage calibration rules, the optional stage and decode evictions).
``merged_forward(weights, cfg, context, tokens, length, spec, room=...)`` merges and runs
new tokens (traceable); ``question_prefill`` runs the question that way (jitted) and
returns the ``decode.DecodeState`` greedy decoding starts from; ``generate_from_context``
does both from host-side ids and decodes (``perplexity`` scores a continuation on the
merged cache instead).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .axes import axes_field
from .buckets import bucket_length
from .calibrate import CalibrationRule, merged_drop_fn
from .checkpoints import Model
from .errors import PcompError
from .decode import (
    DecodeEviction,
    DecodeState,
    Generation,
    StageEviction,
    check_max_new_tokens,
    decode_budget,
    decode_jit,
    finish,
    pad_ids,
    stop_token_ids,
)
from .model.config import ModelConfig
from .model.llama import Weights, cached_forward
from .prefill import ChunkArrangement, ChunkSelection, MergeLayout, ParallelLayout, merge_selection


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """The static settings of stage 2 (a jit argument, as ``prefill.PrefillSpec`` is of stage 1).

    layout: where the kept chunks sit (``prefill.MergeLayout``; ``Reprefill``: they are
    read again as one row and stage 2 does not run). rules: the stage-``merged``
    calibration rules (removed entries leave that layer's cache). eviction: the optional
    ``decode.StageEviction`` over the merged cache. decode_eviction: the optional
    ``decode.DecodeEviction`` while decoding. arrangement: which kept chunks are read and
    in what order they are laid (``prefill.ChunkArrangement``; default: all, in document order).
    """

    layout: MergeLayout = ParallelLayout()
    rules: tuple[CalibrationRule, ...] = ()
    eviction: StageEviction | None = None
    decode_eviction: DecodeEviction | None = None
    arrangement: ChunkArrangement = ChunkArrangement()


@flax.struct.dataclass
class ContextCache:
    """What stage 1 leaves for stage 2: P's cache and the kept chunks.

    prefix_keys, prefix_values: ``[L, P, KVH, D]`` P's rotated keys and values (positions
    0..P-1); selection: the ``prefill.ChunkSelection`` of the kept chunks.
    """

    prefix_keys: jax.Array = axes_field("layers", "prefix", "kv_heads", "head_dim")
    prefix_values: jax.Array = axes_field("layers", "prefix", "kv_heads", "head_dim")
    selection: ChunkSelection

    @property
    def prefix_len(self) -> int:
        return self.prefix_keys.shape[1]


def chain_drops(*drops):
    """One ``drop_from_cache`` hook applying the given ones (None skipped) in order; None if
    none. A hook: ``(q [B, T, H, D], k_cache [B, S, KVH, D], valid [B, S, KVH], layer_index,
    query_slots [B, T]) -> valid [B, S, KVH]``, and for a model with sliding-window layers
    the keyword ``window_visible [B, KVH, T, S]`` (``model.llama.cached_forward``)."""
    drops = [d for d in drops if d is not None]
    if not drops:
        return None

    def drop(q, k_cache, valid, layer_index, query_slots, **window):
        for d in drops:
            valid = d(q, k_cache, valid, layer_index, query_slots, **window)
        return valid

    return drop


def merged_forward(weights: Weights, cfg: ModelConfig, context: ContextCache, tokens: jax.Array, length: jax.Array,
                   spec: MergeSpec, *, room: int, rule_queries: jax.Array | None = None):
    """Stage 2 (traceable; callers jit): merge ``context`` in ``spec.layout``, then run
    ``tokens`` on top of it.

    tokens: ``[Tb]`` padded ids, real up to ``length`` (traced); they take positions from
    the longest kept row on, padding at that first position (no new largest position).
    room: free cache slots after the kept chunks (``>= Tb``). ``spec.rules`` and
    ``spec.eviction`` observe the last of the first ``rule_queries`` tokens (default
    ``length``); with ``spec.decode_eviction`` the cache keeps the attention of the last of
    the ``length`` tokens its scorer reads.
    Returns ``(logits [Tb, V] float32, cache, first_position)``.
    """
    if spec.layout.reprefills:
        raise PcompError("merge_layout=reprefill reads the kept chunks again as one row and builds no merged cache; "
                         "run stage 2 with pipeline.run_stage2")
    cache, start = merge_selection(context.prefix_keys, context.prefix_values, context.selection, room, spec.layout,
                                   cfg, spec.arrangement)
    steps = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    positions = (start + jnp.where(steps < length, steps, 0))[None]
    rule_queries = length if rule_queries is None else rule_queries
    drop = chain_drops(merged_drop_fn(spec.rules, rule_queries) if spec.rules else None,
                       spec.eviction.drop_fn(context.prefix_len, rule_queries) if spec.eviction is not None else None)
    observe_at = None
    if spec.decode_eviction is not None:
        cache, observe_at = spec.decode_eviction.empty_window(cache), spec.decode_eviction.last_queries(length)
    logits, cache = cached_forward(weights, cfg, tokens[None], positions, cache, drop_from_cache=drop,
                                   observe_at=observe_at)
    return logits[0], cache, start


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "num_steps"))
def question_prefill(weights: Weights, cfg: ModelConfig, context: ContextCache, question: jax.Array,
                     question_len: jax.Array, spec: MergeSpec, *, num_steps: int) -> DecodeState:
    """Stage 2: merge ``context`` and run the question on top of it (``merged_forward``).

    question: ``[Qb]`` padded ids; question_len: real length. Returns the ``DecodeState``
    to decode up to ``num_steps`` tokens from: the first answer token ``[1]``, its
    position ``[1]``, the cache without the question's padding.
    """
    qb = question.shape[0]
    logits, cache, start = merged_forward(weights, cfg, context, question, question_len, spec, room=qb + num_steps)
    end = cache.end - qb + question_len  # drop the question's padding from the cache
    valid = cache.valid & (jnp.arange(cache.capacity) < end[:, None])[None, :, :, None]
    cache = cache.replace(valid=valid, end=end)
    first = jnp.argmax(logits[question_len - 1]).astype(jnp.int32)
    return DecodeState.start(cache, first[None], (start + question_len)[None], num_steps)


def generate_from_context(model: Model, weights: Weights, context: ContextCache, question_ids, spec: MergeSpec,
                          max_new_tokens: int, timings: dict | None = None) -> Generation:
    """Stages 2 and 3 from host-side ids: the question ``question_ids [Q]`` (the prompt's
    part Q) prefilled on the merged ``context``, then greedy decoding of up to
    ``max_new_tokens`` (stops at the model's stop tokens). ``weights``: as used for the
    selection (sharded or not). ``timings``, when given, gets the seconds of
    ``question_prefill`` and ``decode``."""
    check_max_new_tokens(max_new_tokens)
    timings = {} if timings is None else timings
    t = time.perf_counter()
    question_ids = np.asarray(question_ids, np.int32)
    steps = decode_budget(max_new_tokens)
    state = question_prefill(weights, model.config, context, jnp.asarray(pad_ids(question_ids, minimum=16)),
                             jnp.int32(len(question_ids)), spec, num_steps=steps)
    jax.block_until_ready(state)
    now = time.perf_counter()
    timings["question_prefill"] = timings.get("question_prefill", 0.0) + now - t
    stops = jnp.asarray(stop_token_ids(model) or [-1], jnp.int32)
    done = decode_jit(weights, model.config, state, stops, jnp.int32(max_new_tokens), spec.decode_eviction)
    gen = finish(model, done.emitted, stops, context.prefix_len + len(question_ids))
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - now
    return gen


def batches(spec: MergeSpec) -> bool:
    """Whether ``generate_batch`` runs several requests under ``spec`` in one batch: a merged
    layout without the merged-stage calibration rules and the evictions after the merge
    (their observed queries are per request) that reads its chunks together (``answers:
    each`` runs a stage 2 per chunk); such requests run one by one."""
    return not (spec.layout.reprefills or spec.rules or spec.eviction is not None
                or spec.decode_eviction is not None or spec.arrangement.answers == "each")


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "capacity"))
def _merged_into(context: ContextCache, cfg: ModelConfig, spec: MergeSpec, capacity: int):
    """``context`` merged as ``spec`` lays it into a batch-1 cache of exactly ``capacity``
    slots (the free room after the kept chunks fills the rest). Returns ``(cache, start)``."""
    _, k, cap, _, _ = context.selection.keys.shape
    room = capacity - context.prefix_len - k * cap
    return merge_selection(context.prefix_keys, context.prefix_values, context.selection, room, spec.layout, cfg,
                           spec.arrangement)


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps"))
def _question_batch(weights: Weights, cfg: ModelConfig, cache, starts: jax.Array, questions: jax.Array,
                    lengths: jax.Array, running: jax.Array, *, num_steps: int) -> DecodeState:
    """Stage 2 for B merged caches at once: ``questions [B, Qb]`` (row b real up to
    ``lengths[b]``) at positions from ``starts [B]`` (padding at the row's first position),
    on ``cache`` (batch B, each row's next write at its ``end``). ``running [B]``: False for
    the rows that only fill the batch to its bucket (they emit nothing). Returns the
    ``DecodeState`` of every row, as ``question_prefill`` gives it for one."""
    qb = questions.shape[1]
    steps = jnp.arange(qb, dtype=jnp.int32)
    positions = starts[:, None] + jnp.where(steps[None, :] < lengths[:, None], steps[None, :], 0)
    logits, cache = cached_forward(weights, cfg, questions, positions, cache)
    end = cache.end - qb + lengths  # drop each question's padding from the cache
    valid = cache.valid & (jnp.arange(cache.capacity)[None, :] < end[:, None])[None, :, :, None]
    cache = cache.replace(valid=valid, end=end)
    first = jnp.argmax(jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], axis=-1)
    state = DecodeState.start(cache, first.astype(jnp.int32), starts + lengths, num_steps)
    return state.replace(done=~running)


def batch_shapes(contexts: list, questions: list, max_new_tokens: int) -> tuple[int, int, int, int]:
    """The static shapes of ``generate_batch`` for ``contexts`` (``ContextCache``s, concrete
    or abstract) and ``questions`` (token ids): ``(rows, question bucket, cache slots,
    decoding steps)``: the batch padded to a power of two, the longest question's bucket,
    the slots of the widest merged cache + question + steps (bucketed)."""
    steps = decode_budget(max_new_tokens)
    qb = max(bucket_length(len(q), minimum=16) for q in questions)
    widths = [c.prefix_len + c.selection.keys.shape[1] * c.selection.keys.shape[2] for c in contexts]
    return 1 << (len(contexts) - 1).bit_length(), qb, bucket_length(max(widths) + qb + steps), steps


def stack_batch(caches: list):
    """Batch-1 caches (``_merged_into``'s) as one cache of their batch: arrays with a layer
    axis are joined on axis 1 (batch), the per-row ones (``end``) on axis 0."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1 if xs[0].ndim > 1 else 0), *caches)


def generate_batch(model: Model, weights: Weights, contexts: list, questions: list, spec: MergeSpec,
                   max_new_tokens: int, timings: dict | None = None) -> list[Generation]:
    """``[generate_from_context(model, weights, c, q, spec, max_new_tokens) for c, q in
    zip(contexts, questions)]`` with stage 2 and decoding run as one batch: each request's
    merged cache (``ContextCache``, its own selection) is laid into a common number of
    slots (a bucket), the questions ``[Q_b]`` padded to a common bucket, one question
    prefill for the batch and one greedy decoding loop in which each request stops at its
    own stop token (a stopped request emits nothing more). The batch is padded to a power
    of two with rows that emit nothing, so that few programs compile. Under a spec that
    does not batch (``batches``) the requests run one by one. ``timings`` gets the seconds
    of the batch's ``question_prefill`` and ``decode``."""
    check_max_new_tokens(max_new_tokens)
    timings = {} if timings is None else timings
    if not batches(spec) or len(contexts) == 1:
        return [generate_from_context(model, weights, c, q, spec, max_new_tokens, timings)
                for c, q in zip(contexts, questions)]
    t = time.perf_counter()
    questions = [np.asarray(q, np.int32) for q in questions]
    n = len(contexts)
    size, qb, capacity, steps = batch_shapes(contexts, questions, max_new_tokens)
    fill = list(range(n)) + [n - 1] * (size - n)  # rows that fill the bucket repeat the last request
    merged = [_merged_into(contexts[i], model.config, spec, capacity) for i in range(n)]
    caches = [merged[i][0] for i in fill]
    cache = stack_batch(caches)
    starts = jnp.stack([merged[i][1] for i in fill]).astype(jnp.int32)
    padded = np.zeros((size, qb), np.int32)
    for row, i in enumerate(fill):
        padded[row, : len(questions[i])] = questions[i]
    lengths = jnp.asarray([len(questions[i]) for i in fill], jnp.int32)
    running = jnp.asarray([row < n for row in range(size)])
    state = _question_batch(weights, model.config, cache, starts, jnp.asarray(padded), lengths, running,
                            num_steps=steps)
    jax.block_until_ready(state)
    del merged, caches, cache  # laid out into the state's cache: freed before decoding
    now = time.perf_counter()
    timings["question_prefill"] = timings.get("question_prefill", 0.0) + now - t
    stops = jnp.asarray(stop_token_ids(model) or [-1], jnp.int32)
    done = decode_jit(weights, model.config, state, stops, jnp.int32(max_new_tokens), None)
    emitted = np.asarray(done.emitted)
    gens = [finish(model, emitted[i : i + 1], stops, contexts[i].prefix_len + len(questions[i])) for i in range(n)]
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - now
    return gens
