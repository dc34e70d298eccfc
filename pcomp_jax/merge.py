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
from .prefill import ChunkSelection, MergeLayout, ParallelLayout, merge_selection


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """The static settings of stage 2 (a jit argument, as ``prefill.PrefillSpec`` is of stage 1).

    layout: where the kept chunks sit (``prefill.MergeLayout``; ``Reprefill``: they are
    read again as one row and stage 2 does not run). rules: the stage-``merged``
    calibration rules (removed entries leave that layer's cache). eviction: the optional
    ``decode.StageEviction`` over the merged cache. decode_eviction: the optional
    ``decode.DecodeEviction`` while decoding.
    """

    layout: MergeLayout = ParallelLayout()
    rules: tuple[CalibrationRule, ...] = ()
    eviction: StageEviction | None = None
    decode_eviction: DecodeEviction | None = None


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
    query_slots [B, T]) -> valid [B, S, KVH]``."""
    drops = [d for d in drops if d is not None]
    if not drops:
        return None

    def drop(q, k_cache, valid, layer_index, query_slots):
        for d in drops:
            valid = d(q, k_cache, valid, layer_index, query_slots)
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
                                   cfg)
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
