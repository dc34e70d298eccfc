"""Stage 1 input: the prompt's parts and the padded chunk rows.

A row is ``P + chunk_i + Q`` (prefix, one chunk of context, question part) with
positions restarting at 0 in every row, padded after its real tokens to a common
length where causality hides the padding. Everything here runs on the host in NumPy;
the arrays it returns have static, bucketed shapes.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.struct
import jax
import numpy as np

from .axes import axes_field, static_field
from .buckets import bucket_length
from .errors import InputTooLongError, PcompError

CONTEXT_MARK = "\x00PCOMP_CONTEXT\x00"


SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*\s*$")  # a token ending a sentence (before any space)
NO_BREAK, LINE_END, SENTENCE_BREAK = 0, 1, 2  # what a chunk boundary after a token would cut


@dataclasses.dataclass
class PromptParts:
    """Token ids of the prefix P, the context, and the question part Q (all 1-D int32).

    breaks: optional ``[len(context)]`` int8, what a chunk boundary right after each context
    token would cut (``text_breaks``): ``SENTENCE_BREAK`` (a sentence ends there),
    ``LINE_END``, or ``NO_BREAK``; None: chunks are cut at token counts alone.
    """

    prefix: np.ndarray
    context: np.ndarray
    question: np.ndarray
    breaks: np.ndarray | None = None


def text_breaks(tokenizer, ids) -> np.ndarray:
    """Where a chunk may end in token ids ``[N]``: ``[N]`` int8, ``SENTENCE_BREAK`` after a token
    that ends in ``.``, ``!`` or ``?`` (closing quotes or brackets allowed) followed by
    whitespace (in it or at the start of the next token, or the end of the text), else
    ``LINE_END`` before or after a line break, else ``NO_BREAK``."""
    ids = np.asarray(ids)
    if len(ids) == 0:
        return np.zeros(0, np.int8)
    unique, inverse = np.unique(ids, return_inverse=True)
    texts = tokenizer.batch_decode([[int(i)] for i in unique])
    flag = lambda test: np.array([test(t) for t in texts], bool)[inverse]
    then = lambda starts: np.append(starts[1:], True)  # the next token (the text's end counts as both)
    punct = flag(lambda t: SENTENCE_END.search(t) is not None)
    sentence = punct & (flag(lambda t: t[-1:].isspace()) | then(flag(lambda t: t[:1].isspace())))
    line = flag(lambda t: t.endswith("\n")) | then(flag(lambda t: t.startswith("\n")))
    return np.where(sentence, SENTENCE_BREAK, np.where(line, LINE_END, NO_BREAK)).astype(np.int8)


def encode_parts(
    tokenizer, context: str, question: str, instruction: str, answer_prefix: str, chat: bool, verbatim: bool = False
) -> PromptParts:
    """Splits the full prompt into P, context and Q token ids (with the context's ``breaks``).

    The user turn is ``instruction``, the context and ``"Question: " + question``, separated
    by blank lines (``verbatim``: the three strings joined as they are, for a benchmark's
    own template). With ``chat`` it goes inside the model's chat template, and Q ends with
    the assistant cue and ``answer_prefix``.
    """
    if not context.strip():
        raise PcompError("the context is empty; give some text to answer the question about")
    if not question.strip():
        raise PcompError("the question is empty")
    prefix, question_ids = encode_template(tokenizer, question, instruction, answer_prefix, chat, verbatim)
    context_ids = np.asarray(tokenizer(context, add_special_tokens=False)["input_ids"], np.int32)
    return PromptParts(prefix=prefix, context=context_ids, question=question_ids,
                       breaks=text_breaks(tokenizer, context_ids))


def encode_template(
    tokenizer, question: str, instruction: str, answer_prefix: str, chat: bool, verbatim: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The prompt around the context, as ``encode_parts`` lays it out: ``(prefix P [P],
    question part Q [Q])`` token ids (int32). P is what the template puts before the context
    (it does not depend on the question unless the chat template puts the question there)."""
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
    return encode(before, not chat), encode(after, False)


def chunk_bounds(num_tokens: int, chunk_len: int, breaks: np.ndarray | None = None,
                 overlap: int = 0) -> list[tuple[int, int]]:
    """Chunks of a context of ``num_tokens`` tokens, as ``(start, end)`` pairs in order.

    Without ``breaks`` (or where the text has none): ``ceil(n / chunk_len)`` near-equal
    chunks cut at token counts.
    With ``breaks`` (``text_breaks``): the same near-equal targets, each boundary moved to the
    sentence end nearest its target that keeps the chunk within ``chunk_len`` tokens, else
    to the nearest line end, else cut at the token count (text with no such end, e.g. one
    long JSON line); one more chunk is used when the last would be too long. So every
    chunk holds at most ``chunk_len`` tokens, and a sentence shorter than ``chunk_len -
    overlap`` never straddles a boundary. overlap: each chunk after the first also repeats
    up to ``overlap`` tokens before its boundary (from the nearest sentence end in them, if
    any), so spans are cut at ``chunk_len - overlap``.
    """
    if num_tokens < 1:
        raise PcompError("the context has no tokens")
    if not 0 <= overlap < chunk_len:
        raise PcompError(f"chunk overlap must be in [0, chunk_len={chunk_len}), got {overlap}")
    span = chunk_len - overlap
    if breaks is None or not np.any(breaks):
        n = math.ceil(num_tokens / span)
        base, extra = divmod(num_tokens, n)
        ends = list(np.cumsum([base + (1 if i < extra else 0) for i in range(n)]))
    else:
        ends = _ends_at_breaks(num_tokens, span, np.asarray(breaks))
    starts = [0]
    for boundary in ends[:-1]:  # each chunk starts after the previous one's start
        starts.append(_overlap_start(int(boundary), overlap, breaks, starts[-1]) if overlap else int(boundary))
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def _ends_at_breaks(num_tokens: int, span: int, breaks: np.ndarray) -> list[int]:
    """Chunk ends of at most ``span`` tokens each, moved to the best break near near-equal targets."""
    count = math.ceil(num_tokens / span)
    while True:
        ends, start = [], 0
        for j in range(count - 1):
            target = start + round((num_tokens - start) / (count - j))
            # A boundary after token i (end = i + 1) keeps the chunk in 1..span tokens and leaves a token.
            window = breaks[start : min(start + span, num_tokens - 1)]
            end = min(target, start + span)
            for kind in (SENTENCE_BREAK, LINE_END):
                candidates = np.flatnonzero(window == kind) + start + 1
                if len(candidates):
                    end = int(candidates[np.argmin(np.abs(candidates - target))])
                    break
            ends.append(end)
            start = end
        if num_tokens - start <= span:
            return ends + [num_tokens]
        count += math.ceil((num_tokens - start - span) / span)  # at least one more chunk


def _overlap_start(boundary: int, overlap: int, breaks: np.ndarray | None, previous_start: int) -> int:
    """Where a chunk starting at ``boundary`` starts with up to ``overlap`` tokens before it
    (and after ``previous_start``): the earliest sentence end in them, else as far back as allowed."""
    first = max(previous_start + 1, boundary - overlap)
    if breaks is not None:
        ends = np.flatnonzero(breaks[first:boundary] == SENTENCE_BREAK) + first + 1
        if len(ends) and ends[0] < boundary:
            return int(ends[0])
    return first


@flax.struct.dataclass
class Rows:
    """Padded chunk rows ``P + chunk_i + Q``, chunk axis first (a pytree; NumPy on the host,
    or device arrays once placed with ``sharding.shard``).

    tokens, positions: ``[N, R]``; row_lengths: ``[N]`` (``P + chunk_i + Q``, 0 for padding
    rows); chunk_lengths: ``[N]``; chunk_ids: ``[N]`` the chunk's index in the document
    (padding rows continue the count and are never selected); question_targets: ``[N, Qb]``
    Q token ids (0-padded); question_mask: ``[N, Qb]`` which of them are real and scored;
    score_at: ``[N, Qb]`` the row index whose logits predict each Q token.
    Static (part of the tree structure, so jit specialises on them): prefix_len, and
    chunk_len, the most context tokens a chunk may hold. The question's length is not
    static (it would compile once per question length): its bucket Qb is the static shape.
    """

    tokens: np.ndarray = axes_field("chunk", "row")
    positions: np.ndarray = axes_field("chunk", "row")
    row_lengths: np.ndarray = axes_field("chunk")
    chunk_lengths: np.ndarray = axes_field("chunk")
    chunk_ids: np.ndarray = axes_field("chunk")
    question_targets: np.ndarray = axes_field("chunk", "question")
    question_mask: np.ndarray = axes_field("chunk", "question")
    score_at: np.ndarray = axes_field("chunk", "question")
    prefix_len: int = static_field()
    chunk_len: int = static_field()

    @property
    def num_chunks(self) -> int:
        """Number of real (non-padding) chunk rows (on the host)."""
        return int((np.asarray(self.chunk_lengths) > 0).sum())

    @property
    def row_len(self) -> int:
        """The static row length R."""
        return self.tokens.shape[1]

    def slice(self, start: int, stop: int) -> "Rows":
        """Rows ``start .. stop - 1`` (every array cut along the chunk axis)."""
        return jax.tree.map(lambda a: a[start:stop], self)

    def padded(self, num_rows: int) -> "Rows":
        """The same rows followed by empty ones up to ``num_rows`` (never selected; their chunk
        ids continue the last row's)."""
        n = self.tokens.shape[0]
        if num_rows < n:
            raise PcompError(f"cannot pad {n} chunk rows to {num_rows}; ask for at least {n}")
        extra = num_rows - n
        grow = lambda a: np.concatenate([np.asarray(a), np.zeros((extra, *a.shape[1:]), a.dtype)])
        rows = jax.tree.map(grow, self)
        first = int(np.asarray(self.chunk_ids)[-1]) + 1 if n else 0
        ids = np.concatenate([np.asarray(self.chunk_ids), np.arange(first, first + extra, dtype=np.int32)])
        return rows.replace(chunk_ids=ids)

    def widened(self, row_len: int) -> "Rows":
        """The same rows padded after their tokens to the static length ``row_len`` (>= R). The
        added slots lie beyond every row's length, where causality hides them from its tokens."""
        extra = row_len - self.row_len
        if extra < 0:
            raise PcompError(f"cannot narrow chunk rows of length {self.row_len} to {row_len}")
        grow = lambda a: np.pad(np.asarray(a), ((0, 0), (0, extra)))
        return self.replace(tokens=grow(self.tokens), positions=grow(self.positions))

    def groups(self, group_size: int) -> list["Rows"]:
        """The rows in groups of exactly ``group_size`` (the last one padded with empty rows)."""
        if group_size < 1:
            raise PcompError(f"group_size must be >= 1, got {group_size}")
        n = self.tokens.shape[0]
        rows = self.padded(group_size * math.ceil(n / group_size))
        return [rows.slice(g, g + group_size) for g in range(0, rows.tokens.shape[0], group_size)]


def concat_rows(rows: list[Rows]) -> Rows:
    """The rows of several inputs one after another along the chunk axis (e.g. to run them
    through the same groups), each widened to the longest row length (``Rows.widened``).
    They must share P (``prefix_len``) and the question bucket Qb; chunk_len is the largest,
    and each row keeps its own chunk id (its index in its own input)."""
    if len({r.prefix_len for r in rows}) != 1 or len({r.question_targets.shape[1] for r in rows}) != 1:
        raise PcompError("only chunk rows with the same prefix P and question bucket can be joined")
    width, chunk_len = max(r.row_len for r in rows), max(r.chunk_len for r in rows)
    rows = [r.widened(width).replace(chunk_len=chunk_len) for r in rows]
    return jax.tree.map(lambda *arrays: np.concatenate([np.asarray(a) for a in arrays]), *rows)


def row_length(prefix_len: int, longest_chunk: int, question_bucket: int) -> int:
    """Static row length R: prefix, the longest chunk and the bucketed question, bucketed."""
    return bucket_length(prefix_len + longest_chunk + question_bucket)


def check_row_fits(prefix_len: int, longest_chunk: int, question_len: int, window: int) -> None:
    """Raises ``InputTooLongError`` when the longest row P + chunk + Q exceeds ``window``."""
    p, c, q = prefix_len, longest_chunk, question_len
    if p + c + q > window:
        raise InputTooLongError(
            f"a row (prefix {p} + chunk {c} + question {q} = {p + c + q} tokens) does not fit in "
            f"the model's window of {window} tokens; lower chunk_len or shorten the question"
        )


def question_bucket(question_len: int) -> int:
    """The static question length Qb of a row (the question's bucket): a multiple of 8, at
    least 16, up to 64 tokens, then ``bucket_length``'s (at most 12.5% padding). A read
    document's question pass costs in proportion to Qb, so short questions get fine buckets
    (a 19-token question part runs as 24 tokens, not 32)."""
    if question_len <= 64:
        return max(16, -(-question_len // 8) * 8)
    return bucket_length(question_len, minimum=8)


def scored_question(question: np.ndarray, score_last_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The question tokens a chunk is scored on: ``(ids [Qb] int32, zero-padded; scored [Qb]
    bool)``, every real token or only the last ``score_last_tokens``."""
    q, q_bucket = len(question), question_bucket(len(question))
    ids = np.zeros(q_bucket, np.int32)
    ids[:q] = question
    scored = np.arange(q_bucket) < q
    if score_last_tokens is not None:
        scored &= np.arange(q_bucket) >= q - score_last_tokens
    return ids, scored


def build_rows(
    parts: PromptParts,
    chunk_len: int,
    window: int,
    num_rows: int | None = None,
    score_last_tokens: int | None = None,
    overlap: int = 0,
) -> Rows:
    """Cuts the context into chunks of at most ``chunk_len`` tokens and lays out one row per chunk.

    num_rows: pad the chunk axis to this many rows (padding rows have no content and
    are never selected); default: the number of chunks (``Rows.groups`` pads per group).
    score_last_tokens: score chunks by only the last m question tokens (None: all).
    Chunks end at sentence ends where ``parts.breaks`` says where they are, with up to
    ``overlap`` tokens repeated from before each boundary (``chunk_bounds``).
    Raises ``InputTooLongError`` when P + chunk + Q does not fit in the model's ``window``.
    """
    if not isinstance(chunk_len, (int, np.integer)) or chunk_len < 1:
        raise PcompError(f"chunk_len must be a positive integer, got {chunk_len!r}")
    p, q = len(parts.prefix), len(parts.question)
    bounds = chunk_bounds(len(parts.context), chunk_len, parts.breaks, overlap)
    longest = max(e - s for s, e in bounds)
    check_row_fits(p, longest, q, window)
    n = len(bounds) if num_rows is None else num_rows
    if n < len(bounds):
        raise PcompError(
            f"num_rows={n} is fewer than the {len(bounds)} chunks of this input; leave num_rows out "
            "(Rows.groups pads each group) or pass at least the number of chunks"
        )
    q_bucket = question_bucket(q)
    r = row_length(p, longest, q_bucket)
    tokens = np.zeros((n, r), np.int32)
    positions = np.zeros((n, r), np.int32)
    row_lengths = np.zeros(n, np.int32)
    chunk_lengths = np.zeros(n, np.int32)
    targets = np.zeros((n, q_bucket), np.int32)
    mask = np.zeros((n, q_bucket), bool)
    score_at = np.zeros((n, q_bucket), np.int32)
    question_ids, scored = scored_question(parts.question, score_last_tokens)
    for i, (s, e) in enumerate(bounds):
        row = np.concatenate([parts.prefix, parts.context[s:e], parts.question])
        tokens[i, : len(row)] = row
        positions[i, : len(row)] = np.arange(len(row))
        row_lengths[i], chunk_lengths[i] = len(row), e - s
        q_start = p + e - s
        targets[i] = question_ids
        mask[i] = scored
        score_at[i] = np.clip(q_start - 1 + np.arange(q_bucket), 0, r - 1)
    chunk_ids = np.arange(n, dtype=np.int32)
    return Rows(tokens, positions, row_lengths, chunk_lengths, chunk_ids, targets, mask, score_at,
                prefix_len=p, chunk_len=int(chunk_len))


def truncate_middle(context: np.ndarray, budget: int) -> np.ndarray:
    """First and last halves of a ``budget``-token window of ``context`` (unchanged when it fits)."""
    if len(context) <= budget:
        return context
    head = budget // 2
    return np.concatenate([context[:head], context[len(context) - (budget - head):]])


def context_budget(parts: PromptParts, window: int, room: int) -> int:
    """Context tokens that fit in ``window`` next to P, Q and ``room`` new tokens (>= 1)."""
    budget = window - len(parts.prefix) - len(parts.question) - room
    if budget < 1:
        raise InputTooLongError(
            f"prefix ({len(parts.prefix)}) + question ({len(parts.question)}) + {room} new tokens "
            f"leave no room for context in the window of {window} tokens"
        )
    return budget
