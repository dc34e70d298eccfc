"""Evaluation runner: every method side by side on synthetic tasks, LongBench data and perplexity.

    python -m pcomp_jax.eval --config configs/eval_retrieval.yaml
    python -m pcomp_jax.eval --config configs/eval_perplexity.yaml --set perplexity.prefix_lengths=[8192]

One run sweeps methods x (tasks x lengths x depths x seeds, the LongBench examples, the
perplexity windows). Per method it writes ``<output_dir>/<method>/predictions.jsonl`` (one
line per finished item, flushed as soon as it is done) and ``metrics.json``; then
``summary.md`` (also printed), ``summary.json``, ``heatmap_<task>.png`` (accuracy by depth x
length per method) and ``perplexity.png`` (perplexity against prefix length per method).
Run it again with the same output directory to resume: finished items are skipped, and a
method whose settings changed since is refused rather than mixed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from .config import ConfigError, ParallelCompConfig, check_field_types, to_dict
from .errors import PcompError
from .tasks import SYNTHETIC_TASKS, make_task

ANSWER_TOKENS = {"passkey": 16, "number_string": 24, "kv_retrieval": 64, "needle": 16}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a name and the pipeline fields it changes.

    Unset (null) fields keep the run's ``pipeline`` value. max_length: synthetic inputs
    and perplexity prefixes longer than this many tokens are not run for this method (e.g. full attention at
    lengths where it is known to fail or too slow); they show as "-" in the summary.
    """

    name: str
    method: str
    max_length: int | None = None
    capacity: int | None = None
    top_k_chunks: int | None = None
    chunk_len: int | None = None
    kv_budget: int | None = None
    calibration_preset: str | None = None
    calibration_preset_stage: str | None = None

    def __post_init__(self):
        check_field_types(self)
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"method name {self.name!r} must be a non-empty directory name without '/'")

    def runs(self, item: Item) -> bool:
        """Whether this method runs ``item`` (see max_length)."""
        length = item.fields.get("length", item.fields.get("prefix_len"))
        return self.max_length is None or length is None or length <= self.max_length

    def pipeline(self, base: ParallelCompConfig) -> ParallelCompConfig:
        """``base`` with this method's fields applied (validated)."""
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("name", "max_length")}
        return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


DEFAULT_METHODS = (
    MethodSpec("full", "full"),
    MethodSpec("truncate", "truncate"),
    MethodSpec("pcw", "pcw"),
    MethodSpec("parallelcomp", "parallelcomp"),
    MethodSpec("parallelcomp_evict", "parallelcomp", capacity=128),
    MethodSpec("streaming", "streaming"),
    MethodSpec("snapkv", "snapkv"),
)


@dataclasses.dataclass(frozen=True)
class PerplexityConfig:
    """Perplexity of ``continuation`` tokens after prefixes of ``prefix_lengths`` tokens of
    ``text_file``, ``samples`` windows per length; ``query_len``: see ``pcomp_jax.perplexity``."""

    prefix_lengths: tuple[int, ...] = ()
    continuation: int = 256
    samples: int = 2
    query_len: int = 64
    text_file: str = "../shared/data/war_and_peace.txt"

    def __post_init__(self):
        check_field_types(self)
        for name in ("continuation", "samples", "query_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"perplexity.{name} must be >= 1, got {getattr(self, name)}")
        if any(t <= self.query_len + 1 for t in self.prefix_lengths):
            raise ConfigError(f"perplexity.prefix_lengths must all exceed query_len + 1 = {self.query_len + 1}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``python -m pcomp_jax.eval`` runs (YAML keys = these fields).

    tasks, lengths (context tokens), depths (0 = start, 1 = end), seeds: the synthetic grid
    (``tasks.SYNTHETIC_TASKS``); text_file: the haystack of ``needle``. longbench: a
    LongBench-format JSONL file (optional), longbench_limit: examples read from it.
    max_new_tokens: answer length (null: per task, LongBench's per dataset).
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    output_dir: str = "runs/eval"
    pipeline: ParallelCompConfig = dataclasses.field(default_factory=ParallelCompConfig)
    methods: tuple[MethodSpec, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] = ("passkey", "needle")
    lengths: tuple[int, ...] = (8192, 16384, 32768)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    seeds: tuple[int, ...] = (0,)
    text_file: str = "../shared/data/war_and_peace.txt"
    longbench: str | None = None
    longbench_limit: int | None = None
    max_new_tokens: int | None = None
    perplexity: PerplexityConfig = dataclasses.field(default_factory=PerplexityConfig)

    def __post_init__(self):
        check_field_types(self)
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r} is not allowed; choose one of: float32, bfloat16")
        for name in ("tasks", "lengths", "depths", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} has repeated values: {list(values)}")
        for task in self.tasks:
            if task not in SYNTHETIC_TASKS:
                raise ConfigError(f"unknown task {task!r} in tasks; choose from: {', '.join(SYNTHETIC_TASKS)}")
        if any(n < 1 for n in self.lengths):
            raise ConfigError(f"lengths must be positive token counts, got {list(self.lengths)}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"depths must lie in [0, 1], got {list(self.depths)}")
        names = [m.name for m in self.methods]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"methods need distinct names, got {names}")
        for spec in self.methods:  # every method's pipeline must validate before anything runs
            try:
                spec.pipeline(self.pipeline)
            except ConfigError as err:
                raise ConfigError(f"method {spec.name!r}: {err}") from None
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.longbench_limit is not None and self.longbench_limit < 1:
            raise ConfigError(f"longbench_limit must be >= 1, got {self.longbench_limit}")


def load_eval_config(path: str | None, overrides=()) -> EvalConfig:
    """YAML at ``path`` (or the defaults) with ``--set`` overrides, validated."""
    from .config import load_config

    return load_config(path, overrides, cls=EvalConfig)


# ---- items: what one prediction is about -------------------------------------------------


@dataclasses.dataclass
class Item:
    """One unit of work for a method. kind: synthetic, longbench or perplexity."""

    id: str
    kind: str
    fields: dict


def synthetic_items(config: EvalConfig) -> list[Item]:
    return [
        Item(f"{task}/L{length}/d{depth:g}/s{seed}", "synthetic",
             {"task": task, "length": length, "depth": depth, "seed": seed})
        for length in sorted(config.lengths) for task in config.tasks for depth in config.depths for seed in config.seeds
    ]  # shortest first, so that a run cut short has every method on the shorter inputs


def longbench_items(config: EvalConfig) -> list[Item]:
    if config.longbench is None:
        return []
    from .longbench import load_longbench

    examples = load_longbench(config.longbench, limit=config.longbench_limit)
    return [Item(f"longbench/{ex.dataset}/{ex.id}", "longbench", {"example": ex, "dataset": ex.dataset})
            for ex in examples]


def perplexity_items(config: EvalConfig) -> list[Item]:
    ppl = config.perplexity
    return [Item(f"ppl/T{t}/s{s}", "perplexity", {"prefix_len": t, "sample": s})
            for t in sorted(ppl.prefix_lengths) for s in range(ppl.samples)]


def read_text(path: str, purpose: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise PcompError(f"cannot read {purpose} text_file {path!r}: {err}") from err


# ---- running one item --------------------------------------------------------------------


class Runner:
    """Holds the model and the texts; ``run(item, pipeline)`` returns one prediction record."""

    def __init__(self, model, config: EvalConfig):
        self.model, self.config = model, config
        self._needle_text = None
        self._ppl_windows = None

    def needle_text(self) -> str:
        if self._needle_text is None:
            self._needle_text = read_text(self.config.text_file, "the needle task's")
        return self._needle_text

    def ppl_window(self, prefix_len: int, sample: int):
        """(prefix, continuation) token ids; every prefix length shares the continuations."""
        from .perplexity import text_windows

        if self._ppl_windows is None:
            ppl = self.config.perplexity
            text = read_text(ppl.text_file, "the perplexity")
            ids = np.asarray(self.model.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
            self._ppl_windows = text_windows(ids, ppl.prefix_lengths, ppl.continuation, ppl.samples)
        return self._ppl_windows[prefix_len][sample]

    def run(self, item: Item, pipeline: ParallelCompConfig) -> dict:
        start = time.perf_counter()
        record = {"id": item.id, "kind": item.kind, **{k: v for k, v in item.fields.items() if k != "example"}}
        try:
            record.update(getattr(self, f"_{item.kind}")(item, pipeline))
        except ConfigError:  # a setting, not this input: stop (checked up front, so rare)
            raise
        except PcompError as err:  # this input does not suit this method (e.g. too long): recorded, scored 0
            record.update({"error": f"{type(err).__name__}: {err}", "score": 0.0})
        except jax.errors.JaxRuntimeError as err:  # out of memory at this length: recorded, the sweep goes on
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            record.update({"error": f"out of memory: {str(err).splitlines()[0]}", "score": 0.0})
        record["seconds"] = round(time.perf_counter() - start, 2)
        return record

    def _synthetic(self, item: Item, pipeline) -> dict:
        from .pipeline import answer

        f = item.fields
        task = make_task(f["task"], self.model.tokenizer, f["length"], f["depth"], f["seed"],
                         text=self.needle_text() if f["task"] == "needle" else None)
        result = answer(self.model, task.context, task.question, pipeline,
                        self.config.max_new_tokens or ANSWER_TOKENS[f["task"]])
        correct = task.is_correct(result.text)
        return {**f, "prediction": result.text, "answer": task.answer, "score": float(correct),
                "selected_chunks": result.selected_chunks, "context_tokens": result.context_tokens}

    def _longbench(self, item: Item, pipeline) -> dict:
        from .longbench import MAX_NEW_TOKENS, encode_prompt, score_example
        from .pipeline import answer_parts

        ex = item.fields["example"]
        parts = encode_prompt(self.model.tokenizer, ex, pipeline.chat)
        result = answer_parts(self.model, parts, pipeline, self.config.max_new_tokens or MAX_NEW_TOKENS[ex.dataset])
        return {"dataset": ex.dataset, "example_id": ex.id, "length": ex.length, "prediction": result.text,
                "answers": ex.answers, "score": score_example(ex, result.text),
                "selected_chunks": result.selected_chunks, "context_tokens": result.context_tokens}

    def _perplexity(self, item: Item, pipeline) -> dict:
        from .perplexity import continuation_nll

        prefix, continuation = self.ppl_window(item.fields["prefix_len"], item.fields["sample"])
        scored = continuation_nll(self.model, prefix, continuation, pipeline, self.config.perplexity.query_len)
        return {**item.fields, "mean_nll": scored.mean_nll, "perplexity": scored.perplexity,
                "tokens": len(scored.token_nll), "selected_chunks": scored.selected_chunks}


# ---- files: append-only predictions, resumable ---------------------------------------------


def read_predictions(path: str) -> dict[str, dict]:
    """Finished records by id. A last line cut short by a killed run is ignored (and rewritten)."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as f:  # drop a last line cut short by a kill, so appends start on a fresh line
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            print(f"warning: {path} ended in a record cut short (an interrupted run?); that item runs again",
                  file=sys.stderr)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
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


def method_settings(config: EvalConfig, spec: MethodSpec) -> dict:
    """What makes a method's predictions comparable across resumed runs."""
    settings = {"model": config.model, "dtype": config.dtype, "max_new_tokens": config.max_new_tokens,
                "pipeline": to_dict(spec.pipeline(config.pipeline))}
    if "needle" in config.tasks:
        settings["text_file"] = config.text_file
    if config.perplexity.prefix_lengths:  # the lengths themselves are in the item ids
        settings["perplexity"] = {k: v for k, v in to_dict(config.perplexity).items() if k != "prefix_lengths"}
    if config.longbench is not None:
        settings["longbench"] = os.path.abspath(config.longbench)
    return settings


def check_or_write_settings(directory: str, settings: dict) -> None:
    """Refuses to resume a method directory whose results came from other settings.

    Only settings both runs have are compared: adding a part to a sweep (the needle task and
    its text, perplexity, a LongBench file) resumes, and the record keeps every part seen."""
    path = os.path.join(directory, "settings.json")
    normal = json.loads(json.dumps(settings))
    predictions = os.path.join(directory, "predictions.jsonl")
    has_results = os.path.exists(predictions) and os.path.getsize(predictions) > 0
    if os.path.exists(path) and has_results:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) & set(normal) if old[k] != normal[k])
        if changed:
            raise ConfigError(
                f"{directory} holds results made with other settings ({', '.join(changed)} differ); "
                "use another output_dir or method name, or delete that directory to start it again"
            )
        normal = {**old, **normal}  # parts added since (a needle text, perplexity, LongBench) join the record
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(normal, f, indent=1)


# ---- metrics, summary, plots ---------------------------------------------------------------


def method_metrics(records: list[dict]) -> dict:
    """Aggregates one method's records: synthetic accuracy by task, length and depth; LongBench
    mean score (x100) by dataset; perplexity (exp of the mean token NLL) by prefix length."""
    out: dict = {"synthetic": {}, "longbench": {}, "perplexity": {}, "errors": 0}
    for r in records:
        out["errors"] += "error" in r
    for r in (r for r in records if r["kind"] == "synthetic"):
        cell = out["synthetic"].setdefault(r["task"], {}).setdefault(str(r["length"]), {"scores": [], "by_depth": {}})
        cell["scores"].append(r["score"])
        cell["by_depth"].setdefault(f"{r['depth']:g}", []).append(r["score"])
    for lengths in out["synthetic"].values():
        for cell in lengths.values():
            cell["accuracy"] = float(np.mean(cell["scores"]))
            cell["n"] = len(cell["scores"])
            cell["by_depth"] = {d: float(np.mean(s)) for d, s in cell["by_depth"].items()}
            del cell["scores"]
    by_dataset: dict = {}
    for r in (r for r in records if r["kind"] == "longbench"):
        by_dataset.setdefault(r["dataset"], []).append(r["score"])
    out["longbench"] = {d: {"score": 100 * float(np.mean(s)), "n": len(s)} for d, s in by_dataset.items()}
    by_prefix: dict = {}
    for r in (r for r in records if r["kind"] == "perplexity" and "error" not in r):
        by_prefix.setdefault(str(r["prefix_len"]), []).append(r["mean_nll"])
    out["perplexity"] = {t: {"mean_nll": float(np.mean(v)), "perplexity": float(np.exp(np.mean(v))), "n": len(v)}
                         for t, v in sorted(by_prefix.items(), key=lambda kv: int(kv[0]))}
    return out


def summary_markdown(metrics: dict[str, dict]) -> str:
    """Markdown tables, methods as rows: accuracy per task and length, LongBench score per
    dataset, perplexity per prefix length."""
    lines = []
    tasks = sorted({t for m in metrics.values() for t in m["synthetic"]})
    for task in tasks:
        lengths = sorted({int(n) for m in metrics.values() for n in m["synthetic"].get(task, {})})
        lines += [f"**{task}** (accuracy; right / runs)", "",
                  "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
                  "| --- |" + " --- |" * len(lengths)]
        for name, m in metrics.items():
            cells = []
            for n in lengths:
                c = m["synthetic"].get(task, {}).get(str(n))
                cells.append("-" if c is None else f"{c['accuracy']:.2f} ({round(c['accuracy'] * c['n'])}/{c['n']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    datasets = sorted({d for m in metrics.values() for d in m["longbench"]})
    if datasets:
        lines += ["**LongBench** (score x100)", "", "| method | " + " | ".join(datasets) + " |",
                  "| --- |" + " --- |" * len(datasets)]
        for name, m in metrics.items():
            cells = [f"{m['longbench'][d]['score']:.1f}" if d in m["longbench"] else "-" for d in datasets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    prefixes = sorted({int(t) for m in metrics.values() for t in m["perplexity"]})
    if prefixes:
        lines += ["**Perplexity** of the continuation, by prefix length", "",
                  "| method | " + " | ".join(f"{t}" for t in prefixes) + " |", "| --- |" + " --- |" * len(prefixes)]
        for name, m in metrics.items():
            cells = [f"{m['perplexity'][str(t)]['perplexity']:.2f}" if str(t) in m["perplexity"] else "-"
                     for t in prefixes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_heatmaps(metrics: dict[str, dict], output_dir: str) -> list[str]:
    """``heatmap_<task>.png``: one panel per method, accuracy by depth (rows) x length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in sorted({t for m in metrics.values() for t in m["synthetic"]}):
        names = [n for n, m in metrics.items() if task in m["synthetic"]]
        lengths = sorted({int(n) for n in names for n in metrics[n]["synthetic"][task]})
        depths = sorted({float(d) for n in names for c in metrics[n]["synthetic"][task].values() for d in c["by_depth"]})
        fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names) + 1, 2.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for j, n in enumerate(lengths):
                cell = metrics[name]["synthetic"][task].get(str(n))
                for i, d in enumerate(depths):
                    if cell is not None and f"{d:g}" in cell["by_depth"]:
                        grid[i, j] = cell["by_depth"][f"{d:g}"]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_title(name, fontsize=9)
            ax.set_xticks(range(len(lengths)), [f"{n / 1024:g}K" if n >= 1024 else str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_xlabel("context tokens", fontsize=7)
        axes[0][0].set_ylabel("depth", fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
        fig.suptitle(f"{task}: accuracy by depth and length", fontsize=10)
        path = os.path.join(output_dir, f"heatmap_{task}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def plot_perplexity(metrics: dict[str, dict], output_dir: str, window: int | None = None) -> str | None:
    """``perplexity.png``: perplexity against prefix length, one line per method (log scales)."""
    if not any(m["perplexity"] for m in metrics.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in metrics.items():
        if m["perplexity"]:
            xs = [int(t) for t in m["perplexity"]]
            ax.plot(xs, [m["perplexity"][str(t)]["perplexity"] for t in xs], marker="o", label=name)
    if window:
        ax.axvline(window, color="gray", linestyle=":", label=f"trained window ({window})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefix tokens")
    ax.set_ylabel("perplexity of the continuation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = os.path.join(output_dir, "perplexity.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- the run -------------------------------------------------------------------------------


def check_method_fits(model, pipeline: ParallelCompConfig, name: str) -> None:
    """The checks ``answer`` makes of the settings alone (calibration against the method and
    the model's depth, the attention backend), made once before any item runs."""
    from .attention import causal_attention
    from .pipeline import calibration_rules, check_rules_apply

    try:
        check_rules_apply(calibration_rules(pipeline, model.config.num_layers), pipeline.method)
        causal_attention(pipeline.attention, needs_key_mask=False, dtype=model.dtype)
    except ConfigError as err:
        raise ConfigError(f"method {name!r}: {err}") from None


def write_results(config: EvalConfig, items: list[Item], done: dict[str, dict], window: int | None) -> dict[str, dict]:
    """Writes every method's ``metrics.json``, ``summary.md``/``.json`` and the plots; returns the metrics."""
    metrics = {}
    for spec in config.methods:
        wanted = {item.id for item in items if spec.runs(item)}
        metrics[spec.name] = method_metrics([r for i, r in done[spec.name].items() if i in wanted])
        with open(os.path.join(config.output_dir, spec.name, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics[spec.name], f, indent=1)
    with open(os.path.join(config.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(config.output_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(metrics))
    plot_heatmaps(metrics, config.output_dir)
    plot_perplexity(metrics, config.output_dir, window)
    return metrics


def evaluate(config: EvalConfig, model=None, progress: bool = True) -> dict[str, dict]:
    """Runs (or resumes) the whole sweep; returns the metrics per method and writes the files."""
    items = synthetic_items(config) + longbench_items(config) + perplexity_items(config)
    if not items:
        raise ConfigError("nothing to evaluate: give tasks (with lengths and depths), longbench or "
                          "perplexity.prefix_lengths")
    if "needle" in config.tasks:
        read_text(config.text_file, "the needle task's")  # fail before any work
    if config.perplexity.prefix_lengths:
        read_text(config.perplexity.text_file, "the perplexity")
    os.makedirs(config.output_dir, exist_ok=True)
    for spec in config.methods:  # settings of every method are checked before anything runs
        check_or_write_settings(os.path.join(config.output_dir, spec.name), method_settings(config, spec))
    if model is None:
        from .checkpoints import load_model

        model = load_model(config.model, dtype=config.dtype)
    for spec in config.methods:
        check_method_fits(model, spec.pipeline(config.pipeline), spec.name)
    runner = Runner(model, config)
    done = {spec.name: read_predictions(os.path.join(config.output_dir, spec.name, "predictions.jsonl"))
            for spec in config.methods}
    wanted = [(spec, item) for item in items for spec in config.methods if spec.runs(item)]
    pending = [(spec, item) for spec, item in wanted if item.id not in done[spec.name]]
    skipped = len(wanted) - len(pending)
    if skipped:
        print(f"resuming: {skipped} finished predictions kept, {len(pending)} to run", file=sys.stderr)
    bar = tqdm(pending, desc="eval", unit="item", disable=not progress)
    try:
        for spec, item in bar:
            bar.set_postfix_str(f"{spec.name} {item.id}")
            record = runner.run(item, spec.pipeline(config.pipeline))
            record["method"] = spec.name
            append_record(os.path.join(config.output_dir, spec.name, "predictions.jsonl"), record)
            done[spec.name][item.id] = record
    finally:  # metrics, summary and plots of what is finished, also when a run stops early
        metrics = write_results(config, items, done, getattr(model.config, "window", None))
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcomp_jax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="YAML", help="eval config; see configs/eval_*.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field, e.g. --set lengths=[8192] --set pipeline.chunk_len=1024 (repeatable)")
    p.add_argument("--output-dir", help="shorthand for --set output_dir=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        config = load_eval_config(args.config, overrides)
        metrics = evaluate(config, progress=not args.no_progress)
    except PcompError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_markdown(metrics))
    print(f"results in {config.output_dir}/ (summary.md, summary.json, <method>/predictions.jsonl, metrics.json, PNGs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
