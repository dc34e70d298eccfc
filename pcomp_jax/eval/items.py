"""What one prediction is about: an item of a sweep, and how it is answered and scored.

Each kind of item is a class: ``SyntheticItem`` (a task made from a seed at a length and
depth), ``LongBenchItem`` (one LongBench example), ``RulerItem`` (one RULER sample, generated
or read from RULER's files) and ``PerplexityItem`` (one perplexity window). ``item.predict(runner, pipeline)`` answers or scores it with one method's pipeline
and returns the fields of its prediction record (an item that asks a question says what,
``item.question(runner, pipeline)``, so that the runner can answer several in one batch); ``item.context_key()`` says which items
share a context (their P and context), so that it can be read once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

from ..config import ParallelCompConfig
from ..errors import PcompError
from ..ruler import RULER_GENERATOR_VERSION
from ..tasks import GENERATOR_VERSIONS, make_task
from .config import ANSWER_TOKENS, EvalConfig


@dataclasses.dataclass
class Item:
    """One unit of work for a method: ``id`` (unique in a sweep, the key of its prediction
    record) and ``fields`` (what the record repeats of it)."""

    kind: ClassVar[str]
    id: str
    fields: dict

    def context_key(self):
        """Equal for items with the same P and context; None: the context is not shared."""
        return None

    def predict(self, runner, pipeline: ParallelCompConfig) -> dict:
        """The record's fields for this item under ``pipeline`` (``runner``: the model, the
        texts and the shared readings, ``runner.Runner``)."""
        question = self.question(runner, pipeline)
        if question is None:
            raise NotImplementedError
        return question.record(runner.ask(self, question.parts, pipeline, question.max_new_tokens))

    def question(self, runner, pipeline: ParallelCompConfig) -> "Question | None":
        """What the item asks under ``pipeline``, answered by ``answer_parts`` (so that
        several items can be answered as one batch: ``answer_parts_batch``); None for an
        item that is not a question (perplexity)."""
        return None


@dataclasses.dataclass(frozen=True)
class Question:
    """An item's prompt (``parts``), its answer length, and ``record(answer) -> dict``: the
    prediction record's fields from the ``pipeline.Answer``."""

    parts: object  # chunking.PromptParts
    max_new_tokens: int
    record: Callable[[object], dict]


@dataclasses.dataclass
class SyntheticItem(Item):
    """A synthetic task (``tasks.make_task``) at one length, depth and seed."""

    kind: ClassVar[str] = "synthetic"

    def context_key(self):
        return ("synthetic", *(self.fields[k] for k in ("task", "length", "depth", "seed")))

    def question(self, runner, pipeline):
        from ..chunking import encode_parts

        f = self.fields
        task = make_task(f["task"], runner.model.tokenizer, f["length"], f["depth"], f["seed"],
                         text=runner.needle_text() if f["task"] == "needle" else None)
        parts = encode_parts(runner.model.tokenizer, task.context, task.question, pipeline.instruction,
                             pipeline.answer_prefix, pipeline.chat)  # as answer() encodes them

        def record(result) -> dict:
            return {**f, "prediction": result.text, "answer": task.answer, "score": float(task.is_correct(result.text)),
                    "selected_chunks": result.selected_chunks, "context_tokens": result.context_tokens,
                    "generator": GENERATOR_VERSIONS[f["task"]]}

        return Question(parts, runner.config.max_new_tokens or ANSWER_TOKENS[f["task"]], record)


@dataclasses.dataclass
class LongBenchItem(Item):
    """One LongBench example (``fields["example"]``, a ``longbench.LongBenchExample``)."""

    kind: ClassVar[str] = "longbench"

    def context_key(self):
        ex = self.fields["example"]
        return ("longbench", ex.dataset, ex.context)  # the dataset decides the template's P

    def question(self, runner, pipeline):
        from ..longbench import MAX_NEW_TOKENS, encode_prompt, score_example

        ex = self.fields["example"]

        def record(result) -> dict:
            return {"dataset": ex.dataset, "example_id": ex.id, "length": ex.length, "prediction": result.text,
                    "answers": ex.answers, "score": score_example(ex, result.text),
                    "selected_chunks": result.selected_chunks, "context_tokens": result.context_tokens}

        return Question(encode_prompt(runner.model.tokenizer, ex, pipeline.chat),
                        runner.config.max_new_tokens or MAX_NEW_TOKENS[ex.dataset], record)


@dataclasses.dataclass
class RulerItem(Item):
    """One RULER sample (``ruler.RulerSample``): generated (fields ``task``, ``length``,
    ``sample``; ``source`` "generated") or read from a RULER data file (``source`` "file",
    the sample itself in ``fields["example"]``, its file in ``file``). Its prompt is RULER's
    (``RulerSample.prompt_parts``: the pipeline's instruction and answer_prefix are not
    used); its score RULER's (``ruler.score_prediction``, in [0, 1])."""

    kind: ClassVar[str] = "ruler"

    def context_key(self):
        return ("ruler", self.id)  # one sample, one context: shared only by the methods asking it

    def sample(self, runner):
        """The item's ``RulerSample``: read from its file, or generated (``Runner.ruler_sample``)."""
        f = self.fields
        return f["example"] if "example" in f else runner.ruler_sample(f["task"], f["length"], f["sample"])

    def question(self, runner, pipeline):
        from ..ruler import score_prediction

        sample = self.sample(runner)
        parts = sample.prompt_parts(runner.model.tokenizer, pipeline.chat)

        def record(result) -> dict:
            fields = {k: v for k, v in self.fields.items() if k != "example"}
            generator = {"generator": RULER_GENERATOR_VERSION} if fields["source"] == "generated" else {}
            return {**fields, "prediction": result.text, "outputs": list(sample.outputs),
                    "score": score_prediction(sample.task, result.text, sample.outputs),
                    "input_tokens": sample.input_tokens, "selected_chunks": result.selected_chunks,
                    "context_tokens": result.context_tokens, **generator}

        return Question(parts, runner.config.max_new_tokens or sample.tokens_to_generate, record)


@dataclasses.dataclass
class PerplexityItem(Item):
    """One perplexity window: a prefix of ``prefix_len`` tokens and its continuation."""

    kind: ClassVar[str] = "perplexity"

    def predict(self, runner, pipeline):
        from ..perplexity import continuation_nll

        prefix, continuation = runner.ppl_window(self.fields["prefix_len"], self.fields["sample"])
        scored = continuation_nll(runner.model, prefix, continuation, pipeline, runner.config.perplexity.query_len)
        return {**self.fields, "mean_nll": scored.mean_nll, "perplexity": scored.perplexity,
                "tokens": len(scored.token_nll), "selected_chunks": scored.selected_chunks}


def synthetic_items(config: EvalConfig) -> list[Item]:
    return [
        SyntheticItem(f"{task}/L{length}/d{depth:g}/s{seed}",
                      {"task": task, "length": length, "depth": depth, "seed": seed})
        for length in sorted(config.lengths) for task in config.tasks for depth in config.depths for seed in config.seeds
    ]  # shortest first, so that a run cut short has every method on the shorter inputs


def longbench_items(config: EvalConfig) -> list[Item]:
    if config.longbench is None:
        return []
    from ..io import check_readable
    from ..longbench import load_longbench

    check_readable(config.longbench, "longbench file")
    try:
        examples = load_longbench(config.longbench, limit=config.longbench_limit)
    except UnicodeDecodeError as err:
        raise PcompError(f"cannot read longbench file {config.longbench!r}: not UTF-8 text (byte "
                         f"{err.object[err.start]:#04x} at offset {err.start}); give a LongBench JSONL file") from None
    except OSError as err:
        raise PcompError(f"cannot read longbench file {config.longbench!r}: {err.strerror}") from None
    return [LongBenchItem(f"longbench/{ex.dataset}/{ex.id}", {"example": ex, "dataset": ex.dataset})
            for ex in examples]


def ruler_items(config: EvalConfig) -> list[Item]:
    """The generated RULER samples: every task at every length, ``samples`` of each
    (``RulerConfig.samples_at``), shortest first."""
    ruler = config.ruler
    return [RulerItem(f"ruler/{task}/L{length}/s{sample}",
                      {"task": task, "length": length, "sample": sample, "source": "generated"})
            for length in sorted(ruler.lengths) for task in ruler.tasks for sample in range(ruler.samples_at(length))]


def ruler_file_items(config: EvalConfig) -> list[Item]:
    """The samples of RULER's data files (``ruler.data``), by file; an item's id names its
    task, length and the file's content (SHA-256), so a file read again under another path
    resumes, and the same file given twice is read once."""
    from ..io import check_readable
    from ..ruler import file_digest, find_ruler_files, load_ruler_file

    items: dict[str, Item] = {}
    for entry in config.ruler.data:
        for path in find_ruler_files(entry):
            check_readable(path, "RULER data file")
            try:
                samples = load_ruler_file(path, limit=config.ruler.data_limit)
            except UnicodeDecodeError as err:
                raise PcompError(f"cannot read RULER data file {path!r}: not UTF-8 text (byte "
                                 f"{err.object[err.start]:#04x} at offset {err.start}); give a prepare.py JSONL "
                                 "file") from None
            digest = file_digest(path)[:12]
            for number, sample in enumerate(samples, start=1):
                item_id = f"ruler_file/{sample.task}/L{sample.target_length}/{digest}/{number}"
                items.setdefault(item_id, RulerItem(item_id, {
                    "task": sample.task, "length": sample.target_length, "sample": number, "source": "file",
                    "file": path, "example": sample}))
    return list(items.values())


def perplexity_items(config: EvalConfig) -> list[Item]:
    ppl = config.perplexity
    return [PerplexityItem(f"ppl/T{t}/s{s}", {"prefix_len": t, "sample": s})
            for t in sorted(ppl.prefix_lengths) for s in range(ppl.samples)]


def sweep_items(config: EvalConfig) -> list[Item]:
    """Every item of ``config``'s sweep: the synthetic tasks, the LongBench examples, the
    RULER samples (generated, then read from files), the perplexity windows."""
    return (synthetic_items(config) + longbench_items(config) + ruler_items(config) + ruler_file_items(config)
            + perplexity_items(config))
