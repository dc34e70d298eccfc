"""Reading a context once (``read_document``, ``read_parts_batch``) and asking it questions
(``Document.ask``): the checks of what a document can reuse, and the ``Document``."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..checkpoints import Model
from ..chunking import PromptParts, check_row_fits, concat_rows, encode_parts, encode_template, question_bucket, \
    row_length, scored_question
from ..config import ConfigError, ParallelCompConfig
from ..decode import check_max_new_tokens
from ..errors import PcompError
from ..merge import ContextCache
from ..methods import Method, WholeInput
from ..pipeline import Answer, ContextPrefill, answer_parts, answer_prefilled
from ..plans import Plan, check_config, method_of, plan
from ..prefill import for_each_group, prefill_prefix, rows_per_group, to_host, top_k_lowest
from ..sharding import rules_for, shard, shard_weights
from .passes import AskedQuestion, ChunkCaches, kept_selection, question_group, read_group
from .rows import join_rows, narrowed, take_rows

# The config fields that shape what ``read_document`` computes; a stored document is
# reused only under a config that agrees on them (the others act when a question is asked).
# Methods may differ if they read alike (``parallelcomp`` and ``pcw`` share the chunk rows).
READ_FIELDS = ("chunk_len", "sentence_chunks", "chunk_overlap", "instruction", "chat", "attention")


def reuses_chunk_caches(method: Method) -> bool:
    """Whether ``method`` reads chunk rows ``P + chunk + Q`` of the whole context (so that a
    document's caches serve every question); one-row methods do not."""
    return not method.plain_row and isinstance(method.fit, WholeInput)


def reading_refusal(plan_: Plan) -> str | None:
    """Why a document cannot reuse its chunk caches under ``plan_`` (one line naming the
    option), or None when it can (or reads no chunk caches at all: one-row methods)."""
    if not reuses_chunk_caches(plan_.method):
        return None
    if plan_.prefill.chunk_rules:
        return ("calibration rules of stage 'chunk' (calibration_preset_stage or a rule's stage) change each chunk's "
                "attention by the question's, so a document's chunk caches cannot be read before the question; use "
                "stage 'merged', or pcomp_jax.answer() per question")
    scorer = plan_.prefill.token_scorer
    if scorer.queries_read() is None:
        return (f"token scorer {type(scorer).__name__} of method {plan_.config.method!r} may read every query of a "
                "row, and a document keeps only the chunks' keys and values; use pcomp_jax.answer()")
    return None


def document_plan(model: Model, config: ParallelCompConfig) -> Plan:
    """``plans.plan(model, config)``, refused (``ConfigError``, ``reading_refusal``) where a
    document cannot reuse its caches."""
    plan_ = plan(model, config)
    refusal = reading_refusal(plan_)
    if refusal is not None:
        raise ConfigError(refusal)
    return plan_


def check_same_reading(stored: ParallelCompConfig, config: ParallelCompConfig, what: str) -> None:
    """Refuses ``config`` when it differs from ``stored`` (the config a document was read
    with) in a field that shapes the reading."""
    diff = [f"{f}={getattr(stored, f)!r} (asked with {getattr(config, f)!r})" for f in READ_FIELDS
            if getattr(stored, f) != getattr(config, f)]
    read, asked = method_of(stored), method_of(config)
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
        plan_ = document_plan(self.model, config)
        check_max_new_tokens(max_new_tokens)
        if isinstance(questions, str) or not all(isinstance(q, str) and q.strip() for q in questions):
            raise PcompError("questions must be a list of non-empty strings")
        if not questions:
            return []
        t = time.perf_counter()
        asked = [self.question_parts(question, config) for question in questions]
        tokenize = (time.perf_counter() - t) / len(asked)
        return self._ask_parts(asked, max_new_tokens, plan_, progress, tokenize)

    def ask_parts(self, asked: list[PromptParts], max_new_tokens: int = 32, config: ParallelCompConfig | None = None,
                  progress: bool = False) -> list[Answer]:
        """``ask_many`` for prompts already split into token ids (e.g. by a benchmark's own
        template, ``longbench.encode_prompt``): each of ``asked`` must have the document's P
        and context (its question part Q is asked); ``[answer_parts(model, parts, config,
        max_new_tokens) for parts in asked]``, reading the context once."""
        config = self.config if config is None else check_config(config)
        check_same_reading(self.config, config, "the document")
        check_same_devices(self.config, config)
        plan_ = document_plan(self.model, config)
        check_max_new_tokens(max_new_tokens)
        for parts in asked:
            refusal = self.question_refusal(parts, plan_)
            if refusal is not None:
                raise PcompError(refusal)
        return self._ask_parts(list(asked), max_new_tokens, plan_, progress, 0.0) if asked else []

    def question_refusal(self, parts: PromptParts, plan_: Plan) -> str | None:
        """Why this document cannot answer the prompt ``parts`` under ``plan_`` (one line), or
        None when ``ask_parts`` can: its P and context must be the document's, its question
        part non-empty, and, where tokens are evicted, at least as long as the queries the
        token scorer reads (a document keeps the chunks' keys and values, not their queries)."""
        same_breaks = (parts.breaks is None) == (self.parts.breaks is None) and (
            parts.breaks is None or np.array_equal(parts.breaks, self.parts.breaks))
        if not (np.array_equal(parts.prefix, self.parts.prefix) and np.array_equal(parts.context, self.parts.context)
                and same_breaks):
            return "a prompt's P or context differs from the document's; read its context with read_parts, or use " \
                   "answer_parts()"
        if len(parts.question) == 0:
            return "a prompt has an empty question part Q"
        if self.groups is None:
            return None
        p, q = len(parts.prefix), len(parts.question)
        longest = max(e - s for s, e in self.bounds)
        spec = plan_.prefill
        capacity = spec.kept_for(plan_.method.chunk_len(plan_.config, parts), row_length(p, longest, question_bucket(q)))
        reads = spec.token_scorer.queries_read()
        if capacity < longest and reads > q + 1:
            return (f"the question part has {q} tokens, but {type(spec.token_scorer).__name__} scores tokens by the "
                    f"row's last {reads} queries (obs_window) and a document has only the question's and the chunk's "
                    f"last token ({q + 1}); lower obs_window (a scorer reading fewer queries) or use answer()")
        return None

    def _ask_parts(self, asked: list[PromptParts], max_new_tokens: int, plan_: Plan, progress: bool,
                   tokenize: float) -> list[Answer]:
        if self.groups is None:  # a one-row method: its row depends on the question
            return [answer_parts(self.model, parts, plan_.config, max_new_tokens, progress, {"tokenize": tokenize})
                    for parts in asked]
        t = time.perf_counter()
        for parts in asked:
            plan_.check_fewest_fit(parts, max_new_tokens)
        prefills = self.score_chunks(asked, plan_, progress)
        share = (time.perf_counter() - t) / len(asked)
        return [answer_prefilled(self.model, plan_, pre, max_new_tokens,
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

    def score_chunks(self, asked: list[PromptParts], plan_: Plan, progress: bool = False) -> list[ContextPrefill]:
        """Stage 1 for the question of each of ``asked`` from the stored caches: a question
        pass per group and question (``question_group``: scores and kept slots, no keys or
        values), then the top-k chunks of each question and their kept tokens gathered from
        the stored rows (``kept_selection``): what ``pipeline.run_stage1`` gives for each."""
        cfg = self.model.config
        config, spec = plan_.config, plan_.prefill
        longest = max(e - s for s, e in self.bounds)
        mesh = plan_.mesh()
        rows_per_group(self.groups[0].chunk_ids.shape[0], self.num_chunks, mesh)  # the stored groups fit the mesh
        top_k = plan_.top_k(self.num_chunks)
        inputs = []
        for parts in asked:
            p, q = len(parts.prefix), len(parts.question)
            check_row_fits(p, longest, q, cfg.window)
            capacity = spec.kept_for(plan_.method.chunk_len(config, parts), row_length(p, longest, question_bucket(q)))
            refusal = self.question_refusal(parts, plan_)
            if refusal is not None:
                raise PcompError(refusal)
            ids, scored = scored_question(parts.question, config.score_last_tokens)
            inputs.append((AskedQuestion(jnp.asarray(ids), jnp.int32(q), jnp.asarray(scored)), capacity))
        passes = [[] for _ in asked]

        def step(group):
            placed = shard(group, mesh)
            done = tuple(question_group(self.weights, cfg, placed, question, spec, capacity,
                                        keeps_all=capacity >= longest)
                         for question, capacity in inputs)
            for kept, new in zip(passes, done):
                kept.append(new)
            return done

        for_each_group(self.groups, step, progress)
        chunk_valid = jnp.asarray(np.concatenate([to_host(g.chunk_lengths) > 0 for g in self.groups]))
        prefills = []
        for parts, (_, capacity), kept in zip(asked, inputs, passes):
            scores = jnp.concatenate([p.scores for p in kept])
            picks, picked_valid = (to_host(x) for x in top_k_lowest(scores, chunk_valid, top_k))
            picks = np.where(picked_valid, picks, 0)  # fewer chunks than top_k: any row, marked invalid
            selection = kept_selection(take_rows(self.groups, picks), take_rows(kept, picks),
                                       jnp.asarray(picked_valid), capacity)
            prefills.append(ContextPrefill(parts, ContextCache(self.prefix_keys, self.prefix_values, selection),
                                           [float(s) for s in to_host(scores)[: self.num_chunks]], self.weights,
                                           self.bounds))
        return prefills

    def save(self, path: str) -> None:
        """Writes the document to the directory ``path`` (must not exist yet): see
        ``document.store.save_document``. Raises ``CheckpointError``."""
        from .store import save_document

        save_document(self, path)


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
        from .store import load_document

        return load_document(model, load, None if config is None else check_config(config), context, host)
    config = check_config(ParallelCompConfig() if config is None else config)
    if context is None:
        raise PcompError("read_document needs the context (or load=, a directory written by Document.save)")
    document_plan(model, config)
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
    plan_ = document_plan(model, config)
    inputs = [dataclasses.replace(parts, question=np.zeros(0, np.int32)) for parts in inputs]
    bounds = [plan_.chunk_bounds(parts) for parts in inputs]
    if not reuses_chunk_caches(plan_.method):
        return [Document(model, config, parts, None, None, None, b, model.params, host)
                for parts, b in zip(inputs, bounds)]
    if len({parts.prefix.tobytes() for parts in inputs}) > 1:  # the rows of one reading share P
        return [read_parts(model, parts, config, progress, host) for parts in inputs]
    if not inputs:
        return []
    cfg = model.config
    mesh = plan_.mesh()
    own = [plan_.rows(parts) for parts in inputs]
    sizes = [rows_per_group(config.group_size, rows.num_chunks, mesh) for rows in own]
    size = rows_per_group(config.group_size, sum(rows.num_chunks for rows in own), mesh)
    whole = [rows.num_chunks // size * size if s == size else 0 for rows, s in zip(own, sizes)]
    rows = concat_rows([r.slice(0, w) for r, w in zip(own, whole)] + [r.slice(w, None) for r, w in zip(own, whole)])
    weights = shard_weights(model.params, mesh, rules_for(cfg, mesh))
    spec = plan_.prefill
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
