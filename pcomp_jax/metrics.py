"""LongBench's per-dataset metrics, for the English datasets.

Each metric is a pure function ``(prediction, ground_truth, all_classes=None) -> float`` in [0, 1]
that scores one model reply against one reference answer; :func:`score_prediction` takes the best
score over an example's reference answers, as LongBench's ``eval.py`` does.

The semantics follow LongBench v1 (THUDM/LongBench, ``LongBench/metrics.py`` and ``eval.py``):

- ``qa_f1``: token F1 after SQuAD normalisation (QA datasets, triviaqa).
- ``rouge_l``: ROUGE-L F-measure (summarisation datasets). Computed with Google's ``rouge_score``
  package, whose tokenizer (lowercase, split on non-alphanumerics) and sentence-level LCS differ a
  little from the ``rouge`` package LongBench uses, so scores can differ slightly from published ones.
- ``classification_accuracy``: trec's class matching.
- ``retrieval_accuracy``: passage_retrieval_en's paragraph number.
- ``count_accuracy``: passage_count's number.
- ``code_edit_similarity``: lcc and repobench-p's edit similarity of the first line of code.

The Chinese datasets (multifieldqa_zh, dureader, vcsum, lsht, passage_retrieval_zh) are out of scope:
their metrics need a Chinese word segmenter (LongBench uses jieba).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from rapidfuzz import fuzz
from rouge_score import rouge_scorer

from .errors import PcompError

Metric = Callable[[str, str, list[str] | None], float]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")
_PARAGRAPH = re.compile(r"Paragraph (\d+)")
_ROUGE = rouge_scorer.RougeScorer(["rougeL"])

# Few-shot datasets whose reply is cut at its first line before scoring (the model tends to go on
# with more made-up examples). lsht is Chinese and has no metric here; it is listed for completeness.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

CHINESE_DATASETS = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1(prediction_tokens: Sequence[str], truth_tokens: Sequence[str]) -> float:
    """Harmonic mean of precision and recall of the multiset overlap of two token lists."""
    same = sum((Counter(prediction_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truth: str, all_classes: list[str] | None = None) -> float:
    """Token-level F1 between the normalised prediction and ground truth (see :func:`normalize_answer`).

    Tokens are counted with multiplicity (a ``Counter`` intersection). 0.0 when nothing overlaps.
    """
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def rouge_l(prediction: str, ground_truth: str, all_classes: list[str] | None = None) -> float:
    """ROUGE-L F-measure (longest common token subsequence) from ``rouge_score``, without stemming.

    An empty (or whitespace-only) prediction scores 0.0.
    """
    if not prediction.strip():
        return 0.0
    return float(_ROUGE.score(ground_truth, prediction)["rougeL"].fmeasure)


def classification_accuracy(prediction: str, ground_truth: str, all_classes: list[str] | None = None) -> float:
    """LongBench's class matching (trec).

    The matched classes are those of ``all_classes`` that occur as substrings of the prediction,
    less the ones that are a proper substring of the ground truth (so that the class "Other" does not
    count against a right "Other location"). The score is ``1 / len(matched)`` when the ground truth is
    among them, else 0.0: naming several classes shares the credit.

    LongBench removes those classes while iterating over the same list, which can skip one; here each
    matched class is tested.
    """
    if all_classes is None:
        raise PcompError("classification_accuracy needs all_classes, the list of the dataset's class names")
    matched = [c for c in all_classes if c in prediction]
    matched = [c for c in matched if not (c in ground_truth and c != ground_truth)]
    if ground_truth not in matched:
        return 0.0
    return 1.0 / len(matched)


def _fraction_equal(prediction: str, target: str) -> float:
    """Fraction of the numbers (runs of digits) in ``prediction`` that equal ``target``; 0.0 if none."""
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(n == target for n in numbers) / len(numbers)


def retrieval_accuracy(prediction: str, ground_truth: str, all_classes: list[str] | None = None) -> float:
    """passage_retrieval_en: fraction of the numbers in the prediction that equal the right paragraph number.

    The right number is taken from "Paragraph N" in the ground truth. "Paragraph 3" scores 1.0,
    "Paragraph 3 or 7" scores 0.5.
    """
    found = _PARAGRAPH.search(ground_truth)
    if found is None:
        raise PcompError(f"retrieval_accuracy: ground truth {ground_truth!r} has no 'Paragraph N'")
    return _fraction_equal(prediction, found.group(1))


def count_accuracy(prediction: str, ground_truth: str, all_classes: list[str] | None = None) -> float:
    """passage_count: fraction of the numbers in the prediction that equal the ground truth count."""
    return _fraction_equal(prediction, ground_truth.strip())


def _first_code_line(prediction: str) -> str | None:
    """The first line that is not blank, not a comment (``#``, ``//``) and not a Markdown code fence."""
    for line in prediction.split("\n"):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "//", "```")):
            return line
    return None


def code_edit_similarity(prediction: str, ground_truth: str, all_classes: list[str] | None = None) -> float:
    """lcc, repobench-p: normalised Indel similarity (``rapidfuzz.fuzz.ratio / 100``) of the first line of
    code in the prediction and the ground truth line.

    Blank lines, comment lines (starting with ``#`` or ``//`` after indentation) and Markdown code fences
    are skipped; a prediction with no such line scores 0.0. LongBench skips every line that merely
    *contains* ``#``, ``//`` or a backtick, and compares with fuzzywuzzy's ratio (rounded to whole
    percent), so scores can differ slightly from published ones.
    """
    line = _first_code_line(prediction)
    if line is None:
        return 0.0
    return fuzz.ratio(line, ground_truth) / 100.0


DATASET_METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1,
    "qasper": qa_f1,
    "multifieldqa_en": qa_f1,
    "hotpotqa": qa_f1,
    "2wikimqa": qa_f1,
    "musique": qa_f1,
    "gov_report": rouge_l,
    "qmsum": rouge_l,
    "multi_news": rouge_l,
    "trec": classification_accuracy,
    "triviaqa": qa_f1,
    "samsum": rouge_l,
    "passage_retrieval_en": retrieval_accuracy,
    "passage_count": count_accuracy,
    "lcc": code_edit_similarity,
    "repobench-p": code_edit_similarity,
}


def unknown_dataset_message(dataset: str) -> str:
    """The error text for a dataset without a metric or template: what is supported, and why not Chinese."""
    note = " (the Chinese LongBench datasets are not supported: they need a Chinese tokenizer)"
    if dataset in CHINESE_DATASETS:
        note = " (it is a Chinese LongBench dataset; those need a Chinese tokenizer and are not supported)"
    return f"unknown LongBench dataset {dataset!r}{note}; supported: {', '.join(DATASET_METRICS)}"


def score_prediction(
    dataset: str, prediction: str, answers: Sequence[str], all_classes: list[str] | None = None
) -> float:
    """Score one reply: the best of the dataset's metric over the reference ``answers``.

    For the few-shot datasets (trec, triviaqa, samsum) the prediction is first cut at its first newline
    (after leading newlines), as LongBench does.
    """
    metric = DATASET_METRICS.get(dataset)
    if metric is None:
        raise PcompError(unknown_dataset_message(dataset))
    if not answers:
        raise PcompError(f"score_prediction: no reference answers to score the {dataset} prediction against")
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n", 1)[0]
    return max(metric(prediction, answer, all_classes) for answer in answers)
