"""Synthetic long-context inputs made deterministically from a seed.

``passkey``: InfiniteBench's passkey retrieval, a number hidden at a chosen depth of
repetitive filler text, sized in tokens of the model's own tokenizer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key?"


@dataclasses.dataclass
class Task:
    """A context, a question about it, and the expected answer (a substring of a right reply;
    several accepted answers may be given as a list)."""

    context: str
    question: str
    answer: str | list[str]

    def is_correct(self, reply: str) -> bool:
        """Whether ``reply`` contains the expected answer (any of them, for a list)."""
        answers = self.answer if isinstance(self.answer, list) else [self.answer]
        return any(a and a in reply for a in answers)


def passkey_task(tokenizer, length: int, depth: float, seed: int = 0) -> Task:
    """A passkey task of about ``length`` context tokens with the key at ``depth`` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    key = str(np.random.default_rng(seed).integers(10000, 100000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])
    per_filler = count(PASSKEY_FILLER * 8) / 8
    repeats = max(0, round((length - count(PASSKEY_INTRO) - count(needle)) / per_filler))
    at = round(depth * repeats)
    context = PASSKEY_INTRO + PASSKEY_FILLER * at + needle + PASSKEY_FILLER * (repeats - at)
    return Task(context=context, question=PASSKEY_QUESTION, answer=key)


NEEDLE_FACTS = (
    ("The name of the ship's cat was {x}.", "What was the name of the ship's cat?"),
    ("The colonel kept his savings in a tin marked {x}.", "What was the tin with the colonel's savings marked?"),
    ("The old gardener's favourite word was {x}.", "What was the old gardener's favourite word?"),
    ("The secret password of the club was {x}.", "What was the secret password of the club?"),
)
NEEDLE_WORDS = ("Marmalade", "Copperfield", "Zanzibar", "Pemberton", "Quixotic", "Blueberry", "Ravensworth",
                "Tangerine", "Wolverhampton", "Lighthouse", "Saffron", "Thimble")


def needle_task(text: str, tokenizer, length: int, depth: float, seed: int = 0) -> Task:
    """A fact planted in natural ``text`` (e.g. a novel) of about ``length`` tokens, at ``depth``.

    A seed-chosen span of the text is cut to ``length`` tokens; the fact sentence goes in at
    the sentence boundary nearest to ``depth``; the question asks for the planted word.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    rng = np.random.default_rng(seed)
    fact, question = NEEDLE_FACTS[rng.integers(len(NEEDLE_FACTS))]
    word = NEEDLE_WORDS[rng.integers(len(NEEDLE_WORDS))]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {length} asked for")
    start = int(rng.integers(0, len(ids) - length + 1))
    span = tokenizer.decode(ids[start : start + length])
    cut = round(depth * len(span))
    boundary = span.rfind(". ", 0, cut)
    cut = boundary + 2 if boundary >= 0 else cut
    context = span[:cut] + fact.format(x=word) + " " + span[cut:]
    return Task(context=context, question=question, answer=word)
