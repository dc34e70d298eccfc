"""Many (context, question) requests at once: each distinct context read once, stage 2 and
decoding as one batch."""

from __future__ import annotations

import time


from ..checkpoints import Model
from ..chunking import encode_parts
from ..config import ParallelCompConfig
from ..decode import check_max_new_tokens
from ..errors import PcompError
from ..pipeline import Answer, answer, answer_of, run_stage1_batch, run_stage2_batch
from ..plans import check_config
from .reading import context_parts, document_plan, read_parts_batch, reuses_chunk_caches


def answer_batch(
    model: Model,
    inputs,
    config: ParallelCompConfig | None = None,
    max_new_tokens: int = 32,
    progress: bool = False,
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
    each answer's ``timings`` has its own stage 1 and its share of the batch's stage 2."""
    config = check_config(ParallelCompConfig() if config is None else config)
    check_max_new_tokens(max_new_tokens)
    pairs = list(inputs)
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise PcompError("answer_batch takes a list of (context, question) pairs of strings")
    if model.tokenizer is None:
        raise PcompError(f"{model.source!r} has no tokenizer; answer_batch() needs one to read text")
    plan_ = document_plan(model, config)
    if not reuses_chunk_caches(plan_.method):  # one-row methods: their row depends on the question
        return [answer(model, context, question, config, max_new_tokens, progress) for context, question in pairs]
    by_context: dict[str, list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        by_context.setdefault(context, []).append(i)
    prefilled: dict[int, tuple] = {}  # request -> (ContextPrefill, its timings, context tokens)
    singles = [where[0] for where in by_context.values() if len(where) == 1]
    t = time.perf_counter()
    fitted = []
    for i in singles:  # one question: P + chunk + Q once (a document would run Q again)
        parts = encode_parts(model.tokenizer, pairs[i][0], pairs[i][1], config.instruction, config.answer_prefix,
                             config.chat)
        fitted.append(plan_.fit(parts, max_new_tokens))
        plan_.check_fewest_fit(fitted[-1], max_new_tokens)
    if singles:
        pres = run_stage1_batch(model, plan_, fitted, progress)
        share = (time.perf_counter() - t) / len(singles)
        for i, pre in zip(singles, pres):
            prefilled[i] = (pre, {"prefill": share}, len(pre.parts.context))  # the fit keeps the whole context
    shared = {c: where for c, where in by_context.items() if len(where) > 1}
    docs = read_parts_batch(model, [context_parts(model, c, config) for c in shared], config, progress)
    for doc, where in zip(docs, shared.values()):
        t = time.perf_counter()
        asked = [doc.question_parts(pairs[i][1], config) for i in where]
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
    answers: list[Answer | None] = [None] * len(pairs)
    for i, gen in zip(order, gens):
        pre, timings, context_tokens = prefilled[i]
        timings.update({name: seconds / len(order) for name, seconds in batch_timings.items()})
        answers[i] = answer_of(plan_, pre, gen, timings, context_tokens)
    return answers
