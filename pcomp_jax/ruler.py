"""RULER's long-context tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?", github.com/NVIDIA/RULER): generators, scoring and its
data files.

The thirteen tasks of RULER's ``synthetic`` benchmark (``RULER_TASKS``), each a family
with parameters as RULER's ``scripts/synthetic.yaml`` sets them:

- eight needle-in-a-haystack tasks (``niah_*``): needles "One of the special magic
  {numbers} for {key} is: {value}." hidden in a haystack of repeated noise sentences, of
  essay text, or of needle-shaped distractor lines; keys and values are adjective-noun
  words (the ``wonderwords`` lists RULER draws from), 7-digit numbers or UUIDs;
- ``vt``: variable tracking, a chain of ``VAR X = VAR Y`` assignments in noise, with
  RULER's one-shot example before the task;
- ``cwe``: common words extraction, a numbered word list with ten frequent words, with
  RULER's one-shot example;
- ``fwe``: frequent words extraction, coded words drawn with Zipf-like frequencies;
- ``qa_1``, ``qa_2``: SQuAD and HotpotQA questions over documents. Their source data is
  not available offline: they are read from RULER's own files only (``load_ruler_file``).

A sample (``RulerSample``) has RULER's input cut where the template puts the context:
``head + context + question`` is the ``input`` string RULER's ``prepare.py`` writes for
its ``base`` model template, and ``answer_prefix`` its ``answer_prefix`` field, which RULER
appends to the input when it asks the model. The length is reached as RULER reaches it:
the amount of haystack is searched so that the tokens of the whole input (the template
and answer prefix included) plus the task's ``tokens_to_generate`` fit in the target
length. Every draw is seeded per sample (``sample_rng``); nothing uses global random state.

Scoring is RULER's (``scripts/eval``): the prediction is stripped and its control
characters made line breaks (``postprocess_prediction``); synthetic tasks score
``string_match_all`` (the fraction of the references found in it, ignoring case), the QA
tasks ``string_match_part`` (whether any reference is in it); a task's score is the mean
over its samples x 100 (``task_score``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import string
import uuid
from typing import Callable

import numpy as np

from .errors import PcompError
from .tasks import count_tokens


class RulerFormatError(PcompError):
    """A RULER data file or one of its lines is malformed, or of an unknown task."""


# ---- the tasks' text: RULER's scripts/data/synthetic/constants.py, as data ------------------


@dataclasses.dataclass(frozen=True)
class TaskText:
    """A task family's prompt: ``template`` (with ``{context}`` and the family's other
    fields), the ``answer_prefix`` that follows it, the answer length
    ``tokens_to_generate`` and the name of the per-sample ``metric``."""

    template: str
    answer_prefix: str
    tokens_to_generate: int
    metric: str


TASK_TEXTS = {
    "niah": TaskText(
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128, "string_match_all"),
    "variable_tracking": TaskText(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: ",
        30, "string_match_all"),
    "common_words_extraction": TaskText(
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120, "string_match_all"),
    "freq_words_extraction": TaskText(
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
        "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50, "string_match_all"),
    "qa": TaskText(
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:",
        32, "string_match_part"),
}

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's rewriting of the niah template (and answer prefix) when one value is asked for, in order.
SINGULAR_REWRITES = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))
# The depths (percent of the essay's sentences) a needle may be put at: 40 evenly spaced, rounded.
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))
VT_EXAMPLE_TOKENS = 500  # the length RULER makes vt's one-shot example to
VT_EXAMPLE_VALUE = "12345"  # the example chain's value before each sample gets its own
SHORT_CWE_LENGTH = 4096  # below it, cwe's word counts and example are RULER's smaller ones


# ---- the tasks and their parameters: RULER's scripts/synthetic.yaml ---------------------------


@dataclasses.dataclass(frozen=True)
class NiahParams:
    """A needle-in-a-haystack task: ``haystack`` ("noise", "essay" or "needle"), the kind of
    keys and values ("words", "numbers" or "uuids"), how many keys are hidden, values per
    key, and keys asked for."""

    haystack: str
    key_type: str
    value_type: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


@dataclasses.dataclass(frozen=True)
class VariableTrackingParams:
    """Variable tracking: ``num_chains`` chains of ``num_hops`` assignments in noise sentences."""

    num_chains: int = 1
    num_hops: int = 4


@dataclasses.dataclass(frozen=True)
class CommonWordsParams:
    """Common words extraction: ``num_cw`` common words, each ``freq_cw`` times, the other
    words ``freq_ucw`` times each; ``num_fewshot`` worked examples before the task."""

    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    num_fewshot: int = 1


@dataclasses.dataclass(frozen=True)
class FreqWordsParams:
    """Frequent words extraction: coded words of ``coded_wordlen`` letters, the word of rank
    k drawn in proportion to k^-alpha; ``vocab_size`` None: (length - tokens_to_generate) // 50."""

    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int | None = None


@dataclasses.dataclass(frozen=True)
class QaParams:
    """Question answering over documents of ``dataset`` (squad or hotpotqa)."""

    dataset: str


@dataclasses.dataclass(frozen=True)
class RulerTask:
    """One of RULER's tasks: its ``family`` (a key of ``TASK_TEXTS``) and parameters."""

    family: str
    params: object

    @property
    def text(self) -> TaskText:
        return TASK_TEXTS[self.family]


RULER_TASKS = {
    "niah_single_1": RulerTask("niah", NiahParams("noise", "words", "numbers")),
    "niah_single_2": RulerTask("niah", NiahParams("essay", "words", "numbers")),
    "niah_single_3": RulerTask("niah", NiahParams("essay", "words", "uuids")),
    "niah_multikey_1": RulerTask("niah", NiahParams("essay", "words", "numbers", num_keys=4)),
    "niah_multikey_2": RulerTask("niah", NiahParams("needle", "words", "numbers")),
    "niah_multikey_3": RulerTask("niah", NiahParams("needle", "uuids", "uuids")),
    "niah_multivalue": RulerTask("niah", NiahParams("essay", "words", "numbers", num_values=4)),
    "niah_multiquery": RulerTask("niah", NiahParams("essay", "words", "numbers", num_queries=4)),
    "vt": RulerTask("variable_tracking", VariableTrackingParams(num_chains=1, num_hops=4)),
    "cwe": RulerTask("common_words_extraction", CommonWordsParams(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": RulerTask("freq_words_extraction", FreqWordsParams(alpha=2.0)),
    "qa_1": RulerTask("qa", QaParams("squad")),
    "qa_2": RulerTask("qa", QaParams("hotpotqa")),
}
GENERATED_TASKS = tuple(name for name, task in RULER_TASKS.items() if task.family != "qa")
DEFAULT_SEED = 42  # RULER's prepare.py --random_seed

RULER_GENERATOR_VERSION = 1
"""Raised whenever a generator's output changes for the same (task, length, index, seed),
so that results made with the old samples are told apart (the evaluation runs them again)."""


def ruler_task(name: str) -> RulerTask:
    """The task ``name``; ``PcompError`` listing the task names for another name."""
    if name not in RULER_TASKS:
        raise PcompError(f"unknown RULER task {name!r}; choose one of: {', '.join(RULER_TASKS)}")
    return RULER_TASKS[name]


def uses_essay(name: str) -> bool:
    """Whether the task hides its needles in essay text (it needs a text to generate)."""
    task = ruler_task(name)
    return task.family == "niah" and task.params.haystack == "essay"


# ---- a sample --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RulerSample:
    """One RULER sample, cut into the parts of our prompt.

    task: its name (``RULER_TASKS``); head: the input before the context (examples, if the
    task has them, and the template's head), the instruction P; context: the haystack with
    the needles, the part that is chunked; question: the template after the context;
    answer_prefix: RULER's answer prefix, which the answer continues; outputs: the
    reference answers; target_length: the length asked for (input and
    tokens_to_generate); input_tokens: the tokens of ``input + answer_prefix`` as measured
    when the sample was made (for a sample read from a file, RULER's ``length`` less
    tokens_to_generate); tokens_to_generate: the answer length; index: the sample's number.
    """

    task: str
    head: str
    context: str
    question: str
    answer_prefix: str
    outputs: tuple[str, ...]
    target_length: int
    input_tokens: int
    tokens_to_generate: int
    index: int = 0

    @property
    def input(self) -> str:
        """RULER's ``input``: head, context and question joined."""
        return self.head + self.context + self.question

    @property
    def length(self) -> int:
        """RULER's ``length``: input tokens plus tokens_to_generate (at most target_length)."""
        return self.input_tokens + self.tokens_to_generate

    def prompt_parts(self, tokenizer, chat: bool = False):
        """The prompt as ``chunking.PromptParts``: P = head, the context, Q = question +
        answer_prefix, joined verbatim (RULER's ``base`` template); ``chat``: inside the
        model's chat template, the answer prefix after the assistant cue."""
        from .chunking import encode_parts

        return encode_parts(tokenizer, self.context, self.question, self.head, self.answer_prefix, chat,
                            verbatim=True)

    def score(self, prediction: str) -> float:
        """The prediction's RULER score in [0, 1] (``score_prediction``)."""
        return score_prediction(self.task, prediction, self.outputs)

    def to_record(self) -> dict:
        """The sample as a line of a ``prepare.py`` file (``write_ruler_file``)."""
        return {"index": self.index, "input": self.input, "outputs": list(self.outputs), "length": self.length,
                "length_w_model_temp": self.length, "answer_prefix": self.answer_prefix}


@dataclasses.dataclass(frozen=True)
class _Parts:
    """A sample's four strings and references, before its length is measured."""

    head: str
    context: str
    question: str
    answer_prefix: str
    outputs: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.head + self.context + self.question + self.answer_prefix


# ---- seeding -------------------------------------------------------------------------------

DRAWS, HAYSTACK, POSITIONS, EXAMPLE = range(4)  # independent streams of one sample's draws


def sample_rng(seed: int, task: str, index: int, stream: int = DRAWS) -> random.Random:
    """The random draws of stream ``stream`` of sample ``index`` of task ``task`` in a run
    seeded ``seed``.

    Streams keep apart what does not depend on the amount of haystack (keys, values,
    depths: ``DRAWS``) from what does (``HAYSTACK``, ``POSITIONS``), so that the search for
    the length changes only the haystack. RULER's own fixed shuffles take
    ``random.Random(seed)`` afresh, as RULER does.
    """
    task_number = int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "little")
    words = np.random.SeedSequence([seed, task_number, index, stream]).generate_state(2, np.uint32)
    return random.Random((int(words[0]) << 32) | int(words[1]))


# ---- word sources ----------------------------------------------------------------------------


@functools.cache
def wonderwords_list(kind: str) -> tuple[str, ...]:
    """The sorted distinct words of the ``wonderwords`` package's list ``kind`` ("noun",
    "adjective" or "verb"), RULER's word source."""
    from wonderwords import random_word

    return tuple(sorted(set(random_word._get_words_from_text_file(f"{kind}list.txt"))))


@functools.cache
def common_words(seed: int) -> tuple[str, ...]:
    """cwe's vocabulary: the distinct nouns, adjectives and verbs, sorted and then shuffled
    by ``random.Random(seed)``, as RULER orders them."""
    words = sorted(set(wonderwords_list("noun") + wonderwords_list("adjective") + wonderwords_list("verb")))
    random.Random(seed).shuffle(words)
    return tuple(words)


def random_needle_value(kind: str, rng: random.Random) -> str:
    """A key or value of ``kind``: "numbers" (7 digits), "words" (adjective-noun, uniform
    over RULER's pairs) or "uuids"."""
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return f"{rng.choice(wonderwords_list('adjective'))}-{rng.choice(wonderwords_list('noun'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise PcompError(f"needle type {kind!r} is not allowed; choose one of: numbers, words, uuids")


# ---- sentences of an essay -------------------------------------------------------------------

ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "rev", "gen", "col", "capt", "lt",
                           "sgt", "mt", "vs", "etc", "e.g", "i.e", "no", "vol", "fig", "inc", "co", "ltd"})
_SENTENCE_END = re.compile(r"([.!?])[\"'\u2019\u201d)\]]*(\s+)")
_WORD_BEFORE = re.compile(r"([\w.]+)$")


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences, in the manner of NLTK's Punkt tokenizer (which RULER
    uses and which needs data not available offline): a sentence ends at ``.``, ``!`` or
    ``?`` (closing quotes or brackets may follow) before whitespace, unless the next
    character is a lower-case letter, or the ``.`` ends an abbreviation (``ABBREVIATIONS``)
    or a one-letter initial. The whitespace between sentences is dropped, so for text with
    single spaces ``" ".join(split_sentences(text)) == text``."""
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        after = end.end()
        if after >= len(text) or text[after].islower():
            continue
        if end.group(1) == "." and _ends_abbreviation(text[max(0, end.start(1) - 24):end.start(1)]):
            continue
        sentences.append(text[start:end.start(2)])
        start = after
    if text[start:].strip():
        sentences.append(text[start:])
    return sentences


def _ends_abbreviation(before: str) -> bool:
    """Whether the word that ``before`` ends with (its dot next) is an abbreviation
    (``ABBREVIATIONS``) or ends in a one-letter initial ("J", "U.S")."""
    word = _WORD_BEFORE.search(before)
    if word is None:
        return False
    last = word.group(1).split(".")[-1]
    return word.group(1).lower() in ABBREVIATIONS or (len(last) == 1 and last.isupper())


def essay_words(text: str) -> list[str]:
    """An essay as RULER holds it: its whitespace runs made single spaces, split at spaces."""
    return re.sub(r"\s+", " ", text).split(" ")


def essay_with_needles(words: list[str], count: int, needles: list[str], depths: list[int]) -> str:
    """The first ``count`` words of the essay (repeated when it has fewer) with each needle
    put between sentences at its depth (percent of the sentences), RULER's essay haystack."""
    repeats = -(-count // len(words))
    text = " ".join((words * repeats)[:count]).strip()
    sentences = split_sentences(text)
    cuts = [0, *sorted(int(len(sentences) * (depth / 100)) for depth in depths), len(sentences)]
    pieces = []
    for i in range(1, len(cuts)):
        pieces.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(needles):
            pieces.append(needles[i - 1])
    return " ".join(pieces)


def lines_with_needles(lines: list[str], needles: list[str], rng: random.Random) -> str:
    """``lines`` with the needles put at distinct random places (the first needle last), one
    a line, as RULER fills its noise and needle haystacks."""
    lines = list(lines)
    places = sorted(rng.sample(range(len(lines)), len(needles)), reverse=True)
    for place, needle in zip(places, needles):
        lines.insert(place, needle)
    return "\n".join(lines)


# ---- reaching the length ---------------------------------------------------------------------


GROWTH = 8  # the most largest_fitting multiplies its amount by in one step while bracketing


def largest_fitting(total_tokens: Callable[[int], int], budget: int, smallest: int, largest: int) -> int | None:
    """The largest amount n in [smallest, largest] with ``total_tokens(n) <= budget``; None
    when even ``smallest`` is over. RULER's search for the amount of haystack, for counts
    that grow with n: brackets the answer from a linear estimate (growing at most
    ``GROWTH`` times a step), then narrows it by turns of interpolation and bisection."""
    known: dict[int, int] = {}

    def tokens(n: int) -> int:
        if n not in known:
            known[n] = total_tokens(n)
        return known[n]

    if tokens(smallest) > budget:
        return None
    low, high = smallest, None
    probe = min(largest, max(smallest + 1, 2 * smallest))
    while high is None and low < largest:  # grow until over the budget or at the largest
        if tokens(probe) <= budget:
            low = probe
            slope = max((tokens(low) - tokens(smallest)) / (low - smallest), 1e-6)
            estimate = int(low + 1.05 * (budget - tokens(low)) / slope) + 1
            probe = min(largest, GROWTH * low, max(low + 1, estimate))
        else:
            high = probe
    if high is None:
        return low
    bisect = False
    while high - low > 1:
        if bisect:
            middle = (low + high) // 2
        else:
            share = (budget - tokens(low)) / max(tokens(high) - tokens(low), 1)
            middle = min(high - 1, max(low + 1, low + int(share * (high - low))))
        low, high = (middle, high) if tokens(middle) <= budget else (low, middle)
        bisect = not bisect
    return low


def _fit(name: str, tokenizer, length: int, index: int, build: Callable[[int], _Parts], smallest: int,
         largest: int, unit: str) -> tuple[RulerSample, int]:
    """The sample with the most haystack (``build(n)``, n in [smallest, largest] ``unit``s)
    whose input tokens plus tokens_to_generate fit in ``length``, and its n."""
    generate = RULER_TASKS[name].text.tokens_to_generate
    total = lambda n: count_tokens(tokenizer, build(n).text) + generate
    amount = largest_fitting(total, length, smallest, largest)
    if amount is None:
        raise PcompError(f"length {length} is too short for RULER task {name}: with the least haystack "
                         f"({smallest} {unit}) its input and the {generate} tokens to generate take "
                         f"{total(smallest)} tokens; use a longer length")
    parts = build(amount)
    sample = RulerSample(name, parts.head, parts.context, parts.question, parts.answer_prefix, parts.outputs,
                         length, count_tokens(tokenizer, parts.text), generate, index)
    return sample, amount


def _split_template(template: str, answer_prefix: str, **fields) -> tuple[str, str, str]:
    """(head, question, answer prefix): the template around ``{context}`` and the prefix,
    with ``fields`` filled in."""
    head, question = template.split("{context}")
    return head.format(**fields), question.format(**fields), answer_prefix.format(**fields)


# ---- the generators ------------------------------------------------------------------------


def singular_text(text: TaskText) -> tuple[str, str]:
    """The niah template and answer prefix as RULER rewrites them when one value is asked
    for (``SINGULAR_REWRITES``, applied to both joined, as RULER applies them)."""
    joined = text.template + "\x00" + text.answer_prefix
    for old, new in SINGULAR_REWRITES:
        joined = joined.replace(old, new)
    template, answer_prefix = joined.split("\x00")
    return template, answer_prefix


def niah_sample(name: str, tokenizer, length: int, index: int, seed: int, text: str | None) -> RulerSample:
    """A needle-in-a-haystack sample (``NiahParams``), as RULER's ``niah.py`` makes one."""
    task = RULER_TASKS[name]
    p: NiahParams = task.params
    rng = sample_rng(seed, name, index)
    num_keys = max(p.num_keys, p.num_queries)
    keys, values, needles = [], [], []
    for _ in range(num_keys):
        keys.append(random_needle_value(p.key_type, rng))
        values.append([random_needle_value(p.value_type, rng) for _ in range(p.num_values)])
        needles += [NEEDLE.format(type_needle_v=p.value_type, key=keys[-1], value=v) for v in values[-1]]
    random.Random(seed).shuffle(needles)
    asked = rng.sample(range(num_keys), p.num_queries)
    queries = [keys[i] for i in asked]
    answers = tuple(v for i in asked for v in values[i])
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    if p.num_queries * p.num_values == 1:
        template, prefix = singular_text(task.text)
        value_name = p.value_type[:-1]
    else:
        template, prefix = task.text.template, task.text.answer_prefix
        value_name = p.value_type
    head, question, answer_prefix = _split_template(template, prefix, type_needle_v=value_name, query=query)
    if p.haystack == "essay":
        if text is None:
            raise PcompError(f"RULER task {name} hides its needles in essay text; give a text (e.g. "
                             "pcomp_jax.io.read_text(None) for the bundled one)")
        words = essay_words(text)
        depths = rng.sample(DEPTHS, len(needles))
        context = lambda n: essay_with_needles(words, n, needles, depths)
        smallest, unit = 1, "words"
    elif p.haystack == "noise":
        context = lambda n: lines_with_needles([NOISE] * n, needles, sample_rng(seed, name, index, POSITIONS))
        smallest, unit = len(needles), "noise lines"
    elif p.haystack == "needle":
        def context(n):
            lines = sample_rng(seed, name, index, HAYSTACK)
            distractors = [NEEDLE.format(type_needle_v=p.value_type, key=random_needle_value(p.key_type, lines),
                                         value=random_needle_value(p.value_type, lines)) for _ in range(n)]
            return lines_with_needles(distractors, needles, sample_rng(seed, name, index, POSITIONS))
        smallest, unit = len(needles), "distractor lines"
    else:
        raise PcompError(f"haystack {p.haystack!r} is not allowed; choose one of: noise, essay, needle")
    build = lambda n: _Parts(head, context(n), question, answer_prefix, answers)
    return _fit(name, tokenizer, length, index, build, smallest, 10 ** 8, unit)[0]


def variable_names(rng: random.Random, count: int, letters: int) -> list[str]:
    """``count`` distinct names of ``letters`` random capital letters."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def variable_chains(rng: random.Random, p: VariableTrackingParams, letters: int, value: Callable[[], str]):
    """(names per chain, lines per chain): each chain ``VAR A = <value>`` then
    ``VAR B = VAR A `` and so on, ``num_hops`` assignments (RULER's lines, trailing space
    included)."""
    names = variable_names(rng, p.num_chains * (p.num_hops + 1), letters)
    chains = [names[i:i + p.num_hops + 1] for i in range(0, len(names), p.num_hops + 1)]
    lines = [[f"VAR {chain[0]} = {value()}"] + [f"VAR {chain[j + 1]} = VAR {chain[j]} " for j in range(p.num_hops)]
             for chain in chains]
    return chains, lines


def chains_in_noise(chain_lines: list[list[str]], count: int, rng: random.Random) -> str:
    """``count`` noise lines with each chain's lines put in order at random places."""
    lines = [NOISE] * count
    for chain in chain_lines:
        places = sorted(rng.sample(range(len(lines)), len(chain)))
        for offset, (place, line) in enumerate(zip(places, chain)):
            lines.insert(place + offset, line)
    return "\n".join(lines).replace(". \n", ".\n")


def variable_tracking_example(tokenizer, name: str, seed: int) -> str:
    """The one-shot example of variable tracking task ``name``, one per seed as RULER makes
    one per run: 3-letter names, the value 12345, as many noise lines as fit in
    ``VT_EXAMPLE_TOKENS`` tokens, the whole template and answer prefix, then the answer and
    a line break."""
    text = TASK_TEXTS["variable_tracking"]
    p: VariableTrackingParams = RULER_TASKS[name].params
    hops = min(10, p.num_hops)
    example_params = dataclasses.replace(p, num_hops=hops)
    rng = sample_rng(seed, name, 0, EXAMPLE)
    chains, lines = variable_chains(rng, example_params, 3, lambda: VT_EXAMPLE_VALUE)
    template = text.template + text.answer_prefix

    def example(n: int) -> str:
        context = chains_in_noise(lines, n, sample_rng(seed, name, 1, EXAMPLE))
        return template.format(context=context, query=VT_EXAMPLE_VALUE, num_v=hops + 1)

    count = largest_fitting(lambda n: count_tokens(tokenizer, example(n)), VT_EXAMPLE_TOKENS, hops + 1, 10 ** 6)
    return example(count or hops + 1) + " " + " ".join(chains[0]) + "\n"


def randomized_example(example: str, num_hops: int, rng: random.Random) -> str:
    """vt's example with new names for its answer's variables (each name replaced wherever it
    occurs) and a new value, as RULER varies it per sample."""
    for name in example.strip().split()[-num_hops - 1:]:
        example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
    return example.replace(VT_EXAMPLE_VALUE, str(rng.randint(10000, 99998)))


def variable_tracking_sample(name: str, tokenizer, length: int, index: int, seed: int) -> RulerSample:
    """A variable tracking sample, as RULER's ``variable_tracking.py`` makes one (noise haystack)."""
    task = RULER_TASKS[name]
    p: VariableTrackingParams = task.params
    rng = sample_rng(seed, name, index)
    chains, lines = variable_chains(rng, p, 5, lambda: str(rng.randint(10000, 99998)))
    value = lines[0][0].split("=")[-1].strip()
    example = randomized_example(variable_tracking_example(tokenizer, name, seed), p.num_hops, rng)
    head, question, answer_prefix = _split_template(task.text.template, task.text.answer_prefix, query=value,
                                                    num_v=p.num_hops + 1)
    build = lambda n: _Parts(example + "\n" + head, chains_in_noise(lines, n, sample_rng(seed, name, index, POSITIONS)),
                             question, answer_prefix, tuple(chains[0]))
    return _fit(name, tokenizer, length, index, build, p.num_hops + 1, 10 ** 7, "noise lines")[0]


def numbered(words) -> str:
    """``1. w1 2. w2 ...``, cwe's list format."""
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def word_list(chosen, common: int, common_repeats: int, other_repeats: int, seed: int) -> str:
    """The first ``common`` of ``chosen`` repeated ``common_repeats`` times and the others
    ``other_repeats`` times, shuffled by ``random.Random(seed)`` and numbered, as RULER does."""
    words = list(chosen[:common]) * common_repeats + list(chosen[common:]) * other_repeats
    random.Random(seed).shuffle(words)
    return numbered(words)


def common_words_sample(name: str, tokenizer, length: int, index: int, seed: int) -> RulerSample:
    """A common words extraction sample, as RULER's ``common_words_extraction.py`` makes one:
    worked examples, then the task; below ``SHORT_CWE_LENGTH`` tokens the smaller counts
    RULER uses there (examples of 20 words, 3 and 1 repeats; the task 6 and 1)."""
    task = RULER_TASKS[name]
    p: CommonWordsParams = task.params
    words = common_words(seed)
    rng = sample_rng(seed, name, index)
    short = length < SHORT_CWE_LENGTH
    example_size, example_repeats = (20, (3, 1)) if short else (40, (10, 3))
    repeats = (6, 1) if short else (p.freq_cw, p.freq_ucw)
    template = task.text.template + task.text.answer_prefix
    examples = []
    for _ in range(p.num_fewshot):
        chosen = rng.sample(words, example_size)
        examples.append(template.format(context=word_list(chosen, p.num_cw, *example_repeats, seed), query="",
                                        num_cw=p.num_cw) + " " + numbered(chosen[:p.num_cw]))
    order = rng.sample(words, len(words))  # the task's words: the first n of one random order
    head, question, answer_prefix = _split_template(task.text.template, task.text.answer_prefix, query="",
                                                    num_cw=p.num_cw)
    build = lambda n: _Parts("\n".join(examples) + "\n" + head, word_list(order[:n], p.num_cw, *repeats, seed),
                             question, answer_prefix, tuple(order[:p.num_cw]))
    sample, amount = _fit(name, tokenizer, length, index, build, p.num_cw, len(words), "words")
    if amount == len(words):
        raise PcompError(f"length {length} is too long for RULER task {name}: it needs more than the "
                         f"{len(words)} distinct wonderwords words, beyond which RULER draws from its "
                         "english_words.json list, which is not available here; use a shorter length")
    return sample


def zipf_counts(num_words: int, vocab_size: int, alpha: float) -> np.ndarray:
    """fwe's word counts: the word of rank k (from 1) ``floor(num_words * k^-alpha / zeta(alpha))`` times."""
    from scipy.special import zeta

    ranks = np.arange(1, vocab_size + 1)
    return (num_words * (ranks ** -alpha) / zeta(alpha)).astype(int)


def coded_vocabulary(rng: random.Random, size: int, letters: int, seed: int) -> list[str]:
    """fwe's vocabulary: ``size`` distinct random lower-case words, sorted, shuffled by
    ``random.Random(seed)``; the first (the most frequent) is ``...``, the noise."""
    vocab: list[str] = []
    while len(set(vocab)) < size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=letters)))
    vocab = sorted(set(vocab))
    random.Random(seed).shuffle(vocab)
    vocab[0] = "..."
    return vocab


def freq_words_sample(name: str, tokenizer, length: int, index: int, seed: int) -> RulerSample:
    """A frequent words extraction sample, as RULER's ``freq_words_extraction.py`` makes one:
    the answer is the three most frequent coded words after the noise ``...``."""
    task = RULER_TASKS[name]
    p: FreqWordsParams = task.params
    size = p.vocab_size or (length - task.text.tokens_to_generate) // 50
    if size < 4:
        raise PcompError(f"length {length} is too short for RULER task {name}: its vocabulary of "
                         f"(length - {task.text.tokens_to_generate}) // 50 = {size} words needs at least 4")
    vocab = coded_vocabulary(sample_rng(seed, name, index), size, p.coded_wordlen, seed)
    head, question, answer_prefix = _split_template(task.text.template, task.text.answer_prefix, query="")

    def context(n: int) -> str:
        words = [word for word, count in zip(vocab, zipf_counts(n, size, p.alpha)) for _ in range(count)]
        random.Random(seed).shuffle(words)
        return " ".join(words)

    smallest = 1
    while zipf_counts(smallest, 4, p.alpha)[3] < 1:  # the fewest words in which every answer occurs
        smallest += 1
    build = lambda n: _Parts(head, context(n), question, answer_prefix, tuple(vocab[1:4]))
    return _fit(name, tokenizer, length, index, build, smallest, 10 ** 9, "words")[0]


def generate_sample(name: str, tokenizer, length: int, index: int = 0, seed: int = DEFAULT_SEED,
                    text: str | None = None) -> RulerSample:
    """Sample ``index`` of RULER task ``name`` at ``length`` tokens (input plus the task's
    tokens_to_generate, in ``tokenizer``'s tokens) for a run seeded ``seed``; ``text``: the
    essay of the essay-haystack tasks (e.g. ``io.read_text(None)``, the bundled one). The
    same arguments always give the same sample."""
    task = ruler_task(name)
    if task.family == "qa":
        raise PcompError(f"RULER task {name} asks questions of {task.params.dataset} documents, which are not "
                         "available offline; read RULER's own files of it with load_ruler_file")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise PcompError(f"index must be a whole number >= 0, got {index!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PcompError(f"seed must be a whole number >= 0, got {seed!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise PcompError(f"length must be a positive number of tokens, got {length!r}")
    if task.family == "niah":
        return niah_sample(name, tokenizer, length, int(index), int(seed), text)
    if task.family == "variable_tracking":
        return variable_tracking_sample(name, tokenizer, length, int(index), int(seed))
    if task.family == "common_words_extraction":
        return common_words_sample(name, tokenizer, length, int(index), int(seed))
    return freq_words_sample(name, tokenizer, length, int(index), int(seed))


# ---- scoring: RULER's scripts/eval -----------------------------------------------------------


def postprocess_prediction(prediction: str) -> str:
    """The prediction as RULER scores it: stripped, control characters made line breaks, stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def _check_references(references) -> None:
    if not references:
        raise PcompError("a RULER sample needs at least one reference output to score against")


def string_match_all(prediction: str, references) -> float:
    """The fraction of ``references`` found in ``prediction``, ignoring case."""
    _check_references(references)
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references)


def string_match_part(prediction: str, references) -> float:
    """1.0 when any of ``references`` is found in ``prediction``, ignoring case, else 0.0."""
    _check_references(references)
    text = prediction.lower()
    return float(any(r.lower() in text for r in references))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score_prediction(name: str, prediction: str, references) -> float:
    """RULER's score in [0, 1] of ``prediction`` for task ``name``: its metric on the
    post-processed prediction (``postprocess_prediction``)."""
    return METRICS[ruler_task(name).text.metric](postprocess_prediction(prediction), references)


def task_score(scores) -> float:
    """A task's RULER score from its samples' scores: the mean x 100, rounded to 2 decimals."""
    scores = list(scores)
    if not scores:
        raise PcompError("a task score needs at least one sample's score")
    return round(100 * sum(scores) / len(scores), 2)


# ---- RULER's data files (prepare.py) ---------------------------------------------------------

_FIELD_PATTERNS = {"type_needle_v": "[a-z]+", "query": ".*?", "num_v": r"\d+", "num_cw": r"\d+"}
_EXAMPLE_FAMILIES = ("variable_tracking", "common_words_extraction")  # an example comes before the template


def _fields_pattern(template: str, seen: set) -> str:
    """``template`` as a regular expression: its text literal, each field a group; a field
    in ``seen`` (which it adds to) matches the same text again."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field is None:
            continue
        out.append(f"(?P={field})" if field in seen else f"(?P<{field}>{_FIELD_PATTERNS[field]})")
        seen.add(field)
    return "".join(out)


@functools.cache
def input_patterns(name: str) -> tuple[tuple[re.Pattern, re.Pattern], ...]:
    """(input, answer prefix) regular expressions of task ``name``'s prompts with RULER's
    ``base`` model template: the input's groups ``head``, ``context`` and ``question``;
    niah has a plural and a singular form."""
    task = ruler_task(name)
    forms = [(task.text.template, task.text.answer_prefix)]
    if task.family == "niah":
        forms.append(singular_text(task.text))
    examples = r"(?:.*\n)?" if task.family in _EXAMPLE_FAMILIES else ""
    patterns = []
    for template, prefix in forms:
        head, question = template.split("{context}")
        seen: set = set()
        head_pattern = f"(?P<head>{examples}{_fields_pattern(head, seen)})"
        text = f"{head_pattern}(?P<context>.*)(?P<question>{_fields_pattern(question, seen)})"
        patterns.append((re.compile(text, re.S), re.compile(_fields_pattern(prefix, set()), re.S)))
    return tuple(patterns)


def split_input(name: str, text: str, answer_prefix: str) -> tuple[str, str, str] | None:
    """(head, context, question) of a RULER ``input`` of task ``name`` whose answer prefix is
    ``answer_prefix``; None when they are not of the task's template."""
    for input_pattern, prefix_pattern in input_patterns(name):
        if prefix_pattern.fullmatch(answer_prefix) is None:
            continue
        found = input_pattern.fullmatch(text)
        if found is not None:
            return found.group("head"), found.group("context"), found.group("question")
    return None


def task_of_path(path: str) -> str | None:
    """The task a RULER file is of by its name: its folder (``prepare.py``'s
    ``.../<task>/validation.jsonl``) or else its stem (``call_api.py``'s ``.../<task>.jsonl``);
    None when neither is a task name."""
    path = os.path.abspath(path)
    for name in (os.path.basename(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]):
        if name in RULER_TASKS:
            return name
    return None


def length_of_path(path: str) -> int | None:
    """The target length of a file in RULER's run layout, ``<length>/data/<task>/<subset>.jsonl``;
    None for a file placed otherwise."""
    parts = os.path.abspath(path).split(os.sep)
    if len(parts) >= 4 and parts[-3] == "data" and parts[-4].isdigit():
        return int(parts[-4])
    return None


def _record_sample(record, name: str, where: str) -> RulerSample:
    """One decoded line of a ``prepare.py`` file as a sample (target_length still unknown: 0)."""
    if not isinstance(record, dict):
        raise RulerFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field, kind in (("input", str), ("outputs", list), ("length", int)):
        if field not in record:
            present = ", ".join(sorted(record)) or "none"
            raise RulerFormatError(f"{where}: missing field {field!r} (fields present: {present})")
        if not isinstance(record[field], kind) or isinstance(record[field], bool):
            raise RulerFormatError(f"{where}: field {field!r} must be {kind.__name__}, got {record[field]!r:.60}")
    outputs = record["outputs"]
    if not outputs or not all(isinstance(o, str) for o in outputs):
        raise RulerFormatError(f"{where}: field 'outputs' must be a non-empty list of strings, got {outputs!r:.60}")
    index = record.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise RulerFormatError(f"{where}: field 'index' must be an integer, got {index!r:.60}")
    text = RULER_TASKS[name].text
    if "answer_prefix" in record:
        if not isinstance(record["answer_prefix"], str):
            raise RulerFormatError(f"{where}: field 'answer_prefix' must be a string, got "
                                   f"{record['answer_prefix']!r:.60}")
        full, prefix = record["input"], record["answer_prefix"]
    else:  # an input that still ends in its answer prefix: cut as prepare.py cuts it
        cut = record["input"].rfind(text.answer_prefix[:10])
        full, prefix = (record["input"][:cut], record["input"][cut:]) if cut >= 0 else (record["input"], "")
    parts = split_input(name, full, prefix)
    if parts is None:
        raise RulerFormatError(
            f"{where}: the input and answer_prefix do not match the {name} template of RULER's 'base' model "
            f"template (prepare.py --model_template_type base, without --remove_newline_tab): the input starts "
            f"{full[:50]!r}")
    generate = text.tokens_to_generate
    return RulerSample(name, *parts, prefix, tuple(outputs), 0, record["length"] - generate, generate, index)


def load_ruler_file(path: str, task: str | None = None, limit: int | None = None,
                    length: int | None = None) -> list[RulerSample]:
    """The samples of a RULER data file written by ``prepare.py`` (one JSON object a line:
    ``index``, ``input``, ``outputs``, ``length``, ``answer_prefix``, ...), each input cut back
    into head, context and question by the task's template.

    task: the task (``RULER_TASKS``, qa_1 and qa_2 included); None: the file's folder
    (``.../<task>/validation.jsonl``). length: the target length; None: from RULER's run
    layout (``<length>/data/<task>/...``), else the largest ``length`` in the file.
    limit: the first ``limit`` samples. Blank lines are skipped. ``RulerFormatError``
    naming the file and line for invalid JSON, a missing or ill-typed field, or an input
    that is not of the task's template with RULER's ``base`` model template.
    """
    name = task if task is not None else task_of_path(path)
    if name is None:
        raise RulerFormatError(f"{path}: cannot tell its RULER task: neither its folder nor its name is a task name; "
                               f"give the task (one of: {', '.join(RULER_TASKS)})")
    ruler_task(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RulerFormatError(f"limit must be a whole number >= 1 or None, got {limit!r}")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RulerFormatError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            samples.append(_record_sample(record, name, where))
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise RulerFormatError(f"{path}: empty file, no RULER samples in it")
    target = length or length_of_path(path) or max(s.length for s in samples)
    return [dataclasses.replace(s, target_length=target) for s in samples]


def find_ruler_files(path: str) -> list[str]:
    """The RULER data files at ``path``: the file itself, or every ``<task>/<subset>.jsonl``
    under the directory (``task`` one of ``RULER_TASKS``), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise PcompError(f"RULER data {path!r} does not exist; give a prepare.py file or a directory of them")
    found = [os.path.join(folder, file) for folder, _, files in os.walk(path) for file in files
             if file.endswith(".jsonl") and os.path.basename(folder) in RULER_TASKS]
    if not found:
        raise PcompError(f"no RULER data files under {path!r}: expected <task>/validation.jsonl files "
                         f"(task one of: {', '.join(RULER_TASKS)})")
    return sorted(found)


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_ruler_file(path: str, samples) -> None:
    """Writes ``samples`` as a ``prepare.py`` file (one JSON object a line, ASCII, as RULER writes them)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample.to_record()) + "\n")
