"""One call from (context, question) to an answer: ``answer(model, context, question, config)``.

The config is resolved once into a ``plans.Plan``; its method's fields decide every step.
For a chunked method this runs the stages of docs/algorithm.md in order: fit the input to
the window, chunk (``Plan.rows``), then ``run_stage1``: prefill + score + evict per group
of chunk rows with the chunk axis sharded over the devices and a running top-k
(``prefill.select_chunks``), into a ``ContextPrefill``; then ``run_stage2``: merge, question
prefill on the merged cache and greedy decoding (``merge.generate_from_context``), or the
kept chunks read again as one row (``reprefill``). A one-row method without compression
generates with plain full attention. ``run_plan`` is that path for any stage-2 task
(``Decode`` here, ``perplexity.ScoreContinuation``); ``Document.ask`` runs its own stage 1
from the stored chunk caches, then the same ``run_stage2``.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm.auto import tqdm

import jax.numpy as jnp

from .checkpoints import Model
from .chunking import PromptParts, encode_parts
from .config import ConfigError, ParallelCompConfig
from .decode import Generation, check_max_new_tokens, generate_ids
from .errors import PcompError
from .merge import ContextCache, batches, generate_batch, generate_from_context
from .plans import Plan, check_config, one_row_ids, plan
from .chunking import concat_rows
from .prefill import (
    ChunkArrangement,
    empty_selection,
    keep_best_chunks,
    prefill_group,
    prefill_prefix,
    rows_per_group,
    select_chunks,
    to_host,
)
from .sharding import rules_for, shard, shard_weights


@dataclasses.dataclass
class Answer:
    """What ``answer`` returns.

    chunk_scores: score of every chunk in document order (empty for one-row methods without
    compression); selected_chunks: indices of the kept chunks stage 2 read, in document order
    (``chunk_score_margin`` may leave some of the top k unread); timings: seconds per stage;
    context_tokens: size of the context; num_chunks: chunks it was cut into.
    """

    text: str
    token_ids: list[int]
    chunk_scores: list[float]
    selected_chunks: list[int]
    timings: dict[str, float]
    method: str
    context_tokens: int
    num_chunks: int


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
    1's result is kept under ``Plan.stage1_key``: configs that differ only after the chunk
    prefill (merge layout, merged-stage calibration, evictions after the merge) then share
    one chunk prefill."""
    check_max_new_tokens(max_new_tokens)
    timings = {} if timings is None else timings
    plan_ = plan(model, config)
    gen, pre = run_plan(model, plan_, parts, Decode(max_new_tokens), progress, prefills, timings)
    if pre is None:
        return Answer(gen.text, gen.token_ids, [], [], timings, plan_.config.method, len(parts.context), 1)
    return answer_of(plan_, pre, gen, timings, len(parts.context))


@dataclasses.dataclass(frozen=True)
class Decode:
    """What stage 2 ends in for ``answer``: the question, then greedy decoding of up to
    ``max_new_tokens`` (``room``: the new tokens the window must hold). A stage-2 task has
    ``room``, ``on_row(model, ids)`` (one full-attention row: plain-row methods and
    ``reprefill``) and ``on_merged(model, plan, prefilled, timings)`` (the merged cache);
    ``perplexity.ScoreContinuation`` is the other one."""

    max_new_tokens: int

    @property
    def room(self) -> int:
        return self.max_new_tokens

    def on_row(self, model: Model, ids) -> Generation:
        return generate_ids(model, ids, self.max_new_tokens)

    def on_merged(self, model: Model, plan_: Plan, pre: "ContextPrefill", timings: dict) -> Generation:
        return generate_from_context(model, pre.weights, pre.context, pre.parts.question, plan_.merge,
                                     self.max_new_tokens, timings)


def run_plan(model: Model, plan_: Plan, parts: PromptParts, task, progress: bool = False,
             prefills: dict | None = None, timings: dict | None = None):
    """The one path from a prompt to ``task``'s result (``Decode``, ``perplexity.ScoreContinuation``):
    ``parts`` fitted to the window; a plain-row method's one row (``task.on_row``); else
    stage 1 (``run_stage1``; kept in ``prefills`` under ``Plan.stage1_key`` when given) and
    stage 2 (``run_stage2``). Returns ``(result, prefilled)``, ``prefilled`` None for a
    plain-row method. ``timings`` gets the seconds of each step."""
    timings = {} if timings is None else timings
    t = time.perf_counter()
    parts = plan_.fit(parts, task.room)
    if plan_.plain_row:
        result = task.on_row(model, one_row_ids(plan_, parts))
        timings["generate"] = time.perf_counter() - t
        return result, None
    plan_.check_fewest_fit(parts, task.room)
    key = (plan_.stage1_key, len(parts.context))  # a fit that cuts the context (by the room) reads other tokens
    if prefills is not None and key in prefills:
        pre = prefills[key]
    else:
        pre = run_stage1(model, plan_, parts, progress)
        if prefills is not None:
            prefills[key] = pre
    timings["prefill"] = timings.get("prefill", 0.0) + time.perf_counter() - t
    return run_stage2(model, plan_, pre, task, timings), pre


def answer_prefilled(model: Model, plan_: Plan, pre: "ContextPrefill", max_new_tokens: int, timings: dict,
                     context_tokens: int) -> Answer:
    """The ``Answer`` of stages 2 and 3 (``run_stage2`` with ``Decode``) on a done stage 1 (``pre``)."""
    return answer_of(plan_, pre, run_stage2(model, plan_, pre, Decode(max_new_tokens), timings), timings,
                     context_tokens)


def answer_of(plan_: Plan, pre: "ContextPrefill", gen: Generation, timings: dict, context_tokens: int) -> Answer:
    """The ``Answer`` of a chunked method: the generation and what stage 1 kept."""
    return Answer(
        text=gen.text, token_ids=gen.token_ids, chunk_scores=pre.chunk_scores,
        selected_chunks=pre.read_chunks(plan_.merge.arrangement),
        timings=timings, method=plan_.config.method, context_tokens=context_tokens, num_chunks=len(pre.chunk_scores),
    )


@dataclasses.dataclass
class ContextPrefill:
    """Stage 1 done once for an input: what every question-prefill variant starts from.

    parts: the prompt as fitted; context: P's cache and the kept chunks (``merge.ContextCache``);
    chunk_scores: score of every chunk in document order; weights: the (sharded) weights;
    bounds: every chunk's ``(start, end)`` in the context.
    """

    parts: PromptParts
    context: ContextCache
    chunk_scores: list[float]
    weights: object
    bounds: list[tuple[int, int]]

    @property
    def selected_chunks(self) -> list[int]:
        """Indices of the top-k chunks stage 1 kept, in document order."""
        selection = self.context.selection
        ids = to_host(selection.chunk_ids)[to_host(selection.chunk_valid)]
        return sorted(int(c) for c in ids)

    def read_chunks(self, arrangement: ChunkArrangement = ChunkArrangement()) -> list[int]:
        """Indices of the kept chunks stage 2 reads under ``arrangement``, in document order."""
        return sorted(arrangement.read_chunks(self.context.selection))

    def kept_bounds(self, arrangement: ChunkArrangement = ChunkArrangement()) -> list[tuple[int, int]]:
        """``(start, end)`` of the kept chunks stage 2 reads under ``arrangement`` (default:
        all top-k), in its laying order."""
        return [self.bounds[c] for c in arrangement.read_chunks(self.context.selection)]

    def kept_lengths(self, arrangement: ChunkArrangement = ChunkArrangement()) -> list[int]:
        """Token counts of the kept chunks stage 2 reads under ``arrangement``, in laying order."""
        return [e - s for s, e in self.kept_bounds(arrangement)]


def run_stage1(model: Model, plan_: Plan, parts: PromptParts, progress: bool = False) -> ContextPrefill:
    """Stage 1 (+1b, and stage-1c ``chunk`` rules) of ``plan_`` on ``parts`` as fitted to the
    window (``Plan.fit``): P's cache, then the chunk rows through the sharded prefill in
    groups, with a running top-k."""
    if plan_.plain_row:
        raise ConfigError(f"method {plan_.method.name!r} reads one plain row; it has no chunk prefill")
    cfg = model.config
    mesh = plan_.mesh()
    rows = plan_.rows(parts)
    rows_per_group(plan_.config.group_size, rows.num_chunks, mesh)  # a bad group size is refused before any work
    weights = shard_weights(model.params, mesh, rules_for(cfg, mesh))
    prefix_keys, prefix_values = prefill_prefix(weights, cfg, jnp.asarray(parts.prefix))
    selection, scores = select_chunks(weights, cfg, rows, plan_.prefill, plan_.top_k(rows.num_chunks), mesh,
                                      plan_.config.group_size, progress)
    return ContextPrefill(parts, ContextCache(prefix_keys, prefix_values, selection), [float(s) for s in scores],
                          weights, plan_.chunk_bounds(parts))


def run_stage2(model: Model, plan_: Plan, pre: ContextPrefill, task, timings: dict | None = None):
    """Stage 2 of ``plan_`` on a done stage 1, ending in ``task`` (``Decode``,
    ``perplexity.ScoreContinuation``): the kept chunks laid end to end must fit with
    ``task.room`` new tokens (sequential, reprefill); with ``reprefill`` they are read again
    as one row (``task.on_row``), else the question runs on the merged cache
    (``task.on_merged``). ``timings`` gets the seconds of each step."""
    timings = {} if timings is None else timings
    if plan_.merge.arrangement.answers == "each":
        if not isinstance(task, Decode):
            raise ConfigError("chunk_answers=each chooses among the answers of each chunk; scoring a given "
                              "continuation needs chunk_answers=together")
        return answer_each_chunk(model, plan_, pre, task.max_new_tokens, timings)
    bounds = pre.kept_bounds(plan_.merge.arrangement)
    plan_.check_fits(pre.parts, [e - s for s, e in bounds], task.room)
    row = one_row_ids(plan_, pre.parts, bounds)
    if row is not None:
        t = time.perf_counter()
        result = task.on_row(model, row)
        timings["reprefill"] = time.perf_counter() - t
        return result
    return task.on_merged(model, plan_, pre, timings)


def answer_each_chunk(model: Model, plan_: Plan, pre: ContextPrefill, max_new_tokens: int,
                      timings: dict | None = None) -> Generation:
    """Stage 2 for ``chunk_answers: each``: for every chunk the arrangement reads (its
    ``score_margin`` applies), stage 2 on P + that chunk alone + Q under the plan's layout,
    greedy decoding, then the answer's tokens scored on that same cache
    (``perplexity.ScoreContinuation``); returns the answer with the lowest mean NLL per
    token (the most likely; ties: the first in laying order; an empty answer ranks last)."""
    from .perplexity import ScoreContinuation  # perplexity runs its plans through this module

    timings = {} if timings is None else timings
    arrangement = plan_.merge.arrangement
    alone = dataclasses.replace(plan_, merge=dataclasses.replace(
        plan_.merge, arrangement=dataclasses.replace(arrangement, answers="together")))
    best, best_nll = None, np.inf
    for selection in arrangement.each_alone(pre.context.selection):
        one = dataclasses.replace(pre, context=pre.context.replace(selection=selection))
        gen = run_stage2(model, alone, one, Decode(max_new_tokens), timings)
        nll = np.inf
        if gen.token_ids:
            t = time.perf_counter()
            nll = float(np.mean(run_stage2(model, alone, one, ScoreContinuation(np.asarray(gen.token_ids, np.int32)))))
            timings["answer_scoring"] = timings.get("answer_scoring", 0.0) + time.perf_counter() - t
        if best is None or nll < best_nll:
            best, best_nll = gen, nll
    return best


def run_stage2_batch(model: Model, plan_: Plan, prefilled: list[ContextPrefill], max_new_tokens: int,
                     timings: dict | None = None) -> list[Generation]:
    """``[run_stage2(model, plan_, pre, Decode(max_new_tokens)) for pre in prefilled]``, the
    requests' questions prefilled and decoded as one batch (``merge.generate_batch``: each
    request keeps its own kept chunks) where the plan's stage 2 batches
    (``merge.batches``), one by one otherwise (``reprefill``, merged-stage calibration,
    evictions after the merge). ``timings`` gets the batch's seconds."""
    timings = {} if timings is None else timings
    if not batches(plan_.merge):
        return [run_stage2(model, plan_, pre, Decode(max_new_tokens), timings) for pre in prefilled]
    for pre in prefilled:
        plan_.check_fits(pre.parts, pre.kept_lengths(plan_.merge.arrangement), max_new_tokens)
    return generate_batch(model, prefilled[0].weights, [pre.context for pre in prefilled],
                          [pre.parts.question for pre in prefilled], plan_.merge, max_new_tokens, timings)


def run_stage1_batch(model: Model, plan_: Plan, inputs: list[PromptParts], progress: bool = False) -> list[ContextPrefill]:
    """``[run_stage1(model, plan_, parts) for parts in inputs]`` (the same selections, chunk
    scores and caches), with the chunk rows of requests whose rows have the same shapes
    (P, row length, chunk length, question bucket) run through shared groups: a request's
    partial last group is filled with the next requests' rows instead of empty ones. Each
    request keeps its own running top-k over its own rows (the others' are masked out of
    its candidates), so its result does not depend on its neighbours."""
    if plan_.plain_row:
        raise ConfigError(f"method {plan_.method.name!r} reads one plain row; it has no chunk prefill")
    cfg = model.config
    mesh = plan_.mesh()
    weights = shard_weights(model.params, mesh, rules_for(cfg, mesh))
    rows = [plan_.rows(parts) for parts in inputs]
    classes: dict[tuple, list[int]] = {}
    for i, (parts, r) in enumerate(zip(inputs, rows)):
        key = (parts.prefix.tobytes(), r.prefix_len, r.row_len, r.chunk_len, r.question_targets.shape[1])
        classes.setdefault(key, []).append(i)
    prefixes: dict[bytes, tuple] = {}
    results: list[ContextPrefill | None] = [None] * len(inputs)
    bar = tqdm(total=sum(r.num_chunks for r in rows), desc="stage 1 (chunk rows)", unit="row", disable=not progress)
    for members in classes.values():
        joined = concat_rows([rows[i] for i in members])  # equal shapes: nothing is widened
        owner = np.concatenate([np.full(rows[i].num_chunks, j) for j, i in enumerate(members)])
        size = rows_per_group(plan_.config.group_size, joined.num_chunks, mesh)
        top_k = [plan_.top_k(rows[i].num_chunks) for i in members]
        states = [empty_selection(cfg, k, plan_.prefill.kept_tokens(rows[i]), weights.embed.dtype)
                  for k, i in zip(top_k, members)]
        scores: list[list] = [[] for _ in members]
        for g, group in enumerate(joined.groups(size)):
            scored = prefill_group(weights, cfg, shard(group, mesh), plan_.prefill)
            here = np.full(size, -1)
            part = owner[g * size : (g + 1) * size]
            here[: len(part)] = part
            for j in np.unique(part):
                mine = here == j
                candidates = scored.replace(chunk_valid=scored.chunk_valid & jnp.asarray(mine))
                states[j] = keep_best_chunks(states[j], candidates, top_k[j])
                scores[j].append(to_host(scored.scores)[mine])
            bar.update(len(part))
        for j, i in enumerate(members):
            prefix = inputs[i].prefix.tobytes()
            if prefix not in prefixes:
                prefixes[prefix] = prefill_prefix(weights, cfg, jnp.asarray(inputs[i].prefix))
            context = ContextCache(*prefixes[prefix], states[j])
            results[i] = ContextPrefill(inputs[i], context, [float(s) for s in np.concatenate(scores[j])], weights,
                                        plan_.chunk_bounds(inputs[i]))
    bar.close()
    return results
