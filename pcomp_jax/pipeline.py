"""One call from (context, question) to an answer: ``answer(model, context, question, config)``.

The config's ``method`` names a ``methods.Method``; its fields decide every step. For a
chunked method this runs the stages of docs/algorithm.md in order: fit the input to the window,
chunk (``chunking.build_rows``), prefill + score + evict per group of chunk rows with the
chunk axis sharded over the devices and a running top-k (``prefill.select_chunks``), merge
and question prefill on the merged cache and greedy decoding (``decode.decode_selection``).
A one-row method without compression generates with plain full attention.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from .calibrate import check_rules_fit, preset_rules
from .checkpoints import Model
from .chunking import PromptParts, build_rows, chunk_bounds, encode_parts
from .config import ConfigError, ParallelCompConfig
from .decode import check_max_new_tokens, decode_selection, generate_ids
from .errors import InputTooLongError, PcompError
from .methods import Method, get_method
from .prefill import (
    ChunkSelection,
    MergeLayout,
    ParallelLayout,
    prefill_prefix,
    rope_shift_is_exact,
    rows_per_group,
    select_chunks,
    to_host,
)
from .sharding import check_model_fits_mesh, make_mesh, rules_for, shard_weights


@dataclasses.dataclass
class Answer:
    """What ``answer`` returns.

    chunk_scores: score of every chunk in document order (empty for one-row methods without
    compression); selected_chunks: indices of the kept chunks in document order; timings:
    seconds per stage; context_tokens: size of the context; num_chunks: chunks it was cut into.
    """

    text: str
    token_ids: list[int]
    chunk_scores: list[float]
    selected_chunks: list[int]
    timings: dict[str, float]
    method: str
    context_tokens: int
    num_chunks: int


def calibration_rules(config: ParallelCompConfig, num_layers: int) -> tuple:
    """The config's explicit rules plus its preset (scaled to the depth), checked against the
    model's depth and the method."""
    rules = tuple(config.calibration)
    if config.calibration_preset is not None:
        rules += preset_rules(config.calibration_preset, num_layers, config.calibration_preset_stage)
    check_rules_fit(rules, num_layers)
    get_method(config.method).check_calibration(rules)
    return rules


def stage_rules(rules, stage: str) -> tuple:
    """The calibration rules of one stage (``chunk`` or ``merged``)."""
    return tuple(r for r in rules if r.stage == stage)


def merge_layout(model: Model, config: ParallelCompConfig) -> MergeLayout:
    """The method's merge layout under ``config`` (``Method.merge_layout``), refused where it
    would not be exact for ``model``."""
    layout = get_method(config.method).merge_layout(config)
    if layout.moves_keys and not rope_shift_is_exact(model.config):
        raise ConfigError(f"merge_layout={config.merge_layout!r} rotates cached keys to new positions, which is "
                          f"not exact with {model.config.rope.type!r} rope; use parallel or reprefill")
    return layout


def check_laid_out_fits(model: Model, parts: PromptParts, kept_lengths, layout: MergeLayout, max_new_tokens: int,
                        fewest: bool = False) -> None:
    """Laid end to end (sequential, reprefill), P + the kept chunks (``kept_lengths``, their
    token counts) + Q + the answer must fit in the model's window. ``fewest``: the lengths
    are the shortest chunks any selection could keep (checked before the prefill)."""
    if not (layout.moves_keys or layout.reprefills):
        return
    kept = int(sum(kept_lengths))
    need = len(parts.prefix) + kept + len(parts.question) + max_new_tokens
    if need > model.config.window:
        which = f"even the {len(kept_lengths)} shortest chunks" if fewest else "the kept chunks"
        raise InputTooLongError(
            f"{which} laid end to end ({kept} tokens, with P, Q and {max_new_tokens} new tokens: {need}) do not fit "
            f"in the model's window of {model.config.window} tokens; lower top_k_chunks or chunk_len, or use "
            "merge_layout=parallel (the paper's presets, ParallelCompConfig.preset, do)"
        )


def reprefill_ids(pre: "ContextPrefill") -> np.ndarray:
    """P + the kept chunks' tokens in document order + Q, for ``merge_layout=reprefill``."""
    chunks = [pre.parts.context[s:e] for s, e in pre.kept_bounds]
    return np.concatenate([pre.parts.prefix, *chunks, pre.parts.question])


def model_mesh(model: Model, config: ParallelCompConfig):
    """The ``(chunk, model)`` device mesh of ``config`` (``sharding.make_mesh``), refused when
    its ``model`` axis does not divide ``model``'s heads, MLP width or vocabulary."""
    mesh = make_mesh(config.num_devices, config.model_parallel)
    check_model_fits_mesh(model.config, mesh)
    return mesh


def check_config_fits(model: Model, config: ParallelCompConfig) -> None:
    """The checks of the settings alone against ``model`` (calibration against the method and
    the model's depth, the attention backend on this platform, the merge layout), made before
    any input is read. Raises ``ConfigError``."""
    merge_layout(model, config)
    model_mesh(model, config)
    rules = calibration_rules(config, model.config.num_layers)
    get_method(config.method).prefill_spec(config, stage_rules(rules, "chunk")).attention_fn(model.dtype)


def prefill_key(config: ParallelCompConfig) -> ParallelCompConfig:
    """``config`` with what acts only after the chunk prefill set to its default (the merge
    layout, stage and decode eviction, merged-stage calibration): configs with equal keys
    share stage 1."""
    preset = config.calibration_preset if config.calibration_preset_stage == "chunk" else None
    stage = get_method(config.method).stage_eviction(config) is not None
    capacity = None if stage else config.capacity  # stage eviction: the chunks keep every token
    return dataclasses.replace(config, merge_layout="parallel", stage_eviction=False, decode_eviction=False,
                               capacity=capacity, calibration=stage_rules(config.calibration, "chunk"),
                               calibration_preset=preset, calibration_preset_stage="merged" if preset is None else "chunk")


def check_config(config) -> ParallelCompConfig:
    if not isinstance(config, ParallelCompConfig):
        raise ConfigError(f"config must be a pcomp_jax.ParallelCompConfig, got {type(config).__name__}")
    return config


def answer(
    model: Model,
    context: str,
    question: str,
    config: ParallelCompConfig | None = None,
    max_new_tokens: int = 32,
    progress: bool = False,
    prefills: dict | None = None,
) -> Answer:
    """Answers ``question`` about ``context`` with the method of ``config`` (default: ParallelComp).

    prefills: an optional dict that keeps stage 1's results for this input (see
    ``answer_parts``): pass the same dict to calls that differ only after the chunk prefill."""
    config = check_config(ParallelCompConfig() if config is None else config)
    check_max_new_tokens(max_new_tokens)
    if model.tokenizer is None:
        raise PcompError(f"{model.source!r} has no tokenizer; answer() needs one to read text")
    if not isinstance(context, str) or not isinstance(question, str):
        raise PcompError("context and question must be strings")
    t = time.perf_counter()
    parts = encode_parts(model.tokenizer, context, question, config.instruction, config.answer_prefix, config.chat)
    return answer_parts(model, parts, config, max_new_tokens, progress, {"tokenize": time.perf_counter() - t},
                        prefills)


def answer_parts(
    model: Model,
    parts: PromptParts,
    config: ParallelCompConfig,
    max_new_tokens: int = 32,
    progress: bool = False,
    timings: dict | None = None,
    prefills: dict | None = None,
) -> Answer:
    """``answer`` for a prompt already split into token ids P, context and Q (e.g. by a
    benchmark's own template, ``longbench.encode_prompt``).

    prefills: for several calls on the same ``parts``, a dict (empty at first) in which stage
    1's result is kept under ``prefill_key(config)``: configs that differ only after the
    chunk prefill (merge layout, merged-stage calibration) then share one chunk prefill."""
    config = check_config(config)
    check_max_new_tokens(max_new_tokens)
    timings = {} if timings is None else timings
    t = time.perf_counter()
    method = get_method(config.method)
    rules = calibration_rules(config, model.config.num_layers)
    layout = merge_layout(model, config)
    context_tokens = len(parts.context)
    parts = method.fit(parts, model.config.window, max_new_tokens)
    if method.plain_row:
        gen = generate_ids(model, np.concatenate([parts.prefix, parts.context, parts.question]), max_new_tokens)
        timings["generate"] = time.perf_counter() - t
        return Answer(gen.text, gen.token_ids, [], [], timings, config.method, context_tokens, 1)
    check_fewest_fit(model, parts, config, method, layout, max_new_tokens)
    key = prefill_key(config)
    if prefills is not None and key in prefills:
        pre = prefills[key]
    else:
        pre = prefill_context(model, parts, config, stage_rules(rules, "chunk"), progress, method)
        if prefills is not None:
            prefills[key] = pre
    timings["prefill"] = timings.get("prefill", 0.0) + time.perf_counter() - t
    return answer_selection(model, pre, config, max_new_tokens, timings, context_tokens)


def check_fewest_fit(model: Model, parts: PromptParts, config: ParallelCompConfig, method: Method,
                     layout: MergeLayout, max_new_tokens: int) -> None:
    """Refuses, before any prefill, a layout laying the kept chunks end to end when even the
    shortest chunks a selection could keep would not fit (``check_laid_out_fits``)."""
    if layout.moves_keys or layout.reprefills:
        lengths = sorted(e - s for s, e in context_chunks(parts, config, method))
        check_laid_out_fits(model, parts, lengths[: method.kept_chunks(config, len(lengths))], layout,
                            max_new_tokens, fewest=True)


def answer_selection(model: Model, pre: "ContextPrefill", config: ParallelCompConfig, max_new_tokens: int,
                     timings: dict, context_tokens: int) -> Answer:
    """Stages 2 and 3 of ``config``'s method on a done stage 1 (``pre``): merge in the
    method's layout (or reprefill the kept chunks), question prefill, decoding."""
    method = get_method(config.method)
    rules = calibration_rules(config, model.config.num_layers)
    layout = merge_layout(model, config)
    check_laid_out_fits(model, pre.parts, pre.kept_lengths, layout, max_new_tokens)
    if layout.reprefills:
        t = time.perf_counter()
        gen = generate_ids(model, reprefill_ids(pre), max_new_tokens)
        timings["reprefill"] = time.perf_counter() - t
    else:
        gen = answer_from_prefill(model, pre, max_new_tokens, stage_rules(rules, "merged"), timings, layout,
                                  method.stage_eviction(config), method.decode_eviction(config))
    return Answer(
        text=gen.text, token_ids=gen.token_ids, chunk_scores=pre.chunk_scores, selected_chunks=pre.selected_chunks,
        timings=timings, method=config.method, context_tokens=context_tokens, num_chunks=len(pre.chunk_scores),
    )


@dataclasses.dataclass
class ContextPrefill:
    """Stage 1 done once for an input: what every question-prefill variant starts from.

    selection: the kept chunks (``prefill.ChunkSelection``); prefix_keys/values: P's KV;
    chunk_scores: score of every chunk in document order; weights: the (sharded) weights;
    bounds: every chunk's ``(start, end)`` in the context.
    """

    parts: PromptParts
    selection: ChunkSelection
    prefix_keys: jax.Array
    prefix_values: jax.Array
    chunk_scores: list[float]
    weights: object
    bounds: list[tuple[int, int]]

    @property
    def selected_chunks(self) -> list[int]:
        ids = to_host(self.selection.chunk_ids)[to_host(self.selection.chunk_valid)]
        return sorted(int(c) for c in ids)

    @property
    def kept_bounds(self) -> list[tuple[int, int]]:
        """``(start, end)`` of the kept chunks, in document order."""
        return [self.bounds[c] for c in self.selected_chunks]

    @property
    def kept_lengths(self) -> list[int]:
        """Token counts of the kept chunks, in document order."""
        return [e - s for s, e in self.kept_bounds]


def context_chunks(parts: PromptParts, config: ParallelCompConfig, method: Method) -> list[tuple[int, int]]:
    """``(start, end)`` of every chunk of ``parts.context`` under ``config`` (``chunking.chunk_bounds``)."""
    breaks = parts.breaks if config.sentence_chunks else None
    return chunk_bounds(len(parts.context), method.chunk_len(config, parts), breaks, method.chunk_overlap(config))


def context_rows(model: Model, parts: PromptParts, config: ParallelCompConfig, method: Method):
    """The chunk rows (``chunking.Rows``) of ``parts`` under ``config`` and ``method``."""
    if not config.sentence_chunks:
        parts = dataclasses.replace(parts, breaks=None)
    chunk_len, overlap = method.chunk_len(config, parts), method.chunk_overlap(config)
    return build_rows(parts, chunk_len, model.config.window, score_last_tokens=config.score_last_tokens,
                      overlap=overlap)


def prefill_context(
    model: Model, parts: PromptParts, config: ParallelCompConfig, chunk_rules=(), progress=False,
    method: Method | None = None,
) -> ContextPrefill:
    """Stage 1 (+1b, and stage-1c ``chunk`` rules) of ``config``'s method on ``parts`` as fitted
    to the window (``Method.fit``): chunk rows through the sharded prefill, running top-k."""
    method = get_method(config.method) if method is None else method
    if method.plain_row:
        raise ConfigError(f"method {method.name!r} reads one plain row; it has no chunk prefill")
    cfg = model.config
    mesh = model_mesh(model, config)
    rows = context_rows(model, parts, config, method)
    spec = method.prefill_spec(config, chunk_rules)
    rows_per_group(config.group_size, rows.num_chunks, mesh)  # a bad group size is refused before any work
    weights = shard_weights(model.params, mesh, rules_for(cfg, mesh))
    prefix_keys, prefix_values = prefill_prefix(weights, cfg, jnp.asarray(parts.prefix))
    top_k = method.kept_chunks(config, rows.num_chunks)
    state, scores = select_chunks(weights, cfg, rows, spec, top_k, mesh, config.group_size, progress)
    bounds = context_chunks(parts, config, method)
    return ContextPrefill(parts, state, prefix_keys, prefix_values, [float(s) for s in scores], weights, bounds)


def answer_from_prefill(model: Model, pre: ContextPrefill, max_new_tokens: int, merged_rules=(), timings=None,
                        layout: MergeLayout = ParallelLayout(), eviction=None, decode_eviction=None):
    """Stage 2 and 3 on a ``ContextPrefill``: merge (in ``layout``), question prefill (with
    stage-1c ``merged`` rules and the optional ``decode.StageEviction``), greedy decoding
    (with the optional ``decode.DecodeEviction``). Returns a ``decode.Generation``."""
    return decode_selection(model, pre.weights, pre.prefix_keys, pre.prefix_values, pre.selection,
                            pre.parts.question, max_new_tokens, merged_rules, timings, layout, eviction,
                            decode_eviction)
