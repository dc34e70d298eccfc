"""Many (context, question) requests at once: each distinct context read once, stage 2 and
decoding as one batch."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..checkpoints import Model
from ..chunking import PromptParts, encode_parts
from ..config import ParallelCompConfig
from ..decode import check_max_new_tokens
from ..errors import PcompError
from ..pipeline import Answer, answer_of, answer_parts, run_stage1_batch, run_stage2_batch
from ..plans import check_config
from .reading import document_plan, read_parts_batch, reuses_chunk_caches


def answer_batch(
    model: Model,
    inputs,
    config: ParallelCompConfig | None = None,
    max_new_tokens: int = 32,
    progress: bool = False,
    batch_size: int | None = None,
) -> list[Answer]:
    """``[answer(model, context, question, config, max_new_tokens) for context, question in
    inputs]`` (the same tokens and selections, chunk scores to float rounding), with stage 2
    and decoding run as one batch over all the requests (``pipeline.run_stage2_batch``)
    and each distinct context read once.

    Stage 1 per request: a context asked one question runs ``pipeline.run_stage1`` on P +
    chunk + Q (reading it as a document and then running the question on every chunk's
    cache costs more); a context asked several questions is read as a ``Document``: the
    chunk rows of all such contexts run through shared groups of one compiled
    ``read_group`` (``read_parts_batch``), and each of its questions selects among its own
    chunks (``Document.score_chunks``). Then every request's kept chunks go into one batched
    question prefill and one decoding loop. One-row methods answer one by one.
    inputs: ``(context, question)`` pairs. Answers come back in the order of ``inputs``;
    each answer's ``timings`` has its own stage 1 and its share of the batch's stage 2.
    batch_size: at most this many requests at once (memory grows with it: every request's
    kept chunk caches are held until the batch's stage 2, ``memory.estimate_batch_memory``);
    None: all of them. The questions of one context go into the same batch where they fit."""
    config = check_config(ParallelCompConfig() if config is None else config)
    pairs = list(inputs)
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise PcompError("answer_batch takes a list of (context, question) pairs of strings")
    if model.tokenizer is None:
        raise PcompError(f"{model.source!r} has no tokenizer; answer_batch() needs one to read text")
    parts = [encode_parts(model.tokenizer, context, question, config.instruction, config.answer_prefix, config.chat)
             for context, question in pairs]
    return answer_parts_batch(model, parts, config, max_new_tokens, progress, batch_size)


def answer_parts_batch(
    model: Model,
    inputs: list[PromptParts],
    config: ParallelCompConfig | None = None,
    max_new_tokens: int = 32,
    progress: bool = False,
    batch_size: int | None = None,
) -> list[Answer]:
    """``answer_batch`` for prompts already split into token ids (``chunking.PromptParts``,
    e.g. ``longbench.encode_prompt``'s): ``[answer_parts(model, parts, config,
    max_new_tokens) for parts in inputs]`` with stage 2 and decoding as one batch. Prompts
    with the same P and context (token for token) share one reading of it (a ``Document``).
    batch_size: as in ``answer_batch``."""
    config = check_config(ParallelCompConfig() if config is None else config)
    check_max_new_tokens(max_new_tokens)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise PcompError(f"batch_size must be a whole number >= 1 or None (all at once), got {batch_size!r}")
    inputs = list(inputs)
    if batch_size is not None and len(inputs) > batch_size:
        answers: list[Answer | None] = [None] * len(inputs)
        with tqdm(total=len(inputs), desc="requests answered", unit="request", disable=not progress) as bar:
            for batch in request_batches(inputs, batch_size):
                for i, answer_ in zip(batch, answer_parts_batch(model, [inputs[i] for i in batch], config,
                                                                max_new_tokens, progress)):
                    answers[i] = answer_
                bar.update(len(batch))  # its tokens are on the host: finished
        return answers
    plan_ = document_plan(model, config)
    if not reuses_chunk_caches(plan_.method):  # one-row methods: their row depends on the question
        return [answer_parts(model, parts, config, max_new_tokens, progress) for parts in inputs]
    by_context: dict[bytes, list[int]] = {}
    for i, parts in enumerate(inputs):
        by_context.setdefault(context_key(parts), []).append(i)
    prefilled: dict[int, tuple] = {}  # request -> (ContextPrefill, its timings, context tokens)
    singles = [where[0] for where in by_context.values() if len(where) == 1]
    t = time.perf_counter()
    fitted = []
    for i in singles:  # one question: P + chunk + Q once (a document would run Q again)
        fitted.append(plan_.fit(inputs[i], max_new_tokens))
        plan_.check_fewest_fit(fitted[-1], max_new_tokens)
    if singles:
        pres = run_stage1_batch(model, plan_, fitted, progress)
        share = (time.perf_counter() - t) / len(singles)
        for i, pre in zip(singles, pres):
            prefilled[i] = (pre, {"prefill": share}, len(inputs[i].context))
    shared = [where for where in by_context.values() if len(where) > 1]
    docs = read_parts_batch(model, [inputs[where[0]] for where in shared], config, progress)
    for doc, where in zip(docs, shared):
        t = time.perf_counter()
        asked = [inputs[i] for i in where]
        for parts in asked:
            refusal = doc.question_refusal(parts, plan_)
            if refusal is not None:
                raise PcompError(refusal)
            plan_.check_fewest_fit(parts, max_new_tokens)
        pres = doc.score_chunks(asked, plan_, progress)
        share = (time.perf_counter() - t) / len(where)
        for i, pre in zip(where, pres):
            prefilled[i] = (pre, {"question_scores": share}, len(pre.parts.context))
    order = sorted(prefilled)
    batch_timings: dict = {}
    gens = run_stage2_batch(model, plan_, [prefilled[i][0] for i in order], max_new_tokens, batch_timings)
    answers: list[Answer | None] = [None] * len(inputs)
    for i, gen in zip(order, gens):
        pre, timings, context_tokens = prefilled[i]
        timings.update({name: seconds / len(order) for name, seconds in batch_timings.items()})
        answers[i] = answer_of(plan_, pre, gen, timings, context_tokens)
    return answers


def context_key(parts: PromptParts) -> bytes:
    """Equal for prompts with the same P and context, token for token (one reading serves them)."""
    return parts.prefix.tobytes() + b"|" + parts.context.tobytes()


def request_batches(inputs: list[PromptParts], batch_size: int) -> list[list[int]]:
    """Indices of ``inputs`` in batches of at most ``batch_size``: the requests of one
    context next to each other (in the order their contexts first appear), so that a
    context's questions share a batch (and its reading) unless they are more than fit."""
    by_context: dict[bytes, list[int]] = {}
    for i, parts in enumerate(inputs):
        by_context.setdefault(context_key(parts), []).append(i)
    order = [i for where in by_context.values() for i in where]
    return [order[at : at + batch_size] for at in range(0, len(order), batch_size)]
