"""Reading a document once and asking it many questions.

In a row ``P + chunk + Q`` attention is causal, so the keys and values of ``P + chunk``
never depend on the question. ``read_document`` runs ``P + chunk`` of every chunk through
every layer once (groups of rows sharded over the ``chunk`` mesh axis, as the prefill of
``pipeline.answer``) and keeps each row's full cache; ``Document.ask`` then runs only the
question part Q on top of every chunk's cache (``question_group``): the logits at Q give
the chunk scores, the queries of Q give the SnapKV token scores, and the same compression,
running top-k, merge and decoding as ``answer`` follow. ``doc.ask(q)`` gives what
``answer(model, context, q, config)`` gives (scores to float rounding, the same selection
and tokens).

A document stores each row without the chunk's last token: that token runs again in front
of Q, so its logits predict Q's first token (the chunk score needs them) without storing
a hidden state.

What cannot reuse the chunk caches:
  * calibration rules of stage ``chunk`` change each chunk's own attention by what the
    question's last queries attend to: refused at ``read_document`` (``ConfigError``);
  * a token scorer that reads queries further back than the question (``TokenScorer.
    queries_read``; SnapKV reads ``obs_window``) while it evicts: refused (the document
    keeps keys and values, not the chunks' queries);
  * one-row methods (``full``, ``truncate``, and the baselines ``snapkv`` and
    ``streaming``, whose input is cut to fit next to the question): the document keeps
    only the tokens and ``ask`` runs ``answer``'s one-row path on them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .axes import axes_field, axis_positions, static_field
from .cache import write_layer
from .checkpoints import Model
from .chunking import PromptParts, check_row_fits, concat_rows, encode_parts, encode_template, question_bucket, \
    row_length, scored_question
from .config import ConfigError, ParallelCompConfig, from_dict, to_dict
from .decode import check_max_new_tokens
from .errors import CheckpointError, PcompError
from .integrity import atomic_directory, file_checksums, record_digest, verify_checksums, weights_digest
from .methods import Method, WholeInput, get_method
from .model.config import ModelConfig
from .model.llama import Weights, appended_forward, prefill_forward
from .pipeline import (
    Answer,
    ContextPrefill,
    answer,
    answer_parts,
    answer_selection,
    calibration_rules,
    check_config,
    check_config_fits,
    check_fewest_fit,
    context_chunks,
    context_rows,
    merge_layout,
    model_mesh,
    stage_rules,
)
from .prefill import (
    ChunkSelection,
    PrefillSpec,
    chunk_scores,
    chunk_selection,
    content_slots,
    for_each_group,
    kept_slots,
    prefill_prefix,
    rows_per_group,
    to_host,
    top_k_lowest,
)
from .sharding import rules_for, shard, shard_weights

# The config fields that shape what ``read_document`` computes; a stored document is
# reused only under a config that agrees on them (the others act when a question is asked).
# Methods may differ if they read alike (``parallelcomp`` and ``pcw`` share the chunk rows).
READ_FIELDS = ("chunk_len", "sentence_chunks", "chunk_overlap", "instruction", "chat", "attention")


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
                                        attention=spec.attention_fn(weights.embed.dtype))
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


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "capacity", "keeps_all"))
def question_group(weights: Weights, cfg: ModelConfig, caches: ChunkCaches, question: jax.Array,
                   question_len: jax.Array, scored: jax.Array, spec: PrefillSpec, capacity: int,
                   keeps_all: bool) -> QuestionPass:
    """Stage 1 + 1b of G chunk rows from their caches: each chunk's last token and the
    question run on top of its cache (``appended_forward``: the cache is only read,
    positions continue the row).

    question: ``[Qb]`` zero-padded Q ids (real up to ``question_len``); scored: ``[Qb]`` the
    tokens the chunk score averages. The logits at the last chunk token and Q score the
    chunk (``spec.chunk_scorer``); each layer picks the ``capacity`` content tokens it keeps
    by ``spec.token_scorer`` over the whole row (``prefill.kept_slots``), given the queries
    of the tokens run here (the others are zero: ``TokenScorer.queries_read`` must not
    reach them). keeps_all (static): the capacity holds every chunk's tokens, so all are
    kept and no token is scored. The kept keys and values are gathered later, for the
    chosen chunks only (``kept_selection``).
    """
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
        return last + (kept_slots(spec, capacity, q_row, k_row, row_lengths, content),)

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


def take_rows(groups: list, picks: np.ndarray):
    """Rows ``picks`` (numbered across ``groups``, every group the same size) of a list of
    pytrees with a ``chunk`` axis (``ChunkCaches``, ``QuestionPass``), as one such pytree."""
    axes = axis_positions(groups[0], "chunk")
    per = next(x.shape[axis] for x, axis in zip(jax.tree.leaves(groups[0]), jax.tree.leaves(axes)))
    rows = [jax.tree.map(lambda x, axis: x[(slice(None),) * axis + (slice(r % per, r % per + 1),)],
                         groups[r // per], axes) for r in picks]
    xp = np if isinstance(jax.tree.leaves(groups[0])[0], np.ndarray) else jnp
    if xp is jnp:
        # Wait for the programs that made the rows (sharded, with collectives) before the eager
        # concatenate dispatches its own: on the CPU two programs with collectives in flight at
        # once can deadlock (each device's thread joins another program's all-reduce first).
        jax.block_until_ready(rows)
    return jax.tree.map(lambda axis, *xs: xp.concatenate(xs, axis=axis), axes, *rows)


def reuses_chunk_caches(method: Method) -> bool:
    """Whether ``method`` reads chunk rows ``P + chunk + Q`` of the whole context (so that a
    document's caches serve every question); one-row methods do not."""
    return not method.plain_row and isinstance(method.fit, WholeInput)


def check_document_config(model: Model, config: ParallelCompConfig) -> None:
    """Refuses, with one line naming the option, what a document cannot reuse its caches for."""
    check_config_fits(model, config)
    method = get_method(config.method)
    if not reuses_chunk_caches(method):
        return
    rules = calibration_rules(config, model.config.num_layers)
    if stage_rules(rules, "chunk"):
        raise ConfigError("calibration rules of stage 'chunk' (calibration_preset_stage or a rule's stage) change "
                          "each chunk's attention by the question's, so a document's chunk caches cannot be read "
                          "before the question; use stage 'merged', or pcomp_jax.answer() per question")
    scorer = method.prefill_spec(config).token_scorer
    if scorer.queries_read() is None:
        raise ConfigError(f"token scorer {type(scorer).__name__} of method {config.method!r} may read every query "
                          "of a row, and a document keeps only the chunks' keys and values; use pcomp_jax.answer()")


def check_same_reading(stored: ParallelCompConfig, config: ParallelCompConfig, what: str) -> None:
    """Refuses ``config`` when it differs from ``stored`` in a field that shapes the reading."""
    diff = [f"{f}={getattr(stored, f)!r} (asked with {getattr(config, f)!r})" for f in READ_FIELDS
            if getattr(stored, f) != getattr(config, f)]
    read, asked = get_method(stored.method), get_method(config.method)
    if (reuses_chunk_caches(read), read.chunked) != (reuses_chunk_caches(asked), asked.chunked):
        diff.append(f"method={stored.method!r} (asked with {config.method!r}, which reads the context otherwise)")
    if diff:
        raise ConfigError(f"{what} was read with {', '.join(diff)}; read the document again with this config")


def check_same_devices(stored: ParallelCompConfig, config: ParallelCompConfig) -> None:
    """Refuses asking on other devices than the document's caches and weights are placed on."""
    diff = [f"{f}={getattr(stored, f)!r} (asked with {getattr(config, f)!r})" for f in ("num_devices", "model_parallel")
            if getattr(stored, f) != getattr(config, f)]
    if diff:
        raise ConfigError(f"the document was placed with {', '.join(diff)}; ask with the same, or save it and "
                          "load it with the new config")


@dataclasses.dataclass
class Document:
    """A context read once (``read_document``); ``ask`` answers questions about it.

    parts: P and the context's token ids and breaks (no question); config: the config it
    was read with; groups: the chunk rows' caches per group (``ChunkCaches``), or None for
    a one-row method (its questions re-read the tokens); prefix_keys/values: P's cache
    ``[L, P, KVH, D]``; bounds: every chunk's ``(start, end)``; weights: the sharded weights.
    """

    model: Model
    config: ParallelCompConfig
    parts: PromptParts
    groups: list[ChunkCaches] | None
    prefix_keys: object
    prefix_values: object
    bounds: list[tuple[int, int]]
    weights: object
    host: bool = False

    @property
    def num_chunks(self) -> int:
        return len(self.bounds)

    def ask(self, question: str, max_new_tokens: int = 32, config: ParallelCompConfig | None = None,
            progress: bool = False) -> Answer:
        """Answers ``question`` about the document: the same ``Answer`` as
        ``pcomp_jax.answer(model, context, question, config, max_new_tokens)``.

        config: the document's (default), or one that differs only in what acts after the
        reading (top_k_chunks, capacity, obs_window, merge_layout, evictions, merged-stage
        calibration, ...; not ``READ_FIELDS``)."""
        if not isinstance(question, str):
            raise PcompError(f"the question must be a string, got {type(question).__name__}")
        return self.ask_many([question], max_new_tokens, config, progress)[0]

    def ask_many(self, questions, max_new_tokens: int = 32, config: ParallelCompConfig | None = None,
                 progress: bool = False) -> list[Answer]:
        """``[doc.ask(q, max_new_tokens, config) for q in questions]``, with each group of chunk
        caches placed on the devices once for all the questions (a document kept on the
        host moves each group once, not once per question). Each answer's
        ``timings["question_scores"]`` is its share of the shared scoring time."""
        config = self.config if config is None else check_config(config)
        check_same_reading(self.config, config, "the document")
        check_same_devices(self.config, config)
        check_document_config(self.model, config)
        check_max_new_tokens(max_new_tokens)
        if isinstance(questions, str) or not all(isinstance(q, str) and q.strip() for q in questions):
            raise PcompError("questions must be a list of non-empty strings")
        if not questions:
            return []
        t = time.perf_counter()
        asked = [self.question_parts(question, config) for question in questions]
        tokenize = (time.perf_counter() - t) / len(asked)
        return self._ask_parts(asked, max_new_tokens, config, progress, tokenize)

    def ask_parts(self, asked: list[PromptParts], max_new_tokens: int = 32, config: ParallelCompConfig | None = None,
                  progress: bool = False) -> list[Answer]:
        """``ask_many`` for prompts already split into token ids (e.g. by a benchmark's own
        template, ``longbench.encode_prompt``): each of ``asked`` must have the document's P
        and context (its question part Q is asked); ``[answer_parts(model, parts, config,
        max_new_tokens) for parts in asked]``, reading the context once."""
        config = self.config if config is None else check_config(config)
        check_same_reading(self.config, config, "the document")
        check_same_devices(self.config, config)
        check_document_config(self.model, config)
        check_max_new_tokens(max_new_tokens)
        for parts in asked:
            same_breaks = (parts.breaks is None) == (self.parts.breaks is None) and (
                parts.breaks is None or np.array_equal(parts.breaks, self.parts.breaks))
            if not (np.array_equal(parts.prefix, self.parts.prefix) and np.array_equal(parts.context, self.parts.context)
                    and same_breaks):
                raise PcompError("a prompt's P or context differs from the document's; read its context with "
                                 "read_parts, or use answer_parts()")
            if len(parts.question) == 0:
                raise PcompError("a prompt has an empty question part Q")
        return self._ask_parts(list(asked), max_new_tokens, config, progress, 0.0) if asked else []

    def _ask_parts(self, asked: list[PromptParts], max_new_tokens: int, config: ParallelCompConfig, progress: bool,
                   tokenize: float) -> list[Answer]:
        if self.groups is None:  # a one-row method: its row depends on the question
            return [answer_parts(self.model, parts, config, max_new_tokens, progress, {"tokenize": tokenize})
                    for parts in asked]
        method = get_method(config.method)
        layout = merge_layout(self.model, config)
        t = time.perf_counter()
        for parts in asked:
            check_fewest_fit(self.model, parts, config, method, layout, max_new_tokens)
        prefills = self.score_chunks(asked, config, method, progress)
        share = (time.perf_counter() - t) / len(asked)
        return [answer_selection(self.model, pre, config, max_new_tokens,
                                 {"tokenize": tokenize, "question_scores": share}, len(pre.parts.context))
                for pre in prefills]

    def question_parts(self, question: str, config: ParallelCompConfig) -> PromptParts:
        """The document's P and context with ``question``'s part Q, encoded as ``answer``
        encodes it; refused when the template puts question-dependent text in P."""
        prefix, question_ids = encode_template(self.model.tokenizer, question, config.instruction,
                                               config.answer_prefix, config.chat)
        if not np.array_equal(prefix, self.parts.prefix):
            raise PcompError("the prompt prefix P differs for this question (the chat template puts question-"
                             "dependent text before the context), so the document's caches do not apply; "
                             "use pcomp_jax.answer()")
        return dataclasses.replace(self.parts, question=question_ids)

    def score_chunks(self, asked: list[PromptParts], config: ParallelCompConfig, method: Method,
                     progress: bool = False) -> list[ContextPrefill]:
        """Stage 1 for the question of each of ``asked`` from the stored caches: a question
        pass per group and question (``question_group``: scores and kept slots, no keys or
        values), then the top-k chunks of each question and their kept tokens gathered from
        the stored rows (``kept_selection``): what ``pipeline.prefill_context`` gives for each."""
        cfg = self.model.config
        spec = method.prefill_spec(config)
        longest = max(e - s for s, e in self.bounds)
        mesh = model_mesh(self.model, config)
        rows_per_group(self.groups[0].chunk_ids.shape[0], self.num_chunks, mesh)  # the stored groups fit the mesh
        top_k = method.kept_chunks(config, self.num_chunks)
        inputs = []
        for parts in asked:
            p, q = len(parts.prefix), len(parts.question)
            check_row_fits(p, longest, q, cfg.window)
            capacity = spec.kept_for(method.chunk_len(config, parts), row_length(p, longest, question_bucket(q)))
            reads = spec.token_scorer.queries_read()
            if capacity < longest and reads > q + 1:
                raise PcompError(f"the question part has {q} tokens, but {type(spec.token_scorer).__name__} scores "
                                 f"tokens by the row's last {reads} queries (obs_window) and a document has only "
                                 f"the question's and the chunk's last token ({q + 1}); lower obs_window or use "
                                 "answer()")
            ids, scored = scored_question(parts.question, config.score_last_tokens)
            inputs.append((jnp.asarray(ids), jnp.int32(q), jnp.asarray(scored), capacity))
        passes = [[] for _ in asked]

        def step(group):
            placed = shard(group, mesh)
            done = tuple(question_group(self.weights, cfg, placed, ids, length, scored, spec, capacity,
                                        keeps_all=capacity >= longest)
                         for ids, length, scored, capacity in inputs)
            for kept, new in zip(passes, done):
                kept.append(new)
            return done

        for_each_group(self.groups, step, progress)
        chunk_valid = jnp.asarray(np.concatenate([to_host(g.chunk_lengths) > 0 for g in self.groups]))
        prefills = []
        for parts, (_, _, _, capacity), kept in zip(asked, inputs, passes):
            scores = jnp.concatenate([p.scores for p in kept])
            picks, picked_valid = (to_host(x) for x in top_k_lowest(scores, chunk_valid, top_k))
            picks = np.where(picked_valid, picks, 0)  # fewer chunks than top_k: any row, marked invalid
            selection = kept_selection(take_rows(self.groups, picks), take_rows(kept, picks),
                                       jnp.asarray(picked_valid), capacity)
            prefills.append(ContextPrefill(parts, selection, self.prefix_keys, self.prefix_values,
                                           [float(s) for s in to_host(scores)[: self.num_chunks]], self.weights,
                                           self.bounds))
        return prefills

    def save(self, path: str) -> None:
        """Writes the document to the directory ``path`` (must not exist yet) with orbax: its
        tokens, caches and a record of the model (a digest of every weight), tokenizer and
        reading config, with a SHA-256 checksum of every file and of the record. Written to a
        temporary sibling and renamed: a failed save leaves nothing behind (``CheckpointError``)."""
        import orbax.checkpoint as ocp

        tree = {"prefix": self.parts.prefix, "context": self.parts.context}
        if self.parts.breaks is not None:
            tree["breaks"] = self.parts.breaks
        if self.groups is not None:
            tree["prefix_keys"], tree["prefix_values"] = to_host(self.prefix_keys), to_host(self.prefix_values)
            tree["groups"] = [{f.name: to_host(getattr(g, f.name)) for f in dataclasses.fields(ChunkCaches)
                               if f.name != "prefix_len"} for g in self.groups]
        try:
            with atomic_directory(path) as temporary:
                checkpointer = ocp.StandardCheckpointer()
                checkpointer.save(os.path.join(temporary, "document"), tree)
                checkpointer.wait_until_finished()
                record = {"format": DOCUMENT_FORMAT, "fingerprint": fingerprint(self.model),
                          "config": to_dict(self.config), "has_breaks": self.parts.breaks is not None,
                          "num_groups": None if self.groups is None else len(self.groups),
                          "files": file_checksums(os.path.join(temporary, "document"))}
                record["record_sha256"] = record_digest(record)
                with open(os.path.join(temporary, DOCUMENT_RECORD), "w", encoding="utf-8") as f:
                    json.dump(record, f, indent=1)
        except PcompError:
            raise
        except Exception as err:  # OSError, a full disk, tensorstore's and orbax's own errors
            raise CheckpointError(f"cannot save the document to {os.path.abspath(path)!r}: "
                                  f"{first_line(err)}") from err


DOCUMENT_RECORD = "pcomp_document.json"
DOCUMENT_FORMAT = 2  # the record's layout; 2: weights digest over every parameter, file checksums
RECORD_FIELDS = {"format": int, "fingerprint": dict, "config": dict, "has_breaks": bool, "files": dict,
                 "record_sha256": str}


def first_line(err: BaseException) -> str:
    """An exception's message, first line only (tensorstore's run over many lines)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def fingerprint(model: Model) -> dict:
    """What identifies the model and tokenizer a document was read with (JSON data): the
    model's config, dtype and ``integrity.weights_digest`` (every parameter), and the
    tokenizer's class, size and vocabulary."""
    tok = model.tokenizer
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    return {
        "model": {"config": json.loads(json.dumps(dataclasses.asdict(model.config))),
                  "dtype": jnp.dtype(model.dtype).name, "weights": weights_digest(model)},
        "tokenizer": {"class": type(tok).__name__, "size": len(tok), "vocabulary": vocab},
    }


def check_record(record, path: str) -> dict:
    """``record`` (as read from ``pcomp_document.json``) if it is a whole record of this
    format whose checksum holds; else ``CheckpointError`` naming what is wrong."""
    where = os.path.join(path, DOCUMENT_RECORD)
    if not isinstance(record, dict):
        raise CheckpointError(f"{where} is not a document record (a JSON object); read the document again")
    if record.get("format") != DOCUMENT_FORMAT:
        raise CheckpointError(f"{where} has format {record.get('format')!r}, not {DOCUMENT_FORMAT}: it was written by "
                              "another version of pcomp_jax; read the document again")
    for name, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(name), kind):
            raise CheckpointError(f"{where} lacks a valid {name!r} field; read the document again")
    if not (record.get("num_groups") is None or type(record["num_groups"]) is int):
        raise CheckpointError(f"{where} lacks a valid 'num_groups' field; read the document again")
    if record_digest({k: v for k, v in record.items() if k != "record_sha256"}) != record["record_sha256"]:
        raise CheckpointError(f"{where} does not match its checksum (edited or damaged); read the document again")
    return record


def check_fingerprint(stored: dict, model: Model, path: str) -> None:
    """Refuses a stored document read with another model or tokenizer, naming what differs."""
    now = fingerprint(model)
    for what in ("model", "tokenizer"):
        a, b = stored.get(what), now[what]
        if not isinstance(a, dict) or (what == "model" and not isinstance(a.get("config"), dict)):
            raise CheckpointError(f"{os.path.join(path, DOCUMENT_RECORD)} lacks the {what}'s fingerprint; "
                                  "read the document again")
        a, b = dict(a), dict(b)
        if what == "model":
            a = {**a.pop("config"), **a}
            b = {**b.pop("config"), **b}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise PcompError(f"the document at {path!r} was read with another {what} ({', '.join(diff)} differ); "
                             f"read it again with this {what}")


def read_document(
    model: Model,
    context: str | None = None,
    config: ParallelCompConfig | None = None,
    progress: bool = False,
    host: bool = False,
    load: str | None = None,
) -> Document:
    """Reads ``context`` once for many questions (``Document.ask``) with the method of
    ``config`` (default: ParallelComp): every chunk row ``P + chunk`` through every layer,
    groups of ``config.group_size`` rows sharded over the ``chunk`` mesh axis.

    host: keep the caches in host memory as NumPy (brought to the devices one group at a
    time per question), so that a long document fits next to the model. load: a directory
    written by ``Document.save`` to restore instead of reading (``context`` may then be
    left out; given, it must be the stored one; ``config`` None: the stored one). Raises ``ConfigError`` for what a document
    cannot reuse (module docstring).
    """
    if model.tokenizer is None:
        raise PcompError(f"{model.source!r} has no tokenizer; read_document() needs one to read text")
    if context is not None and not isinstance(context, str):
        raise PcompError("context must be a string")
    if load is not None:
        return load_document(model, load, None if config is None else check_config(config), context, host)
    config = check_config(ParallelCompConfig() if config is None else config)
    if context is None:
        raise PcompError("read_document needs the context (or load=, a directory written by Document.save)")
    check_document_config(model, config)
    return read_parts(model, context_parts(model, context, config), config, progress, host)


def context_parts(model: Model, context: str, config: ParallelCompConfig) -> PromptParts:
    """What ``read_document`` reads of ``context``: P as the template lays it out for any
    question, the context's token ids and breaks (its question part is ignored by the reading)."""
    parts = encode_parts(model.tokenizer, context, "?", config.instruction, config.answer_prefix, config.chat)
    prefix, _ = encode_template(model.tokenizer, "", config.instruction, config.answer_prefix, config.chat)
    return dataclasses.replace(parts, prefix=prefix)


def read_parts(model: Model, parts: PromptParts, config: ParallelCompConfig | None = None, progress: bool = False,
               host: bool = False) -> Document:
    """``read_document`` for a prompt already split into token ids (``chunking.PromptParts``,
    e.g. ``longbench.encode_prompt``'s): reads its P and context (its question part is
    ignored); ``Document.ask_parts`` then asks prompts with the same P and context."""
    return read_parts_batch(model, [parts], config, progress, host)[0]


def read_parts_batch(model: Model, inputs: list[PromptParts], config: ParallelCompConfig | None = None,
                     progress: bool = False, host: bool = False) -> list[Document]:
    """``[read_parts(model, parts, config, progress, host) for parts in inputs]``, with the
    chunk rows ``P + chunk`` of all the inputs run through the same groups of ``read_group``:
    ``ceil(total rows / S)`` calls of one compiled function (S = ``rows_per_group(
    config.group_size, total rows, mesh)``), where reading them one by one would pad every
    input's last group on its own.

    Each input still gets the ``Document`` it would get alone (its own groups of
    ``rows_per_group(config.group_size, its rows, mesh)`` rows, keys and values as wide as
    its own rows; each question then selects among its document's chunks only), so that
    ``ask`` compiles and computes as for a document read alone. For that the rows are laid
    out as every input's whole groups first (each a group of the shared reading, kept as it
    is) and then the rest of each input's rows packed together (``join_rows`` cuts each
    input's last group out of them, padded with empty rows). Rows of unequal length are
    padded to the longest (``chunking.concat_rows``: causality hides the padding) and cut
    back after the reading. Only empty rows differ from a lone reading: their caches are
    zeros, not computed from token 0 (never read: they store no tokens).
    Falls back to one reading per input where sharing does not apply: inputs with another
    P are read one by one; a method that does not reuse chunk caches reads nothing.
    """
    config = check_config(ParallelCompConfig() if config is None else config)
    check_document_config(model, config)
    inputs = [dataclasses.replace(parts, question=np.zeros(0, np.int32)) for parts in inputs]
    method = get_method(config.method)
    bounds = [context_chunks(parts, config, method) for parts in inputs]
    if not reuses_chunk_caches(method):
        return [Document(model, config, parts, None, None, None, b, model.params, host)
                for parts, b in zip(inputs, bounds)]
    if len({parts.prefix.tobytes() for parts in inputs}) > 1:  # the rows of one reading share P
        return [read_parts(model, parts, config, progress, host) for parts in inputs]
    if not inputs:
        return []
    cfg = model.config
    mesh = model_mesh(model, config)
    own = [context_rows(model, parts, config, method) for parts in inputs]
    sizes = [rows_per_group(config.group_size, rows.num_chunks, mesh) for rows in own]
    size = rows_per_group(config.group_size, sum(rows.num_chunks for rows in own), mesh)
    whole = [rows.num_chunks // size * size if s == size else 0 for rows, s in zip(own, sizes)]
    rows = concat_rows([r.slice(0, w) for r, w in zip(own, whole)] + [r.slice(w, None) for r, w in zip(own, whole)])
    weights = shard_weights(model.params, mesh, rules_for(cfg, mesh))
    spec = method.prefill_spec(config)
    prefix_keys, prefix_values = prefill_prefix(weights, cfg, jnp.asarray(inputs[0].prefix))
    read = []
    for group in tqdm(rows.groups(size), desc="reading chunk groups", unit="group", disable=not progress):
        caches = read_group(weights, cfg, shard(group, mesh), spec)
        read.append(jax.tree.map(to_host, caches) if host else caches)
    jax.block_until_ready(read)
    if host:
        prefix_keys, prefix_values = to_host(prefix_keys), to_host(prefix_values)
    place = (lambda caches: caches) if host else (lambda caches: shard(caches, mesh))
    docs, at, rest, total = [], 0, sum(whole), sum(r.num_chunks for r in own)
    for parts, b, r, s, w in zip(inputs, bounds, own, sizes, whole):
        spans = [(g, g + size) for g in range(at, at + w, size)]
        if r.num_chunks > w:
            spans.append((rest, rest + r.num_chunks - w))
        groups = [narrowed(read[lo // size], r.row_len)
                  if s == size and lo % size == 0 and (hi - lo == size or hi == total)  # a group as read
                  else place(join_rows(read, lo, hi, s, r.row_len)) for lo, hi in spans]
        docs.append(Document(model, config, parts, groups, prefix_keys, prefix_values, b, weights, host))
        at, rest = at + w, rest + r.num_chunks - w
    return docs


def narrowed(caches: ChunkCaches, width: int) -> ChunkCaches:
    """``caches`` with keys and values cut to the first ``width`` row slots (unchanged when
    that is all of them)."""
    if caches.keys.shape[2] == width:
        return caches
    return caches.replace(keys=caches.keys[:, :, :width], values=caches.values[:, :, :width])


def join_rows(groups: list[ChunkCaches], start: int, stop: int, size: int, width: int) -> ChunkCaches:
    """Rows ``start .. stop - 1`` of ``groups`` (numbered across them, every group the same
    size) as one group of ``size`` rows, followed by empty ones (zero caches, chunk ids
    continuing theirs), keys and values cut to ``width`` row slots. NumPy for host caches."""
    per = groups[0].chunk_ids.shape[0]
    axes = axis_positions(groups[0], "chunk")
    pieces = []
    for g in range(start // per, (stop - 1) // per + 1):
        lo, hi = max(start - g * per, 0), min(stop - g * per, per)
        cut = lambda x, axis: x[(slice(None),) * axis + (slice(lo, hi),)]
        pieces.append(narrowed(jax.tree.map(cut, groups[g], axes), width))
    first = pieces[0]
    count, next_id = size - (stop - start), int(pieces[-1].chunk_ids[-1]) + 1
    empty = jax.tree.map(lambda x, axis: np.zeros(x.shape[:axis] + (count,) + x.shape[axis + 1:], x.dtype), first, axes)
    pieces.append(empty.replace(chunk_ids=np.arange(next_id, next_id + count, dtype=first.chunk_ids.dtype)))
    xp = np if isinstance(first.keys, np.ndarray) else jnp
    return jax.tree.map(lambda axis, *xs: xp.concatenate(xs, axis=axis), axes, *pieces)


def load_document(model: Model, path: str, config: ParallelCompConfig | None, context: str | None,
                  host: bool) -> Document:
    """A document written by ``Document.save``, checked against ``model``, ``config`` (None:
    the stored one) and (when given) ``context``, placed on ``config``'s devices."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory written by Document.save")
    try:
        with open(os.path.join(path, DOCUMENT_RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path!r} is not a document written by Document.save: {first_line(err)}") from err
    record = check_record(record, path)
    try:
        stored_config = from_dict(ParallelCompConfig, record["config"])
    except (PcompError, TypeError, KeyError) as err:
        raise CheckpointError(f"{os.path.join(path, DOCUMENT_RECORD)} holds no valid config: {first_line(err)}") from err
    check_fingerprint(record["fingerprint"], model, path)
    config = stored_config if config is None else config
    check_same_reading(stored_config, config, f"the document at {path!r}")
    check_document_config(model, config)
    verify_checksums(os.path.join(path, "document"), record["files"], f"the document at {path!r}")
    try:
        tree = ocp.StandardCheckpointer().restore(os.path.join(path, "document"))
        tree = jax.tree.map(np.asarray, tree)
    except Exception as err:  # checksums held, so this is an orbax or tensorstore failure of its own
        raise CheckpointError(f"the document at {path!r} cannot be read: {first_line(err)}") from err
    expected = {"prefix", "context"} | ({"breaks"} if record["has_breaks"] else set())
    if record["num_groups"] is not None:
        expected |= {"prefix_keys", "prefix_values", "groups"}
    if set(tree) != expected or len(tree.get("groups", ())) != (record["num_groups"] or 0):
        raise CheckpointError(f"the document at {path!r} does not hold what its record says; read it again")
    breaks = tree.get("breaks") if record["has_breaks"] else None
    parts = PromptParts(tree["prefix"].astype(np.int32), tree["context"].astype(np.int32), np.zeros(0, np.int32),
                        breaks)
    if context is not None:
        given = encode_parts(model.tokenizer, context, "?", config.instruction, config.answer_prefix, config.chat)
        if not np.array_equal(given.context, parts.context):
            raise PcompError(f"the document at {path!r} was read from another context; leave context out or "
                             "read this one with read_document(model, context, config)")
    method = get_method(config.method)
    bounds = context_chunks(parts, config, method)
    if record["num_groups"] is None:
        return Document(model, config, parts, None, None, None, bounds, model.params, host)
    mesh = model_mesh(model, config)
    weights = shard_weights(model.params, mesh, rules_for(model.config, mesh))
    prefix_len = len(parts.prefix)
    groups = [ChunkCaches(**tree["groups"][i], prefix_len=prefix_len) for i in range(record["num_groups"])]
    if not host:
        groups = [shard(g, mesh) for g in groups]
    return Document(model, config, parts, groups, tree["prefix_keys"], tree["prefix_values"], bounds, weights, host)


def answer_batch(
    model: Model,
    inputs,
    config: ParallelCompConfig | None = None,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> list[Answer]:
    """``[answer(model, context, question, config, max_new_tokens) for context, question in
    inputs]`` (the same tokens, selections and chunk scores to float rounding), reading each
    distinct context once. A context asked several questions is read as a ``Document``: the
    chunk rows of all such contexts run through shared groups of one compiled
    ``read_group`` (``read_parts_batch``: a context's partial last group is filled with the
    next contexts' rows), and each context's questions are asked of its own document
    together (``Document.ask_many``), each selecting among its own chunks. A context asked
    one question goes through ``answer`` (reading it as a document and then running the
    question on every chunk's cache costs more than one pass over P + chunk + Q: measured
    0.88x on 8 contexts of 1024 tokens, ``scripts/bench_questions.py``).
    One-row methods read nothing ahead (``ask`` runs ``answer``'s one-row path).
    inputs: ``(context, question)`` pairs. Answers come back in the order of ``inputs``."""
    config = check_config(ParallelCompConfig() if config is None else config)
    pairs = list(inputs)
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise PcompError("answer_batch takes a list of (context, question) pairs of strings")
    if model.tokenizer is None:
        raise PcompError(f"{model.source!r} has no tokenizer; answer_batch() needs one to read text")
    check_document_config(model, config)
    by_context: dict[str, list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        by_context.setdefault(context, []).append(i)
    answers: list[Answer | None] = [None] * len(pairs)
    shared = {c: where for c, where in by_context.items() if len(where) > 1}
    for c, where in by_context.items():
        if len(where) == 1:  # one question: answer() reads P + chunk + Q once, a document would run Q again
            answers[where[0]] = answer(model, c, pairs[where[0]][1], config, max_new_tokens, progress)
    docs = read_parts_batch(model, [context_parts(model, c, config) for c in shared], config, progress)
    for doc, where in zip(docs, shared.values()):
        for i, result in zip(where, doc.ask_many([pairs[i][1] for i in where], max_new_tokens, progress=progress)):
            answers[i] = result
    return answers
