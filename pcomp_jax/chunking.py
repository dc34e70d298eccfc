"""Stage 1 input: the prompt's parts and the padded chunk rows.

A row is ``P + chunk_i + Q`` (prefix, one chunk of context, question part) with
positions restarting at 0 in every row, padded after its real tokens to a common
length where causality hides the padding. Everything here runs on the host in NumPy;
the arrays it returns have static, bucketed shapes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .buckets import bucket_length
from .errors import InputTooLongError, PcompError

CONTEXT_MARK = "\x00PCOMP_CONTEXT\x00"


@dataclasses.dataclass
class PromptParts:
    """Token ids of the prefix P, the context, and the question part Q (all 1-D int32)."""

    prefix: np.ndarray
    context: np.ndarray
    question: np.ndarray


def encode_parts(
    tokenizer, context: str, question: str, instruction: str, answer_prefix: str, chat: bool, verbatim: bool = False
) -> PromptParts:
    """Splits the full prompt into P, context and Q token ids.

    The user turn is ``instruction``, the context and ``"Question: " + question``, separated
    by blank lines (``verbatim``: the three strings joined as they are, for a benchmark's
    own template). With ``chat`` it goes inside the model's chat template, and Q ends with
    the assistant cue and ``answer_prefix``.
    """
    if not context.strip():
        raise PcompError("the context is empty; give some text to answer the question about")
    if not question.strip():
        raise PcompError("the question is empty")
    if verbatim:
        user = f"{instruction}{CONTEXT_MARK}{question}"
    elif instruction:
        user = f"{instruction}\n\n{CONTEXT_MARK}\n\nQuestion: {question}"
    else:
        user = f"{CONTEXT_MARK}\n\nQuestion: {question}"
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise PcompError("the model has no chat template; set chat: false")
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    else:
        text = user if verbatim else user + "\n"  # a benchmark's template ends where the answer starts
    before, after = text.split(CONTEXT_MARK)
    after = after + answer_prefix
    encode = lambda s, special: np.asarray(tokenizer(s, add_special_tokens=special)["input_ids"], np.int32)
    return PromptParts(prefix=encode(before, not chat), context=encode(context, False), question=encode(after, False))


def chunk_bounds(num_tokens: int, chunk_len: int) -> list[tuple[int, int]]:
    """Splits ``num_tokens`` into ``ceil(n / chunk_len)`` near-equal chunks; returns ``(start, end)`` pairs."""
    if num_tokens < 1:
        raise PcompError("the context has no tokens")
    n = math.ceil(num_tokens / chunk_len)
    base, extra = divmod(num_tokens, n)
    bounds, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclasses.dataclass
class Rows:
    """Padded chunk rows, NumPy, chunk axis first.

    tokens, positions: ``[N, R]``; row_lengths: ``[N]`` (``P + chunk_i + Q``, 0 for padding
    rows); chunk_lengths: ``[N]``; question_targets: ``[N, Qb]`` Q token ids (0-padded);
    question_mask: ``[N, Qb]`` which of them are real and scored; score_at: ``[N, Qb]`` the row
    index whose logits predict each Q token. prefix_len and question_len are ints.
    """

    tokens: np.ndarray
    positions: np.ndarray
    row_lengths: np.ndarray
    chunk_lengths: np.ndarray
    question_targets: np.ndarray
    question_mask: np.ndarray
    score_at: np.ndarray
    prefix_len: int
    question_len: int

    @property
    def num_chunks(self) -> int:
        """Number of real (non-padding) chunk rows."""
        return int((self.chunk_lengths > 0).sum())


def row_length(prefix_len: int, longest_chunk: int, question_bucket: int) -> int:
    """Static row length R: prefix, the longest chunk and the bucketed question, bucketed."""
    return bucket_length(prefix_len + longest_chunk + question_bucket)


def build_rows(
    parts: PromptParts,
    chunk_len: int,
    window: int,
    num_rows: int | None = None,
    score_last_tokens: int | None = None,
) -> Rows:
    """Cuts the context into chunks and lays out one row per chunk.

    num_rows: pad the chunk axis to this many rows (padding rows have no content and
    are never selected); default: the number of chunks.
    Raises ``InputTooLongError`` when P + chunk + Q does not fit in the model's ``window``.
    """
    p, q = len(parts.prefix), len(parts.question)
    bounds = chunk_bounds(len(parts.context), chunk_len)
    longest = max(e - s for s, e in bounds)
    if p + longest + q > window:
        raise InputTooLongError(
            f"a row (prefix {p} + chunk {longest} + question {q} = {p + longest + q} tokens) does not fit in "
            f"the model's window of {window} tokens; lower chunk_len or shorten the question"
        )
    n = len(bounds) if num_rows is None else num_rows
    if n < len(bounds):
        raise ValueError(f"num_rows={n} is fewer than the {len(bounds)} chunks")
    q_bucket = bucket_length(q, minimum=16)
    r = row_length(p, longest, q_bucket)
    tokens = np.zeros((n, r), np.int32)
    positions = np.zeros((n, r), np.int32)
    row_lengths = np.zeros(n, np.int32)
    chunk_lengths = np.zeros(n, np.int32)
    targets = np.zeros((n, q_bucket), np.int32)
    mask = np.zeros((n, q_bucket), bool)
    score_at = np.zeros((n, q_bucket), np.int32)
    scored = np.arange(q_bucket) < q
    if score_last_tokens is not None:
        scored &= np.arange(q_bucket) >= q - score_last_tokens
    for i, (s, e) in enumerate(bounds):
        row = np.concatenate([parts.prefix, parts.context[s:e], parts.question])
        tokens[i, : len(row)] = row
        positions[i, : len(row)] = np.arange(len(row))
        row_lengths[i], chunk_lengths[i] = len(row), e - s
        q_start = p + e - s
        targets[i, :q] = parts.question
        mask[i] = scored
        score_at[i] = np.clip(q_start - 1 + np.arange(q_bucket), 0, r - 1)
    return Rows(tokens, positions, row_lengths, chunk_lengths, targets, mask, score_at, p, q)
