"""One call from (context, question) to an answer: ``answer(model, context, question, config)``.

The config's ``method`` names a ``methods.Method``; its fields decide every step. For a
chunked method this runs the stages of ALGORITHM.md in order: fit the input to the window,
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
from .chunking import PromptParts, build_rows, encode_parts
from .config import ConfigError, ParallelCompConfig
from .decode import check_max_new_tokens, decode_selection, generate_ids
from .errors import PcompError
from .methods import Method, get_method
from .prefill import ChunkSelection, prefill_prefix, rows_per_group, select_chunks, to_host
from .sharding import make_mesh, shard_weights


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


def check_config_fits(model: Model, config: ParallelCompConfig) -> None:
    """The checks of the settings alone against ``model`` (calibration against the method and
    the model's depth, the attention backend on this platform), made before any input is read.
    Raises ``ConfigError``."""
    rules = calibration_rules(config, model.config.num_layers)
    get_method(config.method).prefill_spec(config, stage_rules(rules, "chunk")).attention_fn(model.dtype)


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
) -> Answer:
    """Answers ``question`` about ``context`` with the method of ``config`` (default: ParallelComp)."""
    config = check_config(ParallelCompConfig() if config is None else config)
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
    config = check_config(config)
    check_max_new_tokens(max_new_tokens)
    timings = {} if timings is None else timings
    t = time.perf_counter()
    method = get_method(config.method)
    rules = calibration_rules(config, model.config.num_layers)
    context_tokens = len(parts.context)
    parts = method.fit(parts, model.config.window, max_new_tokens)
    if method.plain_row:
        gen = generate_ids(model, np.concatenate([parts.prefix, parts.context, parts.question]), max_new_tokens)
        timings["generate"] = time.perf_counter() - t
        return Answer(gen.text, gen.token_ids, [], [], timings, config.method, context_tokens, 1)
    pre = prefill_context(model, parts, config, stage_rules(rules, "chunk"), progress, method)
    timings["prefill"] = timings.get("prefill", 0.0) + time.perf_counter() - t
    gen = answer_from_prefill(model, pre, max_new_tokens, stage_rules(rules, "merged"), timings)
    return Answer(
        text=gen.text, token_ids=gen.token_ids, chunk_scores=pre.chunk_scores, selected_chunks=pre.selected_chunks,
        timings=timings, method=config.method, context_tokens=context_tokens, num_chunks=len(pre.chunk_scores),
    )


@dataclasses.dataclass
class ContextPrefill:
    """Stage 1 done once for an input: what every question-prefill variant starts from.

    selection: the kept chunks (``prefill.ChunkSelection``); prefix_keys/values: P's KV;
    chunk_scores: score of every chunk in document order; weights: the (sharded) weights.
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
    mesh = make_mesh(config.num_devices)
    rows = build_rows(parts, method.chunk_len(config, parts), cfg.window, score_last_tokens=config.score_last_tokens)
    spec = method.prefill_spec(config, chunk_rules)
    rows_per_group(config.group_size, rows.num_chunks, mesh)  # a bad group size is refused before any work
    weights = shard_weights(model.params, mesh)
    prefix_keys, prefix_values = prefill_prefix(weights, cfg, jnp.asarray(parts.prefix))
    top_k = method.kept_chunks(config, rows.num_chunks)
    state, scores = select_chunks(weights, cfg, rows, spec, top_k, mesh, config.group_size, progress)
    return ContextPrefill(parts, state, prefix_keys, prefix_values, [float(s) for s in scores], weights)


def answer_from_prefill(model: Model, pre: ContextPrefill, max_new_tokens: int, merged_rules=(), timings=None):
    """Stage 2 and 3 on a ``ContextPrefill``: merge, question prefill (with stage-1c ``merged``
    rules), greedy decoding. Returns a ``decode.Generation``."""
    return decode_selection(model, pre.weights, pre.prefix_keys, pre.prefix_values, pre.selection,
                            pre.parts.question, max_new_tokens, merged_rules, timings)
