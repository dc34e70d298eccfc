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

The package, by job: ``passes`` (the jitted reading and question passes), ``rows``
(host-side row surgery), ``reading`` (``Document``, ``read_document``, ``read_parts_batch``),
``store`` (save and load) and ``batch`` (``answer_batch``).
"""

from .batch import answer_batch, answer_parts_batch
from .passes import AskedQuestion, ChunkCaches, QuestionPass, kept_selection, question_group, read_group
from .reading import (
    READ_FIELDS,
    Document,
    check_same_devices,
    check_same_reading,
    context_parts,
    document_plan,
    read_document,
    read_parts,
    read_parts_batch,
    reading_refusal,
    reuses_chunk_caches,
)
from .rows import join_rows, narrowed, take_rows
from .store import DOCUMENT_FORMAT, DOCUMENT_RECORD, load_document, save_document

__all__ = [
    "AskedQuestion", "ChunkCaches", "DOCUMENT_FORMAT", "DOCUMENT_RECORD", "Document", "QuestionPass", "READ_FIELDS",
    "answer_batch", "answer_parts_batch", "check_same_devices", "check_same_reading", "context_parts", "document_plan", "join_rows",
    "kept_selection", "load_document", "narrowed", "question_group", "read_document", "read_group", "read_parts",
    "read_parts_batch", "reading_refusal", "reuses_chunk_caches", "save_document", "take_rows",
]
