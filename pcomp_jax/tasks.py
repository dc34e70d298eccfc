"""Synthetic long-context tasks made offline and deterministically from a seed.

Every generator takes the model's tokenizer, a context ``length`` in tokens of that
tokenizer, and a ``depth`` in [0, 1]: the fraction of the context's tokens that come
before the hidden item. The same (length, depth, seed) always gives the same task.

- ``passkey``, ``number_string``, ``kv_retrieval``: InfiniteBench's retrieval formats
  (a 5-digit pass key or a 10-digit number hidden in repetitive filler text; a JSON
  object of UUID pairs and one key to look up).
- ``needle``: a fact sentence planted in natural text (any text file, e.g. a novel) at
  a sentence boundary, and a question about it.

``passkey`` and ``number_string`` are made of whole sentences, as InfiniteBench lays them
out: the needle sits between two whole filler sentences, and the length is within half a
filler sentence (3 tokens with SmolLM2's tokenizer) of the target. ``needle`` takes a span
of whole sentences of the text and plants the fact at a sentence end, so the fact too sits
between whole sentences; its length is within half of the one sentence that straddles
the target (a few tokens to a few dozen in a novel). ``kv_retrieval`` is made of whole
key-value pairs, so its length is within half a pair (about 30 tokens) of the target.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

import numpy as np

from .errors import PcompError

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_QUESTION = "What is the pass key?"
NUMBER_STRING_QUESTION = "What is the sequence number?"
KV_INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"


SCORING = ("contains", "first_integer", "word")


@dataclasses.dataclass
class Task:
    """A context, a question about it, and the expected answer (several accepted answers
    may be given as a list), with how a reply is judged (``scoring``):

    - ``contains``: the answer appears in the reply, ignoring case;
    - ``first_integer``: the reply's first run of digits is the answer (InfiniteBench's
      passkey and number_string scoring);
    - ``word``: the answer is one of the reply's words once quotes and punctuation are
      spaces (InfiniteBench's kv_retrieval scoring).
    """

    context: str
    question: str
    answer: str | list[str]
    scoring: str = "contains"

    def __post_init__(self):
        if self.scoring not in SCORING:
            raise PcompError(f"scoring={self.scoring!r} is not allowed; choose one of: {', '.join(SCORING)}")

    def is_correct(self, reply: str) -> bool:
        """Whether ``reply`` is right for any of the accepted answers (see ``scoring``)."""
        answers = [a for a in (self.answer if isinstance(self.answer, list) else [self.answer]) if a]
        if self.scoring == "first_integer":
            first = re.search(r"\d+", reply)
            return first is not None and first.group() in answers
        if self.scoring == "word":
            words = re.sub(r"[\n:\"'.,?!{}]", " ", reply).split()
            return any(a in words for a in answers)
        return any(a.lower() in reply.lower() for a in answers)


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check(length: int, depth: float, seed: int = 0) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PcompError(f"seed must be a whole number >= 0, got {seed!r}")
    if not isinstance(length, int) or length < 1:
        raise PcompError(f"length must be a positive number of tokens, got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise PcompError(f"depth must be between 0 and 1, got {depth}")


FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")  # InfiniteBench's filler, one sentence at a time


def filler_sentences(first: int, count: int) -> str:
    """``count`` whole filler sentences, cycling from sentence number ``first``, space-separated."""
    return " ".join(FILLER_SENTENCES[(first + i) % len(FILLER_SENTENCES)] for i in range(count))


def sentences_for(tokenizer, tokens: float, first: int = 0) -> int:
    """How many filler sentences from number ``first`` come nearest to ``tokens`` tokens."""
    per = [count_tokens(tokenizer, " " + s) for s in FILLER_SENTENCES]
    count, total = 0, 0
    while total + per[(first + count) % len(per)] / 2 < tokens:
        total += per[(first + count) % len(per)]
        count += 1
    return count


def hidden_in_filler(tokenizer, intro: str, needle: str, length: int, depth: float) -> str:
    """``intro`` + whole filler sentences + ``needle`` + whole filler sentences, about ``length``
    tokens, the needle at ``depth`` (InfiniteBench's layout: the needle sits between whole
    sentences, never inside one).

    The filler before the needle makes ``depth`` of the tokens around the needle (the intro
    counts as filler before it). Lengths are reached by whole sentences, so a context is
    within half a filler sentence (3 tokens for SmolLM2's tokenizer) of ``length``.
    """
    needle = needle.strip()
    before = sentences_for(tokenizer, depth * (length - count_tokens(tokenizer, needle)) - count_tokens(tokenizer, intro))

    def build(after: int) -> str:
        text = (intro + filler_sentences(0, before) + " " if before else intro) + needle
        return text + " " + filler_sentences(before, after) if after else text

    after = sentences_for(tokenizer, length - count_tokens(tokenizer, build(0)), before)
    for _ in range(4):  # the sentences' tokens joined can differ slightly from their sum: correct
        n = count_tokens(tokenizer, build(after))
        half = count_tokens(tokenizer, " " + FILLER_SENTENCES[(before + after) % len(FILLER_SENTENCES)]) / 2
        if n < length - half:
            after += 1
        elif n > length + half and after > 0:
            after -= 1
        else:
            break
    return build(after)


def passkey_task(tokenizer, length: int, depth: float, seed: int = 0) -> Task:
    """InfiniteBench passkey: a 5-digit key in ``length`` tokens of filler, at ``depth``."""
    _check(length, depth, seed)
    key = str(np.random.default_rng(seed).integers(10000, 100000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    context = hidden_in_filler(tokenizer, PASSKEY_INTRO, needle, length, depth)
    return Task(context=context, question=PASSKEY_QUESTION, answer=key, scoring="first_integer")


def number_string_task(tokenizer, length: int, depth: float, seed: int = 0) -> Task:
    """InfiniteBench number_string: a 10-digit number in ``length`` tokens of filler, at ``depth``."""
    _check(length, depth, seed)
    rng = np.random.default_rng(seed)
    number = str(rng.integers(1, 10)) + "".join(str(d) for d in rng.integers(0, 10, size=9))
    needle = f"The sequence of digits is {number}. Remember it. {number} is the sequence of digits. "
    context = hidden_in_filler(tokenizer, PASSKEY_INTRO, needle, length, depth)
    return Task(context=context, question=NUMBER_STRING_QUESTION, answer=number, scoring="first_integer")


def kv_retrieval_task(tokenizer, length: int, depth: float, seed: int = 0) -> Task:
    """InfiniteBench kv_retrieval: a JSON object of random UUID pairs; the question asks for
    the value of the key at ``depth`` of the object. Length: whole pairs (see the module)."""
    _check(length, depth, seed)
    rng = np.random.default_rng(seed)
    new_uuid = lambda: str(uuid.UUID(bytes=rng.bytes(16), version=4))
    as_text = lambda pairs: KV_INTRO + json.dumps(dict(pairs))  # one line, as InfiniteBench writes it
    pairs = [(new_uuid(), new_uuid()) for _ in range(8)]
    per_pair = count_tokens(tokenizer, as_text(pairs)) / 8
    pairs += [(new_uuid(), new_uuid()) for _ in range(int(1.2 * length / per_pair) + 8)]
    count = max(1, round(length / per_pair))
    for _ in range(3):  # correct the estimate with the real count of the whole object
        count = max(1, min(len(pairs), count + round((length - count_tokens(tokenizer, as_text(pairs[:count]))) / per_pair)))
    pairs = pairs[:count]
    context = as_text(pairs)
    key, value = pairs[round(depth * (len(pairs) - 1))]
    question = f'Key: "{key}"\nThe value associated with the specified key is:'
    return Task(context=context, question=question, answer=value, scoring="word")


NEEDLE_FACTS = (
    ("The name of the ship's cat was {x}.", "What was the name of the ship's cat?"),
    ("The colonel kept his savings in a tin marked {x}.", "What was the tin with the colonel's savings marked?"),
    ("The old gardener's favourite word was {x}.", "What was the old gardener's favourite word?"),
    ("The secret password of the club was {x}.", "What was the secret password of the club?"),
)
SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)]*\s+")
NEEDLE_WORDS = ("Marmalade", "Copperfield", "Zanzibar", "Pemberton", "Quixotic", "Blueberry", "Ravensworth",
                "Tangerine", "Wolverhampton", "Lighthouse", "Saffron", "Thimble")


def sentence_span(text: str, token_starts: np.ndarray, start: int, tokens: int) -> str:
    """Whole sentences of ``text`` near ``tokens`` tokens long, from about token ``start``.

    The span begins at the first sentence start at or after token ``start`` (the text's
    start counts as one) and ends at the sentence end (``SENTENCE_END``) whose token count
    from there is nearest ``tokens``; so it is within half of the sentence that straddles
    ``tokens`` of that length. Where the text has no sentence end in reach it is cut at
    token boundaries instead. token_starts: ``[num_tokens]``, the character offset in
    ``text`` where each of its tokens starts.
    """
    first = token_starts[start]
    if start > 0:
        head = SENTENCE_END.search(text, first)
        first = head.end() if head else first
    begin = int(np.searchsorted(token_starts, first))
    target = begin + tokens
    if target >= len(token_starts):
        return text[first:]
    limit = token_starts[min(target + tokens // 2 + 1, len(token_starts) - 1)]
    ends = [m.end() for m in SENTENCE_END.finditer(text, first, limit)]
    if not ends:
        return text[first : token_starts[target]]
    last = min(ends, key=lambda end: abs(int(np.searchsorted(token_starts, end)) - target))
    return text[first:last]


def needle_task(text: str, tokenizer, length: int, depth: float, seed: int = 0) -> Task:
    """A fact planted in natural ``text`` (e.g. a novel) of about ``length`` tokens, at ``depth``.

    A seed-chosen span of whole sentences (``sentence_span``) is cut so that span + fact
    make about ``length`` tokens; the fact sentence goes in at the sentence end (``.``,
    ``!`` or ``?``, closing quotes, then a space or line break) nearest to ``depth`` of the
    span, the span's start and end included, so it always follows and precedes whole
    sentences; the question asks for the planted word.
    """
    _check(length, depth, seed)
    rng = np.random.default_rng(seed)
    fact, question = NEEDLE_FACTS[rng.integers(len(NEEDLE_FACTS))]
    word = NEEDLE_WORDS[rng.integers(len(NEEDLE_WORDS))]
    fact = fact.format(x=word) + " "
    span_len = max(1, length - count_tokens(tokenizer, fact))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    token_starts = np.array([first for first, _ in offsets])  # the text tokenized once, for both uses
    if len(token_starts) < span_len:
        raise PcompError(f"the text has {len(token_starts)} tokens, fewer than the {length} asked for")
    start = int(rng.integers(0, len(token_starts) - span_len + 1))
    span = sentence_span(text, token_starts, start, span_len)
    target = round(depth * len(span))
    ends = [0, *(m.end() for m in SENTENCE_END.finditer(span)), len(span)]
    cut = min(ends, key=lambda end: abs(end - target))
    joint = " " if cut and not span[cut - 1].isspace() else ""  # only where the span was cut mid-sentence
    return Task(context=span[:cut] + joint + fact + span[cut:], question=question, answer=word)


GENERATOR_VERSIONS = {"passkey": 1, "number_string": 1, "kv_retrieval": 1, "needle": 2}
"""Raised whenever a generator's output changes for the same (length, depth, seed), so that
results made with the old tasks are told apart (the evaluation runner runs them again).
needle 2: the span is whole sentences (before, depth 1.0 glued the fact to half a sentence)."""

SYNTHETIC_TASKS = {
    "passkey": passkey_task,
    "number_string": number_string_task,
    "kv_retrieval": kv_retrieval_task,
    "needle": needle_task,
}


def make_task(kind: str, tokenizer, length: int, depth: float, seed: int = 0, text: str | None = None) -> Task:
    """The task ``kind`` (one of ``SYNTHETIC_TASKS``); ``needle`` needs the haystack ``text``."""
    if kind not in SYNTHETIC_TASKS:
        raise PcompError(f"unknown task {kind!r}; choose one of: {', '.join(SYNTHETIC_TASKS)}")
    if kind == "needle":
        if text is None:
            raise PcompError("the needle task needs a text to hide the fact in (e.g. a plain-text book, or pcomp_jax.io.read_text(None) for the bundled one)")
        return needle_task(text, tokenizer, length, depth, seed)
    return SYNTHETIC_TASKS[kind](tokenizer, length, depth, seed)
