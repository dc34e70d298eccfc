"""One call from (context, question) to an answer: ``answer(model, context, question, config)``.

For ``parallelcomp`` and ``pcw`` this runs the stages of ALGORITHM.md in order:
chunk (``chunking``), prefill + score + evict per group of chunks with the chunk axis
sharded over the devices (``prefill.prefill_group``), select (running top-k,
``prefill.keep_best_chunks``), merge (``prefill.merge_selection``), then the question
prefill and greedy decoding on the merged cache. ``full`` and ``truncate`` are the
baselines on one row.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .attention import causal_attention
from .buckets import bucket_length
from .calibrate import check_rules_fit, preset_rules
from .chunking import PromptParts, build_rows, chunk_bounds, encode_parts
from .checkpoints import Model
from .config import ConfigError, ParallelCompConfig
from .decode import (
    check_max_new_tokens,
    decode_budget,
    decode_jit,
    finish,
    generate_ids,
    question_prefill,
    stop_token_ids,
)
from .errors import InputTooLongError, PcompError
from .prefill import ChunkSelection, empty_selection, keep_best_chunks, prefill_group, prefill_prefix
from .sharding import chunk_sharding, make_mesh, shard_weights


@dataclasses.dataclass
class Answer:
    """What ``answer`` returns.

    chunk_scores: query NLL of every chunk in document order (empty for full/truncate);
    selected_chunks: indices of the kept chunks in document order; timings: seconds per
    stage; context_tokens / prompt_tokens: sizes of the input.
    """

    text: str
    token_ids: list[int]
    chunk_scores: list[float]
    selected_chunks: list[int]
    timings: dict[str, float]
    method: str
    context_tokens: int
    num_chunks: int


def to_host(x: jax.Array) -> np.ndarray:
    """A possibly sharded array as NumPy on every host (``process_allgather`` when it spans hosts)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _timed(timings: dict, stage: str, start: float) -> float:
    now = time.perf_counter()
    timings[stage] = timings.get(stage, 0.0) + now - start
    return now


def calibration_rules(config: ParallelCompConfig, num_layers: int) -> tuple:
    """The config's explicit rules plus its preset (scaled to the depth), checked against it."""
    rules = tuple(config.calibration)
    if config.calibration_preset is not None:
        rules += preset_rules(config.calibration_preset, num_layers, config.calibration_preset_stage)
    check_rules_fit(rules, num_layers)
    return rules


def truncate_middle(context: np.ndarray, budget: int) -> np.ndarray:
    """First and last halves of a ``budget``-token window of ``context`` (unchanged when it fits)."""
    if len(context) <= budget:
        return context
    head = budget // 2
    return np.concatenate([context[:head], context[len(context) - (budget - head):]])


def fit_to_window(parts: PromptParts, window: int, room: int, keep: str = "middle") -> PromptParts:
    """``parts`` with the context cut so that P + context + Q + ``room`` new tokens fit in
    ``window``: ``keep="middle"`` drops the middle (``truncate_middle``; truncate, snapkv),
    ``keep="tail"`` keeps the most recent tokens (streaming)."""
    budget = window - len(parts.prefix) - len(parts.question) - room
    if budget < 1:
        raise InputTooLongError(
            f"prefix ({len(parts.prefix)}) + question ({len(parts.question)}) + {room} new tokens "
            f"leave no room for context in the window of {window} tokens"
        )
    context = truncate_middle(parts.context, budget) if keep == "middle" else parts.context[-budget:]
    return dataclasses.replace(parts, context=context)


def window_input(parts: PromptParts, method: str, window: int, room: int) -> PromptParts:
    """What the one-window methods read: truncate and snapkv the first and last halves of the
    window, streaming its most recent tokens; other methods read ``parts`` unchanged."""
    if method in ("truncate", "snapkv"):
        return fit_to_window(parts, window, room, "middle")
    if method == "streaming":
        return fit_to_window(parts, window, room, "tail")
    return parts


ONE_WINDOW_COMPRESSED = ("snapkv", "streaming")  # KV compression of the truncated input


def answer(
    model: Model,
    context: str,
    question: str,
    config: ParallelCompConfig | None = None,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> Answer:
    """Answers ``question`` about ``context`` with the method of ``config`` (default: ParallelComp)."""
    config = ParallelCompConfig() if config is None else config
    if not isinstance(config, ParallelCompConfig):
        raise ConfigError(f"config must be a pcomp_jax.ParallelCompConfig, got {type(config).__name__}")
    check_max_new_tokens(max_new_tokens)
    if model.tokenizer is None:
        raise PcompError(f"{model.source!r} has no tokenizer; answer() needs one to read text")
    if not isinstance(context, str) or not isinstance(question, str):
        raise PcompError("context and question must be strings")
    t = time.perf_counter()
    parts = encode_parts(model.tokenizer, context, question, config.instruction, config.answer_prefix, config.chat)
    return answer_parts(model, parts, config, max_new_tokens, progress, {"tokenize": time.perf_counter() - t})


def answer_parts(
    model: Model,
    parts: PromptParts,
    config: ParallelCompConfig,
    max_new_tokens: int = 32,
    progress: bool = False,
    timings: dict | None = None,
) -> Answer:
    """``answer`` for a prompt already split into token ids P, context and Q (e.g. by a
    benchmark's own template, ``longbench.encode_prompt``)."""
    if not isinstance(config, ParallelCompConfig):
        raise ConfigError(f"config must be a pcomp_jax.ParallelCompConfig, got {type(config).__name__}")
    check_max_new_tokens(max_new_tokens)
    timings = {} if timings is None else timings
    t = time.perf_counter()
    rules = calibration_rules(config, model.config.num_layers)
    check_rules_apply(rules, config.method)
    if config.method in ("full", "truncate"):
        return _answer_one_row(model, parts, config, max_new_tokens, timings, t)
    return _answer_chunked(model, parts, config, rules, max_new_tokens, timings, t, progress)


def check_rules_apply(rules, method: str) -> None:
    """Calibration is defined for the chunked methods only."""
    if rules and method not in ("parallelcomp", "pcw"):
        raise ConfigError(f"calibration applies to the chunked methods (parallelcomp, pcw), not {method!r}")


def _answer_one_row(model, parts: PromptParts, config, max_new_tokens, timings, t) -> Answer:
    row = window_input(parts, config.method, model.config.window, max_new_tokens)
    ids = np.concatenate([row.prefix, row.context, row.question])
    gen = generate_ids(model, ids, max_new_tokens)
    _timed(timings, "generate", t)
    return Answer(gen.text, gen.token_ids, [], [], timings, config.method, len(parts.context), 1)


@dataclasses.dataclass
class ContextPrefill:
    """Stage 1 done once for an input: what every question-prefill variant starts from.

    selection: the kept chunks (``prefill.ChunkSelection``); prefix_keys/values: P's KV;
    chunk_scores: NLL of every chunk in document order; weights: the (sharded) weights.
    """

    parts: PromptParts
    selection: ChunkSelection
    prefix_keys: jax.Array
    prefix_values: jax.Array
    chunk_scores: list[float]
    weights: object

    @property
    def selected_chunks(self) -> list[int]:
        ids = to_host(self.selection.chunk_ids)[to_host(self.selection.chunk_valid)]
        return sorted(int(c) for c in ids)


def prefill_context(model: Model, parts: PromptParts, config: ParallelCompConfig, chunk_rules=(), progress=False) -> ContextPrefill:
    """Stage 1 (+1b, and stage-1c ``chunk`` rules): chunk groups through the sharded prefill,
    running top-k selection. ``config.method``: parallelcomp or pcw; or snapkv / streaming,
    which take ``parts`` already cut to the window (``fit_to_window``) as one chunk."""
    cfg = model.config
    if config.method not in ("parallelcomp", "pcw", *ONE_WINDOW_COMPRESSED):
        raise ConfigError(f"prefill_context runs parallelcomp, pcw, snapkv or streaming, not {config.method!r}")
    kv_budget = config.baseline_kv_budget  # from the config as given, before the one-chunk layout below
    if config.method in ONE_WINDOW_COMPRESSED:
        config = dataclasses.replace(config, chunk_len=len(parts.context), capacity=None)
    mesh = make_mesh(config.num_devices)
    if config.group_size % mesh.size:
        raise ConfigError(
            f"group_size={config.group_size} must be a multiple of the number of devices ({mesh.size}) "
            "so that every device gets the same number of chunk rows"
        )
    num_chunks = len(chunk_bounds(len(parts.context), config.chunk_len))
    # A group never holds more rows than the input needs (rounded up to the device count).
    group = min(config.group_size, mesh.size * math.ceil(num_chunks / mesh.size))
    num_groups = math.ceil(num_chunks / group)
    rows = build_rows(parts, config.chunk_len, cfg.window, num_groups * group, config.score_last_tokens)
    no_eviction = config.capacity is None or config.method == "pcw"
    # Keeping as many tokens as a row holds keeps them all; the row length is a bucket, so
    # this does not add compilations.
    capacity = min(config.chunk_len if no_eviction else config.capacity, rows.tokens.shape[1])
    top_k = config.top_k_chunks if config.method == "parallelcomp" else bucket_length(num_chunks, minimum=1)
    token_scoring = "recent" if config.method == "streaming" else "snapkv"
    if config.method in ONE_WINDOW_COMPRESSED:
        capacity, top_k = min(kv_budget, rows.tokens.shape[1]), 1
    weights = shard_weights(model.params, mesh)
    prefix_keys, prefix_values = prefill_prefix(weights, cfg, jnp.asarray(parts.prefix))
    state = empty_selection(cfg, top_k, capacity, model.dtype)
    chunk_ids = np.arange(rows.tokens.shape[0], dtype=np.int32)
    attention = causal_attention(config.attention, needs_key_mask=bool(chunk_rules), dtype=model.dtype)
    scores = []
    for g in tqdm(range(num_groups), desc="chunk groups", unit="group", disable=not progress):
        rows_g = slice(g * group, (g + 1) * group)
        arrays = [rows.tokens, rows.positions, rows.row_lengths, rows.chunk_lengths, chunk_ids,
                  rows.question_targets, rows.question_mask, rows.score_at]
        sharded = [jax.device_put(a[rows_g], chunk_sharding(mesh, a.ndim)) for a in arrays]
        scored = prefill_group(
            weights, cfg, *sharded, prefix_len=rows.prefix_len, capacity=capacity, obs_window=config.obs_window,
            pool_kernel=config.pool_kernel, attention=attention, chunk_rules=tuple(chunk_rules),
            token_scoring=token_scoring,
        )
        scores.append(scored.scores)
        state = keep_best_chunks(state, scored, top_k)
    jax.block_until_ready(state)
    chunk_scores = [float(s) for s in np.concatenate([to_host(s) for s in scores])[:num_chunks]]
    return ContextPrefill(parts, state, prefix_keys, prefix_values, chunk_scores, weights)


def answer_from_prefill(model: Model, pre: ContextPrefill, max_new_tokens: int, merged_rules=(), timings=None):
    """Stage 2 and 3 on a ``ContextPrefill``: merge, question prefill (with stage-1c ``merged``
    rules), greedy decoding. Returns a ``decode.Generation``."""
    timings = {} if timings is None else timings
    t = time.perf_counter()
    q_len = len(pre.parts.question)
    question = np.zeros(bucket_length(q_len, minimum=16), np.int32)
    question[:q_len] = pre.parts.question
    steps = decode_budget(max_new_tokens)
    cache, first, position = question_prefill(
        pre.weights, model.config, pre.prefix_keys, pre.prefix_values, pre.selection, jnp.asarray(question),
        jnp.int32(q_len), steps, merged_rules=tuple(merged_rules),
    )
    jax.block_until_ready(cache)
    t = _timed(timings, "question_prefill", t)
    stops = jnp.asarray(stop_token_ids(model) or [-1], jnp.int32)
    out = decode_jit(pre.weights, model.config, cache, first, position, stops, steps, jnp.int32(max_new_tokens))
    gen = finish(model, out, stops, len(pre.parts.prefix) + len(pre.parts.question))
    _timed(timings, "decode", t)
    return gen


def _answer_chunked(model, parts: PromptParts, config: ParallelCompConfig, rules, max_new_tokens, timings, t, progress) -> Answer:
    context_tokens = len(parts.context)
    parts = window_input(parts, config.method, model.config.window, max_new_tokens)
    pre = prefill_context(model, parts, config, tuple(r for r in rules if r.stage == "chunk"), progress)
    _timed(timings, "prefill", t)
    gen = answer_from_prefill(model, pre, max_new_tokens, tuple(r for r in rules if r.stage == "merged"), timings)
    return Answer(
        text=gen.text, token_ids=gen.token_ids, chunk_scores=pre.chunk_scores, selected_chunks=pre.selected_chunks,
        timings=timings, method=config.method, context_tokens=context_tokens, num_chunks=len(pre.chunk_scores),
    )
