"""Many (context, question) requests at once: each distinct context read once."""

from __future__ import annotations

from ..checkpoints import Model
from ..config import ParallelCompConfig
from ..errors import PcompError
from ..pipeline import Answer, answer
from ..plans import check_config
from .reading import context_parts, document_plan, read_parts_batch


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
    document_plan(model, config)
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
