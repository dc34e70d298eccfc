"""Running a sweep: the items, one prediction per method and item, the resumable files.

``evaluate(config)`` runs (or resumes) every method on every item and writes the results;
see the package docstring for the files.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from .._startup import raise_if_interrupted
from ..config import ConfigError, ParallelCompConfig, to_dict
from ..distributed import is_main, main_decides
from ..sharding import make_mesh
from ..errors import PcompError
from ..io import read_text
from ..ruler import RULER_GENERATOR_VERSION
from ..tasks import GENERATOR_VERSIONS
from .columns import MethodSpec
from .config import EvalConfig
from .items import Item, sweep_items
from .outputs import check_outputs, record_outputs, summary_names
from .plots import plot_heatmaps, plot_perplexity, plot_ruler_heatmaps
from .summary import method_metrics, summary_markdown


# ---- running one item --------------------------------------------------------------------

RULER_SAMPLES_KEPT = 64  # generated RULER samples a runner keeps (Runner.ruler_sample)


class Runner:
    """Holds the model and the texts; ``run(item, pipeline)`` returns one prediction record."""

    def __init__(self, model, config: EvalConfig):
        self.model, self.config = model, config
        self._needle_text = None
        self._ruler_text = None
        self._ruler_samples: collections.OrderedDict = collections.OrderedDict()  # the latest generated samples
        self._ppl_windows = None
        self._prefills: tuple[str, dict] = ("", {})  # (item id, stage-1 results its methods share)
        self.shared: set = set()  # (context key, reading key) asked more than once in this run (share_readings)
        self._documents: tuple[object, dict] = (None, {})  # (context key, {reading key: Document}) for one context
        self.readings, self.document_answers = 0, 0  # documents read; answers asked of them
        self._plans: dict = {}  # pipeline config -> its plans.Plan for this model

    def plan(self, pipeline: ParallelCompConfig):
        """``plans.plan(model, pipeline)``, resolved once per pipeline config."""
        from ..plans import plan

        if pipeline not in self._plans:
            self._plans[pipeline] = plan(self.model, pipeline)
        return self._plans[pipeline]

    def prefills(self, item: Item) -> dict:
        """Stage-1 results shared by the methods that run ``item`` one after another
        (``pipeline.run_plan``'s ``prefills``, keyed by ``Plan.stage1_key``); kept for one item at a time."""
        if self._prefills[0] != item.id:
            self._prefills = (item.id, {})
        return self._prefills[1]

    def share_readings(self, pending: list[tuple[MethodSpec, Item]], config: EvalConfig) -> list:
        """Notes which (context, reading) pairs of ``pending`` are asked more than once, so that
        their context is read once (``document.read_parts``) and each asked; returns ``pending``
        with the items of one context next to each other (otherwise in order)."""
        keys = [(item.context_key(), self.reading_key(spec.pipeline(config.pipeline))) for spec, item in pending]
        seen: dict = {}
        for key in keys:
            seen[key] = seen.get(key, 0) + 1
        self.shared = {key for key, n in seen.items() if n > 1 and None not in key}
        first = {}
        for i, (context, _) in enumerate(keys):
            first.setdefault(context, i)
        order = sorted(range(len(pending)), key=lambda i: (first[keys[i][0]] if keys[i][0] is not None else i, i))
        return [pending[i] for i in order]

    def reading_key(self, pipeline: ParallelCompConfig):
        """What decides a document's reading under ``pipeline`` (``document.READ_FIELDS``,
        whether the method is chunked, the devices); None where no document applies (a
        one-row method, or one a document refuses: ``document.reading_refusal``)."""
        from ..document import READ_FIELDS, reading_refusal, reuses_chunk_caches

        plan_ = self.plan(pipeline)
        if not reuses_chunk_caches(plan_.method) or reading_refusal(plan_) is not None:
            return None
        return (*(getattr(pipeline, f) for f in READ_FIELDS), plan_.method.chunked, pipeline.num_devices,
                pipeline.model_parallel)

    def shares_reading(self, item: Item, pipeline: ParallelCompConfig) -> bool:
        """Whether ``item``'s reading under ``pipeline`` is shared with other methods or items
        of the run (``share_readings``): such an item is answered on its own, from the one
        reading (cheaper than a batch that runs stage 1 again for each method)."""
        return (item.context_key(), self.reading_key(pipeline)) in self.shared

    def ask(self, item: Item, parts, pipeline: ParallelCompConfig, max_new_tokens: int):
        """The answer to ``parts``: from the document of the item's context when its reading
        is shared (``share_readings``) and the document can answer this prompt
        (``Document.question_refusal``), else ``answer_parts`` (the same answer)."""
        from ..document import read_parts
        from ..pipeline import answer_parts

        key = (item.context_key(), self.reading_key(pipeline))
        if key in self.shared:  # shares_reading
            if self._documents[0] != key[0]:
                self._documents = (key[0], {})  # one context at a time: its documents only
            docs = self._documents[1]
            if key[1] not in docs:
                docs[key[1]] = read_parts(self.model, parts, pipeline, host=jax.default_backend() != "cpu")
                self.readings += 1
            if docs[key[1]].question_refusal(parts, self.plan(pipeline)) is None:
                self.document_answers += 1
                return docs[key[1]].ask_parts([parts], max_new_tokens, pipeline)[0]
        return answer_parts(self.model, parts, pipeline, max_new_tokens, prefills=self.prefills(item))

    def needle_text(self) -> str:
        if self._needle_text is None:
            self._needle_text = read_text(self.config.text_file, "the needle task's")
        return self._needle_text

    def ruler_text(self) -> str:
        """The essay of RULER's essay-haystack tasks (``config.ruler.text_file``), read once."""
        if self._ruler_text is None:
            self._ruler_text = read_text(self.config.ruler.text_file, "the RULER essay haystack's")
        return self._ruler_text

    def ruler_sample(self, task: str, length: int, sample: int):
        """Sample ``sample`` of RULER task ``task`` at ``length`` tokens (``ruler.generate_sample``
        with the run's seed and the model's tokenizer); the latest ``RULER_SAMPLES_KEPT`` are
        kept, so that the methods asking one sample in turn make it once."""
        from ..ruler import generate_sample, uses_essay

        key = (task, length, sample)
        if key not in self._ruler_samples:
            text = self.ruler_text() if uses_essay(task) else None
            self._ruler_samples[key] = generate_sample(task, self.model.tokenizer, length, sample,
                                                       self.config.ruler.seed, text)
            while len(self._ruler_samples) > RULER_SAMPLES_KEPT:
                self._ruler_samples.popitem(last=False)
        self._ruler_samples.move_to_end(key)
        return self._ruler_samples[key]

    def ppl_window(self, prefix_len: int, sample: int):
        """(prefix, continuation) token ids; every prefix length shares the continuations."""
        from ..perplexity import text_windows

        if self._ppl_windows is None:
            ppl = self.config.perplexity
            text = read_text(ppl.text_file, "the perplexity")
            ids = np.asarray(self.model.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
            self._ppl_windows = text_windows(ids, ppl.prefix_lengths, ppl.continuation, ppl.samples)
        return self._ppl_windows[prefix_len][sample]

    def run(self, item: Item, pipeline: ParallelCompConfig) -> dict:
        start = time.perf_counter()
        record = self._record(item)
        with _recorded_failure(record):
            record.update(item.predict(self, pipeline))
        return self._timed(record, time.perf_counter() - start)

    def run_batch(self, items: list[Item], pipeline: ParallelCompConfig) -> list[dict]:
        """``[run(item, pipeline) for item in items]``, the items that ask a question
        (``Item.question``) and want the same answer length answered as one batch
        (``document.answer_parts_batch``); the others, and every item of a batch that fails
        (an input too long for the method, out of memory), run one by one, so that a
        failure is recorded against its own item. A batch's records share its seconds
        (``seconds``: the batch's time over its size; ``batch``: its size)."""
        from ..document import answer_parts_batch

        records: dict[int, dict] = {}
        batches: dict[int, list[tuple[int, object]]] = {}
        for i, item in enumerate(items):
            try:
                question = item.question(self, pipeline)
            except PcompError:  # recorded by run(), one by one
                question = None
            if question is None or len(items) == 1:
                records[i] = self.run(item, pipeline)
            else:
                batches.setdefault(question.max_new_tokens, []).append((i, question))
        for max_new_tokens, members in batches.items():
            start = time.perf_counter()
            try:
                answers = answer_parts_batch(self.model, [q.parts for _, q in members], pipeline, max_new_tokens)
            except ConfigError:
                raise
            except (PcompError, jax.errors.JaxRuntimeError) as err:
                if isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" not in str(err):
                    raise
                records.update((i, self.run(items[i], pipeline)) for i, _ in members)
                continue
            seconds = (time.perf_counter() - start) / len(members)
            for (i, question), result in zip(members, answers):
                record = self._record(items[i])
                with _recorded_failure(record):
                    record.update(question.record(result))
                records[i] = {**self._timed(record, seconds), "batch": len(members)}
        return [records[i] for i in range(len(items))]

    @staticmethod
    def _record(item: Item) -> dict:
        return {"id": item.id, "kind": item.kind, **{k: v for k, v in item.fields.items() if k != "example"}}

    @staticmethod
    def _timed(record: dict, seconds: float) -> dict:
        record["seconds"] = round(seconds, 2)
        record["device"] = jax.devices()[0].device_kind  # where the seconds (and the numerics) come from
        return record


@contextlib.contextmanager
def _recorded_failure(record: dict):
    """An input that does not suit the method (too long, out of memory) is recorded in
    ``record`` and scored 0, and the sweep goes on; a setting (``ConfigError``) stops it."""
    try:
        yield
    except ConfigError:  # a setting, not this input: stop (checked up front, so rare)
        raise
    except PcompError as err:  # this input does not suit this method (e.g. too long): recorded, scored 0
        record.update({"error": f"{type(err).__name__}: {err}", "score": 0.0})
    except jax.errors.JaxRuntimeError as err:  # out of memory at this length: recorded, the sweep goes on
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        record.update({"error": f"out of memory: {str(err).splitlines()[0]}", "score": 0.0})


def batches_of(pending: list[tuple[MethodSpec, Item]], size: int, alone=lambda spec, item: False):
    """``(spec, items)`` batches of at most ``size`` items of one method, in the order of
    ``pending``: a method's batch is run when it is full (or at the end), so that methods
    still take turns on the shortest inputs first. ``size`` 1: ``pending`` one pair at a
    time. A pair for which ``alone(spec, item)`` holds is a batch of its own, in its place."""
    waiting: dict[str, tuple[MethodSpec, list[Item]]] = {}
    for spec, item in pending:
        if alone(spec, item):
            yield spec, [item]
            continue
        _, items = waiting.setdefault(spec.name, (spec, []))
        items.append(item)
        if len(items) == size:
            yield waiting.pop(spec.name)
    yield from waiting.values()


def is_current(record: dict) -> bool:
    """Whether a finished record was made from the inputs an item has now: a synthetic task's
    record names its generator's version (``tasks.GENERATOR_VERSIONS``; none: version 1), a
    generated RULER sample's ``ruler.RULER_GENERATOR_VERSION``."""
    if record.get("kind") == "ruler" and record.get("source") == "generated":
        return record.get("generator", 1) == RULER_GENERATOR_VERSION
    if record.get("kind") != "synthetic" or record.get("task") not in GENERATOR_VERSIONS:
        return True
    return record.get("generator", 1) == GENERATOR_VERSIONS[record["task"]]


def current_records(path: str, repair: bool = True) -> tuple[dict[str, dict], int]:
    """``read_predictions`` without the records of outdated task generators (their items
    run again), and how many were left out."""
    done = read_predictions(path, repair)
    current = {i: r for i, r in done.items() if is_current(r)}
    return current, len(done) - len(current)


# ---- files: append-only predictions, resumable ---------------------------------------------


def read_predictions(path: str, repair: bool = True) -> dict[str, dict]:
    """Finished records by id. A last line cut short by a killed run is ignored (and, with
    ``repair``, cut from the file, so that appends start on a fresh line)."""
    done = {}
    if not os.path.exists(path):
        return done
    if repair:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
                print(f"warning: {path} ended in a record cut short (an interrupted run?); that item runs again",
                      file=sys.stderr)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for number, line in enumerate(lines[:-1], 1):  # the text after the last newline is not a finished record
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):  # a damaged line (not UTF-8, not JSON) runs again
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            print(f"warning: {path}:{number} is not a complete prediction record (an interrupted or foreign "
                  "write?); it is ignored and its item runs again", file=sys.stderr)
            continue
        done[record["id"]] = record
    return done


def append_record(path: str, record: dict) -> None:
    """Appends one JSON line and forces it to disk, so a killed run loses only the item in flight."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def method_settings(config: EvalConfig, spec: MethodSpec, text_sha256: str | None = None,
                    ruler_text_sha256: str | None = None) -> dict:
    """What makes a method's predictions comparable across resumed runs. text_sha256,
    ruler_text_sha256: the needle text's and RULER's essay's ``text_digest`` (read once per
    run by the caller)."""
    from ..checkpoints import auto_dtype

    dtype = auto_dtype() if config.dtype == "auto" else config.dtype  # what runs decides, not the word "auto"
    settings = {"model": config.model, "dtype": dtype, "max_new_tokens": config.max_new_tokens,
                "pipeline": to_dict(spec.pipeline(config.pipeline))}
    if "needle" in config.tasks:
        settings["text_file"] = config.text_file
        settings["text_sha256"] = text_sha256 or text_digest(config.text_file)  # the text decides, not its path
    if config.perplexity.prefix_lengths:  # the lengths themselves are in the item ids
        settings["perplexity"] = {k: v for k, v in to_dict(config.perplexity).items() if k != "prefix_lengths"}
    if config.longbench is not None:
        settings["longbench"] = os.path.abspath(config.longbench)
    if config.ruler.tasks:  # the generated samples' seed and essay (RULER files: their content is in the ids)
        settings["ruler_seed"] = config.ruler.seed
        if uses_essay_text(config):
            settings["ruler_text_sha256"] = ruler_text_sha256 or text_digest(config.ruler.text_file,
                                                                             "the RULER essay haystack's")
    return settings


def uses_essay_text(config: EvalConfig) -> bool:
    """Whether a generated RULER task of ``config`` hides its needles in the essay text."""
    from ..ruler import uses_essay

    return any(uses_essay(task) for task in config.ruler.tasks)


def text_digest(path: str | None, purpose: str = "the needle task's") -> str:
    """SHA-256 of a text (None: the bundled text), as read for the needles; ``purpose`` names it in errors."""
    return hashlib.sha256(read_text(path, purpose).encode("utf-8")).hexdigest()


def figure_tasks(config: EvalConfig) -> tuple[str, ...]:
    """The names the sweep's heatmaps are made for (``heatmap_<name>.png``): the synthetic
    tasks, ``ruler`` and ``ruler_file`` when it has RULER's tasks."""
    ruler = ("ruler",) if config.ruler.tasks else ()
    return (*config.tasks, *ruler, *(("ruler_file",) if config.ruler.data else ()))


# Pipeline fields added after results may exist whose value here reproduces what runs made
# before them did (an option that is off): a record without them still resumes.
NEUTRAL_PIPELINE_FIELDS = {"chunk_overlap": 0, "merge_layout": "parallel", "chunk_order": "document",
                           "chunk_score_margin": None, "chunk_answers": "together", "stage_eviction": False,
                           "decode_eviction": False, "model_parallel": 1}


def _with_neutral_fields(old: dict, new: dict) -> dict:
    """``old`` settings with the neutral pipeline fields it lacks set as in ``new`` when
    ``new`` has their neutral value."""
    if not isinstance(old.get("pipeline"), dict) or not isinstance(new.get("pipeline"), dict):
        return old
    added = {k: v for k, v in NEUTRAL_PIPELINE_FIELDS.items() if k not in old["pipeline"] and new["pipeline"].get(k) == v}
    return {**old, "pipeline": {**old["pipeline"], **added}}


def check_or_write_settings(directory: str, settings: dict) -> None:
    """Refuses to resume a method directory whose results came from other settings.

    Only settings both runs have are compared: adding a part to a sweep (the needle task and
    its text, perplexity, a LongBench file) resumes, and the record keeps every part seen.
    The needle's text is compared by its digest where both records have one (its path
    where the older record has none), and the record then keeps the new path.
    Pipeline options added since the results were made resume when they are off
    (``NEUTRAL_PIPELINE_FIELDS``)."""
    path = os.path.join(directory, "settings.json")
    normal = json.loads(json.dumps(settings))
    predictions = os.path.join(directory, "predictions.jsonl")
    has_results = os.path.exists(predictions) and os.path.getsize(predictions) > 0
    if os.path.exists(path) and has_results:
        with open(path, encoding="utf-8") as f:
            old = _with_neutral_fields(json.load(f), normal)
        compared = set(old) & set(normal)
        if "text_sha256" in compared:  # the same text under another path (another machine) resumes
            compared.discard("text_file")
        changed = sorted(k for k in compared if old[k] != normal[k])
        if changed:
            raise ConfigError(
                f"{directory} holds results made with other settings ({', '.join(changed)} differ); "
                "use another output_dir or method name, or delete that directory to start it again"
            )
        normal = {**old, **normal}  # parts added since (a needle text, perplexity, LongBench) join the record
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(normal, f, indent=1)


# ---- the run -------------------------------------------------------------------------------


def check_method_fits(model, pipeline: ParallelCompConfig, name: str) -> None:
    """The checks ``answer`` makes of the settings alone (calibration against the method and
    the model's depth, the attention backend), made once before any item runs."""
    from ..plans import plan

    try:
        plan(model, pipeline)
    except ConfigError as err:
        raise ConfigError(f"method {name!r}: {err}") from None


def write_results(config: EvalConfig, items: list[Item], done: dict[str, dict], window: int | None) -> dict[str, dict]:
    """Writes every method's ``metrics.json``, the sweep's summary (``summary.md``/``.json``,
    or its own name beside another sweep's: ``eval.outputs``) and the plots; returns the metrics."""
    metrics = {}
    for spec in config.methods:
        wanted = {item.id for item in items if spec.runs(item)}
        metrics[spec.name] = method_metrics([r for i, r in done[spec.name].items() if i in wanted])
        with open(os.path.join(config.output_dir, spec.name, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics[spec.name], f, indent=1)
    methods = [spec.name for spec in config.methods]
    names = summary_names(config.output_dir, methods)
    check_outputs(config.output_dir, names, figure_tasks(config))
    with open(os.path.join(config.output_dir, f"{names.stem}.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(config.output_dir, f"{names.stem}.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(metrics))
    written = [f"{names.stem}.json", f"{names.stem}.md"]
    written += [os.path.basename(p) for p in plot_heatmaps(metrics, config.output_dir, names.suffix)]
    written += [os.path.basename(p) for p in plot_ruler_heatmaps(metrics, config.output_dir, names.suffix)]
    plot = plot_perplexity(metrics, config.output_dir, window, names.suffix)
    written += [os.path.basename(plot)] if plot else []
    record_outputs(config.output_dir, names, methods, written)
    return metrics


def check_needle_text_fits(model, config: EvalConfig) -> None:
    """Refuses (``ConfigError``) before any item runs when a needle length asks for more
    tokens than the needle text has: a setup error, never a score."""
    if "needle" not in config.tasks or model.tokenizer is None:
        return
    from ..tasks import count_tokens

    available = count_tokens(model.tokenizer, read_text(config.text_file, "the needle task's"))
    too_long = [n for n in config.lengths if n > available]
    if too_long:
        text = config.text_file or "the bundled text"
        raise ConfigError(f"needle lengths {too_long} exceed the {available} tokens of {text}; use lengths up to "
                          f"{available}, or a longer text_file")


def check_ruler_lengths(runner: Runner, config: EvalConfig) -> None:
    """Refuses (``ConfigError``) before any item runs when a RULER task cannot be made at the
    shortest of ``ruler.lengths`` (its template alone is longer) or at the longest (cwe past
    its word list): a setup error, never a score. The samples made are kept for the run."""
    from ..ruler import RULER_TASKS

    if not config.ruler.tasks or runner.model.tokenizer is None:
        return
    for task in config.ruler.tasks:
        shortest, longest = min(config.ruler.lengths), max(config.ruler.lengths)
        bounded = RULER_TASKS[task].family == "common_words_extraction"  # the task with a longest length
        for length in [shortest] + ([longest] if bounded and longest != shortest else []):
            try:
                runner.ruler_sample(task, length, 0)
            except PcompError as err:
                raise ConfigError(f"ruler: {err}") from None


def check_own_outputs(config: EvalConfig) -> None:
    """Refuses (``ConfigError``) before anything runs when the sweep's summary would replace a
    file in ``output_dir`` that the runner did not write."""
    names = summary_names(config.output_dir, [spec.name for spec in config.methods])
    check_outputs(config.output_dir, names, figure_tasks(config))


def summarize(config: EvalConfig) -> dict[str, dict]:
    """Rewrites the metrics, summary and plots from the predictions already in
    ``config.output_dir`` (nothing runs, no model loads): e.g. one table for a sweep run in
    parts with ``--set lengths=[...]``. Items not run show as "-"."""
    items = sweep_items(config)
    missing = [spec.name for spec in config.methods if not os.path.isdir(os.path.join(config.output_dir, spec.name))]
    if missing:
        raise ConfigError(f"no results of method(s) {', '.join(missing)} in {config.output_dir}/; run them first")
    check_own_outputs(config)
    done = {spec.name: current_records(os.path.join(config.output_dir, spec.name, "predictions.jsonl"), repair=False)[0]
            for spec in config.methods}  # a running sweep may be appending: read, never cut
    return write_results(config, items, done, None)


def evaluate(config: EvalConfig, model=None, progress: bool = True) -> dict[str, dict]:
    """Runs (or resumes) the whole sweep; returns the metrics per method and writes the files."""
    items = sweep_items(config)
    if not items:
        raise ConfigError("nothing to evaluate: give tasks (with lengths and depths), longbench, ruler.tasks "
                          "(with ruler.lengths), ruler.data or perplexity.prefix_lengths")
    from ..plans import check_settings

    for spec in config.methods:  # what needs no model, before any work
        try:
            check_settings(spec.pipeline(config.pipeline))
        except ConfigError as err:
            raise ConfigError(f"method {spec.name!r}: {err}") from None
    digest = text_digest(config.text_file) if "needle" in config.tasks else None  # fails before any work
    ruler_digest = (text_digest(config.ruler.text_file, "the RULER essay haystack's") if uses_essay_text(config)
                    else None)
    if config.perplexity.prefix_lengths:
        read_text(config.perplexity.text_file, "the perplexity")
    refusal = None
    if is_main():  # only process 0 reads and writes the result files
        try:
            os.makedirs(config.output_dir, exist_ok=True)
            check_own_outputs(config)  # a file of the user's is never replaced
            for spec in config.methods:  # settings of every method are checked before anything runs
                check_or_write_settings(os.path.join(config.output_dir, spec.name),
                                        method_settings(config, spec, digest, ruler_digest))
        except ConfigError as err:
            refusal = err
        except (OSError, ValueError) as err:  # an unwritable output_dir, a corrupt settings.json
            refusal = ConfigError(f"cannot use {config.output_dir}: {err}")
    if not main_decides(np.array(refusal is None)):
        raise refusal or ConfigError("process 0 refused the run's settings (see its output)")
    if model is None:
        from ..checkpoints import load_model

        mesh = make_mesh(config.pipeline.num_devices, config.pipeline.model_parallel)
        model = load_model(config.model, dtype=config.dtype, mesh=mesh)  # an orbax directory: restored onto it
    window = getattr(model.config, "window", None)
    if config.max_new_tokens is not None and window is not None and config.max_new_tokens >= window:
        raise ConfigError(f"max_new_tokens={config.max_new_tokens} does not fit in the model's window of {window} "
                          "tokens next to a question; use fewer")
    for spec in config.methods:
        check_method_fits(model, spec.pipeline(config.pipeline), spec.name)
    check_needle_text_fits(model, config)
    done, outdated = {}, 0
    for spec in config.methods:
        done[spec.name], stale = (current_records(os.path.join(config.output_dir, spec.name, "predictions.jsonl"))
                                  if is_main() else ({}, 0))
        outdated += stale
    if outdated and is_main():
        print(f"{outdated} finished predictions were made with an older task generator "
              "(tasks.GENERATOR_VERSIONS); their items run again", file=sys.stderr)
    wanted = [(spec, item) for item in items for spec in config.methods if spec.runs(item)]
    finished = main_decides(np.array([item.id in done[spec.name] for spec, item in wanted], bool))
    pending = [pair for pair, was_done in zip(wanted, finished) if not was_done]
    runner = Runner(model, config)
    if config.perplexity.prefix_lengths:  # a text too short for the windows: a setup error, before any item
        try:
            runner.ppl_window(min(config.perplexity.prefix_lengths), 0)
        except PcompError as err:
            raise ConfigError(f"perplexity: {err}; use shorter prefix_lengths or a longer text_file") from None
    check_ruler_lengths(runner, config)
    pending = runner.share_readings(pending, config)  # a context read once for the methods and items sharing it
    skipped = len(wanted) - len(pending)
    if skipped and is_main():
        print(f"resuming: {skipped} finished predictions kept, {len(pending)} to run", file=sys.stderr)
    bar = tqdm(total=len(pending), desc="eval", unit="item", disable=not (progress and is_main()))
    try:
        shares = lambda spec, item: runner.shares_reading(item, spec.pipeline(config.pipeline))
        for spec, batch in batches_of(pending, config.batch_size, alone=shares):
            raise_if_interrupted()  # a Ctrl-C that Python dropped stops the sweep between batches
            bar.set_postfix_str(f"{spec.name} {batch[0].id}" + (f" +{len(batch) - 1}" if len(batch) > 1 else ""))
            for item, record in zip(batch, runner.run_batch(batch, spec.pipeline(config.pipeline))):
                record["method"] = spec.name
                if is_main():
                    append_record(os.path.join(config.output_dir, spec.name, "predictions.jsonl"), record)
                done[spec.name][item.id] = record
            bar.update(len(batch))
    finally:  # metrics, summary and plots of what is finished, also when a run stops early
        bar.close()
        window = getattr(model.config, "window", None)
        metrics = write_results(config, items, done, window) if is_main() else {}
    return metrics
