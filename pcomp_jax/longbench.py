"""LongBench-format data: a JSONL loader, LongBench's prompt templates and answer lengths, and scoring.

A LongBench file (THUDM/LongBench v1, one JSON object a line) has the fields ``context`` (the long
document), ``input`` (the question or, for few-shot and code tasks, the last example to complete),
``answers`` (reference answers), ``all_classes`` (trec's class names, else null), ``length`` (the
context's length in words), ``dataset`` and ``_id``.

The prompt templates (:data:`PROMPT_TEMPLATES`) and answer lengths (:data:`MAX_NEW_TOKENS`) are
LongBench's own (``config/dataset2prompt.json``, ``config/dataset2maxlen.json``), kept verbatim so that
scores are comparable with published ones (including LongBench's "asconcisely" typo in narrativeqa).
Only the English datasets are covered, the ones with a metric in :data:`pcomp_jax.metrics.DATASET_METRICS`.

Our pipeline does not take a single prompt string: it puts an instruction header first, then the
(chunked) context, then the question. :func:`split_prompt` cuts a dataset's template at ``{context}``
into those three parts; concatenated they give exactly the prompt LongBench would build.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from . import metrics
from .errors import PcompError


class LongBenchFormatError(PcompError):
    """A LongBench file or example is malformed or of an unsupported dataset (a ``ValueError``)."""

# LongBench's prompt templates (config/dataset2prompt.json), English datasets. Each has one {context}
# field, and at most one {input} field, after it.
# hotpotqa, 2wikimqa and musique share one template.
_MULTI_PASSAGE_QA = (
    "Answer the question based on the given passages. Only give me the answer and do not output "
    "any other words.\n"
    "\n"
    "The following are given passages.\n"
    "{context}\n"
    "\n"
    "Answer the question based on the given passages. Only give me the answer and do not output "
    "any other words.\n"
    "\n"
    "Question: {input}\n"
    "Answer:"
)

PROMPT_TEMPLATES: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n"
        "\n"
        "Story: {context}\n"
        "\n"
        "Now, answer the question based on the story asconcisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n"
        "\n"
        "Question: {input}\n"
        "\n"
        "Answer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you "
        "can, using a single phrase or sentence if possible. If the question cannot be answered "
        "based on the information in the article, write \"unanswerable\". If the question is a yes/no "
        "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n"
        "\n"
        "Article: {context}\n"
        "\n"
        " Answer the question based on the above article as concisely as you can, using a single "
        "phrase or sentence if possible. If the question cannot be answered based on the information "
        "in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", "
        "\"no\", or \"unanswerable\". Do not provide any explanation.\n"
        "\n"
        "Question: {input}\n"
        "\n"
        "Answer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n"
        "\n"
        "{context}\n"
        "\n"
        "Now, answer the following question based on the above text, only give me the answer and do "
        "not output any other words.\n"
        "\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "hotpotqa": _MULTI_PASSAGE_QA,
    "2wikimqa": _MULTI_PASSAGE_QA,
    "musique": _MULTI_PASSAGE_QA,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n"
        "\n"
        "Report:\n"
        "{context}\n"
        "\n"
        "Now, write a one-page summary of the report.\n"
        "\n"
        "Summary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer "
        "the query in one or more sentences.\n"
        "\n"
        "Transcript:\n"
        "{context}\n"
        "\n"
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n"
        "\n"
        "Query: {input}\n"
        "Answer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n"
        "\n"
        "News:\n"
        "{context}\n"
        "\n"
        "Now, write a one-page summary of all the news.\n"
        "\n"
        "Summary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n"
        "\n"
        "{context}\n"
        "{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output "
        "any other words. The following are some examples.\n"
        "\n"
        "{context}\n"
        "\n"
        "{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n"
        "\n"
        "{context}\n"
        "\n"
        "{input}"
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n"
        "\n"
        "{context}\n"
        "\n"
        "The following is an abstract.\n"
        "\n"
        "{input}\n"
        "\n"
        "Please enter the number of the paragraph that the abstract is from. The answer format must "
        "be like \"Paragraph 1\", \"Paragraph 2\", etc.\n"
        "\n"
        "The answer is: "
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there are "
        "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
        "total?\n"
        "\n"
        "{context}\n"
        "\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output "
        "format should only contain the number, such as 1, 2, 3, and so on.\n"
        "\n"
        "The final answer is: "
    ),
    "lcc": (
        "Please complete the code given below. \n"
        "{context}Next line of code:\n"
    ),
    "repobench-p": (
        "Please complete the code given below. \n"
        "{context}{input}Next line of code:\n"
    ),
}

# LongBench's answer lengths (max new tokens) per dataset, from config/dataset2maxlen.json.
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_retrieval_en": 32,
    "passage_count": 32,
    "lcc": 64,
    "repobench-p": 64,
}

# Datasets whose prompt LongBench's pred.py gives to chat models as is, without the chat template
# (few-shot and code completion: the model continues the text).
RAW_PROMPT_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})

_CONTEXT_FIELD = "{context}"
_INPUT_FIELD = "{input}"


@dataclasses.dataclass
class LongBenchExample:
    """One LongBench example; ``dataset`` is the name of its template and metric."""

    context: str
    input: str
    answers: list[str]
    all_classes: list[str] | None
    length: int
    dataset: str
    id: str


@dataclasses.dataclass
class LongBenchPrompt:
    """A LongBench prompt in the three parts the pipeline takes, in this order.

    ``instruction``: the template's text before ``{context}`` (the task description);
    ``context``: the example's context, verbatim (the part that gets chunked);
    ``question``: the template's text after ``{context}``, with ``{input}`` filled in.
    ``instruction + context + question`` is the prompt LongBench builds (see :attr:`text`).
    """

    instruction: str
    context: str
    question: str

    @property
    def text(self) -> str:
        """The whole prompt, as one string."""
        return self.instruction + self.context + self.question


def canonical_dataset(name: str) -> str:
    """The template/metric name of a dataset: LongBench-E's ``<name>_e`` files score like ``<name>``."""
    if name not in PROMPT_TEMPLATES and name.endswith("_e") and name[:-2] in PROMPT_TEMPLATES:
        return name[:-2]
    return name


def _check_dataset(name: str, where: str) -> str:
    """``name`` made canonical; a ValueError naming ``where`` and the supported datasets if it has no template."""
    canonical = canonical_dataset(name)
    if canonical not in PROMPT_TEMPLATES:
        raise LongBenchFormatError(f"{where}: {metrics.unknown_dataset_message(name)}")
    return canonical


def _field(record: dict[str, Any], name: str, where: str) -> Any:
    """``record[name]``, or a ValueError naming the missing field."""
    if name not in record:
        present = ", ".join(sorted(record)) or "none"
        raise LongBenchFormatError(f"{where}: missing field {name!r} (fields present: {present})")
    return record[name]


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _parse_record(record: Any, where: str, line_no: int, dataset: str | None) -> LongBenchExample | None:
    """One decoded line as an example; None when ``dataset`` is given and the line is of another dataset."""
    if not isinstance(record, dict):
        raise LongBenchFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    line_dataset = record.get("dataset")
    if line_dataset is not None and not isinstance(line_dataset, str):
        raise LongBenchFormatError(f"{where}: field 'dataset' must be a string, got {type(line_dataset).__name__}")
    if dataset is not None:
        if line_dataset and canonical_dataset(line_dataset) != dataset:
            return None
        name = dataset
    elif line_dataset:
        name = _check_dataset(line_dataset, where)
    else:
        raise LongBenchFormatError(f"{where}: missing field 'dataset' (or pass dataset= to load_longbench)")

    context = _field(record, "context", where)
    question = _field(record, "input", where)
    answers = _field(record, "answers", where)
    for field, value in (("context", context), ("input", question)):
        if not isinstance(value, str):
            raise LongBenchFormatError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not _is_str_list(answers) or not answers:
        raise LongBenchFormatError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r:.80}")
    all_classes = record.get("all_classes")
    if all_classes is not None and not _is_str_list(all_classes):
        raise LongBenchFormatError(
            f"{where}: field 'all_classes' must be a list of strings or null, got {all_classes!r:.80}"
        )
    if metrics.DATASET_METRICS[name] is metrics.classification_accuracy and not all_classes:
        raise LongBenchFormatError(f"{where}: a {name} example needs 'all_classes', the list of class names")
    length = record.get("length")
    if length is None:
        length = len(context.split())
    elif isinstance(length, bool) or not isinstance(length, int):
        raise LongBenchFormatError(f"{where}: field 'length' must be an integer, got {length!r:.80}")
    example_id = record.get("_id")
    if example_id is None:
        example_id = str(line_no)
    elif not isinstance(example_id, str):
        raise LongBenchFormatError(f"{where}: field '_id' must be a string, got {type(example_id).__name__}")
    return LongBenchExample(
        context=context,
        input=question,
        answers=list(answers),
        all_classes=None if all_classes is None else list(all_classes),
        length=length,
        dataset=name,
        id=example_id,
    )


def load_longbench(
    path: str | os.PathLike[str], dataset: str | None = None, limit: int | None = None
) -> list[LongBenchExample]:
    """Read a LongBench JSONL file.

    Each line's ``dataset`` field names its template and metric. With ``dataset`` given, only the lines
    of that dataset are kept (lines without a ``dataset`` field are taken to be of it), so one file may
    hold several datasets. LongBench-E names (``hotpotqa_e``) count as the base dataset. ``limit`` keeps
    the first ``limit`` examples. Blank lines are skipped; ``length`` defaults to the context's word count
    and ``id`` (the ``_id`` field) to the line number (1-based, as a string).

    Raises ValueError, naming the file and the line, for invalid JSON, a missing or ill-typed field,
    an ``_id`` that repeats within its dataset, or a dataset without a template (listing the
    supported ones); and for a file with no examples.
    """
    if dataset is not None:
        dataset = _check_dataset(dataset, f"load_longbench({os.fspath(path)!r})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LongBenchFormatError(f"limit must be a positive integer or None, got {limit!r}")
    examples: list[LongBenchExample] = []
    seen: set[str] = set()
    first_line: dict[tuple[str, str], int] = {}  # (dataset, id) -> the line it was first seen on
    nonblank = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            nonblank += 1
            where = f"{os.fspath(path)}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LongBenchFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(record, dict) and isinstance(record.get("dataset"), str):
                seen.add(record["dataset"])
            example = _parse_record(record, where, line_no, dataset)
            if example is not None:
                key = (example.dataset, example.id)
                if key in first_line:
                    raise LongBenchFormatError(f"{where}: '_id' {example.id!r} of dataset {example.dataset} repeats "
                                               f"line {first_line[key]}; every example needs its own id")
                first_line[key] = line_no
                examples.append(example)
                if limit is not None and len(examples) >= limit:
                    break
    if nonblank == 0:
        raise LongBenchFormatError(f"{os.fspath(path)}: empty file, no LongBench examples in it")
    if not examples:
        present = ", ".join(sorted(seen)) or "none named"
        raise LongBenchFormatError(f"{os.fspath(path)}: no {dataset} examples (datasets in the file: {present})")
    return examples


def split_prompt(example: LongBenchExample) -> LongBenchPrompt:
    """Cut the example's LongBench prompt into (instruction, context, question) for the pipeline.

    ``instruction`` is the template's text before ``{context}``, ``context`` the example's context, and
    ``question`` the template's text after ``{context}`` with ``{input}`` filled in. Templates without
    ``{input}`` (gov_report, multi_news, passage_count, lcc) ignore the example's input, as LongBench does.
    """
    template = PROMPT_TEMPLATES[_check_dataset(example.dataset, f"example {example.id!r}")]
    instruction, after = template.split(_CONTEXT_FIELD, 1)
    return LongBenchPrompt(
        instruction=instruction,
        context=example.context,
        question=after.replace(_INPUT_FIELD, example.input),
    )


def score_example(example: LongBenchExample, prediction: str) -> float:
    """The LongBench score in [0, 1] of ``prediction`` for ``example`` (best over its answers)."""
    return metrics.score_prediction(example.dataset, prediction, example.answers, example.all_classes)


def encode_prompt(tokenizer, example: LongBenchExample, chat: bool = True):
    """The example's LongBench prompt as ``chunking.PromptParts`` (P, context, Q token ids).

    The template's head, the context and the filled-in tail are joined verbatim (no
    ``Question:`` label, nothing stripped), inside the chat template when ``chat`` and the
    dataset is not one LongBench prompts without it (``RAW_PROMPT_DATASETS``).
    """
    from .chunking import encode_parts

    prompt = split_prompt(example)
    use_chat = chat and example.dataset not in RAW_PROMPT_DATASETS
    return encode_parts(tokenizer, prompt.context, prompt.question, prompt.instruction, "", use_chat, verbatim=True)
